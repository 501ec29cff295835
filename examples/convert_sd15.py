"""Build an untrained EMO pipeline from Stable Diffusion 1.5 + wav2vec2 + AnimateDiff and save it.

    python examples/convert_sd15.py --output emo-untrained

The defaults are the Hub ids of the models EMO (arXiv 2402.17485) starts from; any of them can be a local folder
(or, for --sd15, a single-file checkpoint together with --sd15-config). The saved folder is the starting point of
training (`training/train.py`); its weights do not animate portraits until trained.
"""

import argparse

from emo_pipeline import build_emo_pipeline


def main(argv: list[str] | None = None) -> None:
    """Convert and save; arguments as `--help` lists them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--wav2vec2", default="facebook/wav2vec2-base-960h")
    parser.add_argument("--motion-adapter", default="guoyww/animatediff-motion-adapter-v1-5-2")
    parser.add_argument("--sd15-config", default=None, help="local diffusers SD folder, for a single-file --sd15")
    parser.add_argument("--output", default="emo-untrained")
    args = parser.parse_args(argv)

    pipe = build_emo_pipeline(args.sd15, args.wav2vec2, args.motion_adapter, sd15_config=args.sd15_config)
    pipe.save_pretrained(args.output)  # safetensors weights, emo_metadata.json and a model card (README.md)
    print(f"saved an untrained EMO pipeline to {args.output} (from {pipe.emo_metadata['base_model']})")


if __name__ == "__main__":
    main()
