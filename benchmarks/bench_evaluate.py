"""emo-evaluate speed per metric on CPU: one synthetic 25 fps talking-face video (the tests' fixture) against its
ground truth, the metric networks at their real sizes with seeded random weights (speed does not depend on values).

    python benchmarks/bench_evaluate.py --frames 50 --size 256     # -> benchmarks/results/evaluate.json

Each metric runs alone (a fresh `Evaluator`), so its time includes loading its network; FID at 2048 dims includes
`scipy.linalg.sqrtm` of a 2048x2048 matrix, which dominates for small sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "evaluate.json"))
    args = parser.parse_args()

    import eval_fixtures as fx
    import torch

    from emo_pipeline.evaluation.runner import evaluate

    root = Path(tempfile.mkdtemp(prefix="emo-bench-eval-"))
    image = fx.portrait(args.size)
    box = fx.mouth_box(image)
    audio = fx.speech(args.frames / 25)
    for name, offset in (("generated", 2), ("reference", 0)):
        (root / name).mkdir()
        frames = np.stack([fx.shift_mouth(image, box, offset + 2 * (i % 3)) for i in range(args.frames)])
        fx.write_video(root / name / "talk.mp4", frames, audio)
    weights = fx.seeded_weights(root / "weights")
    timings = {}
    for metric in ("fid", "fvd", "sync", "lmd", "psnr", "ssim"):
        start = time.perf_counter()
        evaluate(root / "generated", root / metric, reference=root / "reference", metrics=metric, weights_dir=weights,
                 progress=False)  # fmt: skip
        timings[metric] = round(time.perf_counter() - start, 2)
        print(f"{metric}: {timings[metric]} s", flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    result = {
        "what": f"seconds per metric for one {args.frames}-frame {args.size}x{args.size} video + its ground truth",
        "seconds": timings,
        "fvd_network": "small TorchScript stand-in (tests/eval_fixtures.ProbeI3D): the real I3D is not timed",
        "cpu": model,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
