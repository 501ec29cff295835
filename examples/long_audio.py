"""Animate a long track with flat memory: clips stream into the mp4 as they are generated.

    python examples/long_audio.py --model path/or/hub-id --image portrait.png --audio lecture.mp3 --output out.mp4

Memory does not grow with the audio length: `iter_clips` yields each clip once decoded, wav2vec2 runs on bounded
chunks, and the writer encodes frames immediately. The file appears only when complete (Ctrl-C leaves none).
"""

import argparse

import torch

from emo_pipeline import EMOPipeline
from emo_pipeline.media import VideoWriter
from emo_pipeline.testing import demo_assets, tiny_emo_pipeline
from emo_pipeline.watermark import AI_GENERATED_METADATA


def main(argv: list[str] | None = None) -> None:
    """Stream clip by clip with `iter_clips`; `pipe.write_video(...)` does the same in one call."""
    portrait, speech = demo_assets()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="EMOPipeline folder or Hub id (default: tiny random demo weights)")
    parser.add_argument("--image", default=str(portrait))
    parser.add_argument("--audio", default=str(speech))
    parser.add_argument("--output", default="long.mp4")
    parser.add_argument("--size", type=int, default=None, help="default 512 (64 for the tiny demo)")
    parser.add_argument("--steps", type=int, default=None, help="default 40 (4 for the tiny demo)")
    args = parser.parse_args(argv)

    pipe = EMOPipeline.from_pretrained(args.model) if args.model else tiny_emo_pipeline()
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or (512 if args.model else 64)
    clips = pipe.iter_clips(  # inputs are loaded and checked here; generation runs as the loop pulls clips
        args.image,
        args.audio,
        height=size,
        width=size,
        num_inference_steps=args.steps or (40 if args.model else 4),
        generator=torch.Generator().manual_seed(0),
    )
    plan = pipe.last_plan  # the loaded audio and the frame count: ceil(duration * fps)
    with VideoWriter(args.output, fps=25, audio=plan.audio, metadata=AI_GENERATED_METADATA) as writer:
        for index, clip in enumerate(clips):
            writer.write(clip)
            print(f"clip {index + 1}/{plan.num_clips}: {writer.frames_written}/{plan.num_frames} frames", flush=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
