"""emo-evaluate: the talking-head metrics of the papers (FID, FVD, Sync-C/Sync-D/offset, CSIM, LMD, PSNR, SSIM) over a
set of generated videos, as a json of per-video and aggregate numbers and an HTML report.

    emo-evaluate --generated out/ --reference gt/ --metrics fid,sync,lmd,psnr,ssim --weights weights/ --output eval/
    emo-evaluate --generated jobs.csv --reference gt/ --output eval/          # an emo-animate job file
    accelerate launch -m emo_pipeline.cli.evaluate --model ckpt-a --model ckpt-b --manifest jobs.csv \\
        --reference gt/ --output eval/       # generate with each checkpoint (resumable), then compare side by side

Exit codes: 0 done, 2 bad input (a missing weights file, unmatched generated/reference sets, ...), 1 some generation
jobs failed (their videos are reported as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from emo_pipeline.errors import EMOInputError

ALL = "fid,fvd,sync,csim,lmd,psnr,ssim"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", help="folder of generated videos, or an emo-animate job file (.csv/.jsonl)")
    parser.add_argument("--reference", help="folder of ground-truth videos, matched to the generated ones by name")
    parser.add_argument("--metrics", default=ALL, help=f"comma-separated subset of {ALL} (default: all)")
    parser.add_argument("--weights", help="folder with the metric networks' published files under their names")
    parser.add_argument("--output", required=True, help="folder for results.json and report.html")
    parser.add_argument("--device", default="cpu", help="torch device for the metric networks (default cpu)")
    parser.add_argument("--fid-stride", type=int, default=1, help="FID on every N-th frame (default 1: all frames)")
    parser.add_argument(
        "--fid-dims", type=int, default=2048, choices=(64, 192, 768, 2048), help="pytorch-fid's --dims (default 2048)"
    )
    parser.add_argument("--no-download", action="store_true", help="never download a missing weights file")
    parser.add_argument("--model", action="append", help="generate with this checkpoint first ('demo': tiny random)")
    parser.add_argument("--manifest", help="with --model: the emo-animate job file to generate (outputs replaced)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _tag(model: str, index: int) -> str:
    return f"{index}_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1]) or "model")


def _generate_and_evaluate(args: argparse.Namespace, metrics: tuple[str, ...]) -> int:
    from accelerate import PartialState

    from emo_pipeline.batch import read_jobs, run_batch
    from emo_pipeline.cli import animate
    from emo_pipeline.cli._common import SCHEDULER_NAMES
    from emo_pipeline.evaluation.report import write_report
    from emo_pipeline.evaluation.runner import Evaluator, _write_json, evaluate

    jobs = read_jobs(args.manifest, scheduler_names=SCHEDULER_NAMES)
    # a missing weights file fails here, before any video is generated
    Evaluator(metrics, args.weights, args.device, not args.no_download, args.fid_stride, args.fid_dims)
    defaults = animate._defaults(animate.build_parser().parse_args(["--jobs", args.manifest]))
    output = Path(args.output)
    runs, labels, failed = [], [], False
    for index, model in enumerate(args.model):
        folder = output / _tag(model, index)
        (folder / "videos").mkdir(parents=True, exist_ok=True)
        own = [type(job)(**{**vars(job), "output": str(folder / "videos" / Path(job.output).name)}) for job in jobs]
        summary = run_batch(
            own,
            defaults,
            model=None if model == "demo" else model,
            failures_path=folder / "failures.jsonl",
            progress=not args.no_progress,
        )
        failed = failed or bool(summary.failures)
        if not PartialState().is_main_process:
            continue
        manifest = folder / "jobs.jsonl"
        manifest.write_text(
            "".join(json.dumps({"image": j.image, "audio": j.audio, "output": j.output}) + "\n" for j in own)
        )
        result = evaluate(manifest, folder, metrics=metrics, title=f"emo-evaluate: {model}", **_evaluate_options(args))
        result.update(label=model, output=str(folder))
        runs.append(result)
        labels.append(model)
    if PartialState().is_main_process:
        _write_json(output / "results.json", {"models": runs})
        report = write_report(output, runs, labels)
        print(f"wrote {output / 'results.json'} and {report}")
    return 1 if failed else 0


def _evaluate_options(args: argparse.Namespace) -> dict:
    """`evaluate`'s keyword arguments from the command line, shared by both ways of running it."""
    return {
        "reference": args.reference,
        "weights_dir": args.weights,
        "device": args.device,
        "download": not args.no_download,
        "progress": not args.no_progress,
        "fid_stride": args.fid_stride,
        "fid_dims": args.fid_dims,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from emo_pipeline.evaluation.runner import evaluate, parse_metrics

        metrics = parse_metrics(args.metrics)
        if args.model:
            if not args.manifest or args.generated:
                parser.error("--model generates from --manifest (an emo-animate job file); drop --generated")
            return _generate_and_evaluate(args, metrics)
        if not args.generated:
            parser.error("give --generated (videos to evaluate), or --model and --manifest (generate first)")
        results = evaluate(args.generated, args.output, metrics=metrics, **_evaluate_options(args))
    except EMOInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for key, value in results["aggregate"].items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    for metric, reason in results["skipped"].items():
        print(f"{metric}: skipped: {reason}")
    for video in results["videos"]:
        for metric, reason in video["skipped"].items():
            print(f"{video['name']}: {metric}: skipped: {reason}")
    print(f"wrote {os.path.join(args.output, 'results.json')} and {os.path.join(args.output, 'report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
