"""VAE decode benchmark: seconds per frame of the SD1.5-shaped VAE decoder (random weights) by chunk size, memory
format, dtype and torch.compile, and of TAESD (`decoder="tiny"`, its real layer sizes, random weights). Writes json.

    python benchmarks/bench_decode.py --size 128 --frames 16 --chunks 1 4 16

Every variant decodes the same latents in one process (decode is stateless; each variant is timed after one
untimed warm-up call, which is where compile variants compile: `warmup_seconds`). Frames are compared with the fp32
channels-first decode at chunk 8 (the pipeline's default): `max_abs_diff` / `mean_abs_diff` in [0, 1] pixel units
(NaN for TAESD, a different model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="output side in pixels")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16], help="chunk sizes besides 8")
    parser.add_argument("--repeats", type=int, default=2, help="timed decodes per variant (the best is kept)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/decode_sd15_128.json")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_inference import machine_info, write

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    vae = AutoencoderKL(  # as emo_pipeline.testing.sd15_shaped_pipeline
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).eval()
    torch.manual_seed(4)
    taesd = AutoencoderTiny().eval()
    latents = torch.randn(args.frames, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def decode(model, chunk, dtype, channels_last):
        outputs = []
        for piece in (latents / model.config.scaling_factor).split(chunk):
            piece = piece.to(dtype)
            if channels_last:
                piece = piece.contiguous(memory_format=torch.channels_last)
            outputs.append(model.decode(piece).sample.float())
        return (torch.cat(outputs) / 2 + 0.5).clamp(0, 1)

    variants = [("fp32", 8, torch.float32, False, False, vae)]
    variants += [(f"fp32 chunk {c}", c, torch.float32, False, False, vae) for c in args.chunks]
    variants += [
        ("fp32 channels-last", 8, torch.float32, True, False, vae),
        ("bf16", 8, torch.bfloat16, False, False, vae),
        ("bf16 channels-last", 8, torch.bfloat16, True, False, vae),
    ]
    if not args.no_compile:
        variants += [("fp32 compile", 8, torch.float32, False, True, vae)]
    variants += [("tiny (TAESD) fp32", 8, torch.float32, False, False, taesd)]
    variants += [("tiny (TAESD) bf16", 8, torch.bfloat16, False, False, taesd)]

    runs, reference = [], None
    for name, chunk, dtype, channels_last, compiled, model in variants:
        model.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compiled:
            model.decoder.compile(fullgraph=True, dynamic=False)
        start = time.perf_counter()
        frames = decode(model, chunk, dtype, channels_last)
        warmup = time.perf_counter() - start
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            frames = decode(model, chunk, dtype, channels_last)
            best = min(best, time.perf_counter() - start)
        if compiled:
            torch._dynamo.reset()
            model.decoder._compiled_call_impl = None  # back to eager for the next variants
        reference = frames if reference is None else reference
        difference = (frames - reference).abs()
        if model is taesd:  # another model with other random weights: its difference from the VAE means nothing
            difference = torch.full((1,), float("nan"))
        runs.append(
            {
                "variant": name,
                "chunk": chunk,
                "seconds_per_frame": round(best / args.frames, 4),
                "warmup_seconds": round(warmup, 2),
                "max_abs_diff": round(difference.max().item(), 5),
                "mean_abs_diff": round(difference.mean().item(), 6),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    write({"benchmark": "decode", "config": vars(args), "machine": machine_info(torch), "runs": runs}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
