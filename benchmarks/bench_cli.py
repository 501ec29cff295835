"""Command-line start-up benchmark: wall time of `--help` and of reporting a bad input, as a user runs them.

    python benchmarks/bench_cli.py                          # 5 runs each -> benchmarks/results/cli.json
    python benchmarks/bench_cli.py --runs 10 --output cli.json

Each command runs as a fresh process (`python -m ...`, the same code path as the installed `emo-animate`
script), so the times include the interpreter start and every import. The target: `--help` under 1 s, and a bad
input (a text file as the portrait, an output folder that does not exist) reported in about a second, before any
model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(scratch: Path) -> dict[str, list[str]]:
    portrait = ROOT / "emo_pipeline" / "assets" / "portrait.png"
    speech = ROOT / "emo_pipeline" / "assets" / "speech.wav"
    text = scratch / "notes.txt"
    text.write_text("not an image\n")
    animate = [sys.executable, "-m", "emo_pipeline.cli.animate"]
    return {
        "emo-animate --help": [*animate, "--help"],
        "emo-preprocess --help": [sys.executable, "-m", "emo_pipeline.cli.preprocess", "--help"],
        "emo-app --help": [sys.executable, "-m", "emo_pipeline.app", "--help"],
        "emo-animate, text file as image": [
            *animate,
            "--image",
            str(text),
            "--audio",
            str(speech),
            "--output",
            "o.mp4",
        ],
        "emo-animate, no output folder": [
            *animate,
            "--image",
            str(portrait),
            "--audio",
            str(speech),
            "--output",
            str(scratch / "missing" / "o.mp4"),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default: 5)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cli.json"), help="json to write")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, command in _commands(Path(scratch)).items():
            times, codes = [], set()
            for _ in range(args.runs):
                start = time.perf_counter()
                completed = subprocess.run(command, capture_output=True, env=env, cwd=scratch)
                times.append(time.perf_counter() - start)
                codes.add(completed.returncode)
            results[name] = {
                "median_s": round(statistics.median(times), 3),
                "min_s": round(min(times), 3),
                "max_s": round(max(times), 3),
                "exit_codes": sorted(codes),
            }
            print(f"{name:<36} median {results[name]['median_s']:.3f} s  exit {sorted(codes)}")
    record = {
        "benchmark": "cli_startup",
        "runs": args.runs,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
