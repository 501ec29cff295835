"""Animate a portrait with a speech track and write the mp4 (audio muxed, watermarked, tagged AI-generated).

    python examples/animate.py --model path/or/hub-id --image portrait.png --audio speech.wav --output out.mp4

Without --model it uses the seeded tiny random pipeline from `emo_pipeline.testing` (the video is noise).
"""

import argparse

import torch

from emo_pipeline import EMOPipeline
from emo_pipeline.testing import demo_assets, tiny_emo_pipeline


def main(argv: list[str] | None = None) -> None:
    """Generate the whole video in memory with `pipe(...)`, then write it; see long_audio.py for streaming."""
    portrait, speech = demo_assets()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="EMOPipeline folder or Hub id (default: tiny random demo weights)")
    parser.add_argument("--image", default=str(portrait))
    parser.add_argument("--audio", default=str(speech))
    parser.add_argument("--output", default="animated.mp4")
    parser.add_argument("--size", type=int, default=None, help="default 512 (64 for the tiny demo)")
    parser.add_argument("--steps", type=int, default=None, help="default 40 (4 for the tiny demo)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = EMOPipeline.from_pretrained(args.model) if args.model else tiny_emo_pipeline()
    pipe.to(device)
    size = args.size or (512 if args.model else 64)
    output = pipe(
        args.image,
        args.audio,
        height=size,
        width=size,
        num_inference_steps=args.steps or (40 if args.model else 4),
        generator=torch.Generator().manual_seed(0),
    )

    from emo_pipeline.media import VideoWriter
    from emo_pipeline.watermark import AI_GENERATED_METADATA

    # output.frames: (N, H, W, 3) float in [0, 1]; output.audio: the 16 kHz track the video follows
    with VideoWriter(args.output, fps=output.fps, audio=output.audio, metadata=AI_GENERATED_METADATA) as writer:
        writer.write(output.frames)
    print(f"wrote {args.output}: {len(output.frames)} frames at {output.fps:g} fps")


if __name__ == "__main__":
    main()
