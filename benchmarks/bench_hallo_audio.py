"""Hallo's wav2vec2 features on long audio: parity mode's whole-track memory and fast mode's chunking error.

Two measurements, each configuration in a fresh subprocess (peak RSS is that run's own):

* `memory`: peak RSS of `hallo_inputs.hallo_audio_features` (parity: the transformer attends over the whole track
  at 25 frames per second; fast: overlapping chunks) against the track's length, with the wav2vec2-base SHAPE
  (the config of facebook/wav2vec2-base-960h, Hallo's encoder, built locally with seeded random weights: memory
  and time depend on the shape only) on random-noise audio.
* `difference`: max and mean |fast - parity| per frame feature on a real speech file (espeak-ng, or any --speech
  file), with a seeded wav2vec2-base-shaped model and with the tiny wav2vec2 of the Hallo wav2vec golden
  (tests/goldens/hallo/wav2vec), relative to the features' own scale.

    python benchmarks/bench_hallo_audio.py --parity-minutes 1 2 4 --fast-minutes 1 4 10 --speech /tmp/speech.wav \
        --output benchmarks/results/hallo_audio_long.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAV2VEC_GOLDEN = ROOT / "tests" / "goldens" / "hallo" / "wav2vec" / "model"
#: facebook/wav2vec2-base-960h's config (the layer sizes that matter for memory and time).
WAV2VEC2_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "vocab_size": 32,
}


def base_shaped_model():
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config(**WAV2VEC2_BASE)).eval()
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True)
    return model, extractor


def golden_model():
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    model = Wav2Vec2Model.from_pretrained(WAV2VEC_GOLDEN, local_files_only=True).eval()
    return model, Wav2Vec2FeatureExtractor.from_pretrained(WAV2VEC_GOLDEN, local_files_only=True)


def run_memory(minutes: float, mode: str) -> dict:
    """One track length in this process: peak RSS before and after the features."""
    import numpy as np
    import torch

    from emo_pipeline.hallo_inputs import iter_hallo_audio_features

    model, extractor = base_shaped_model()
    samples = np.random.default_rng(0).standard_normal(round(minutes * 60 * 16000)).astype(np.float32) * 0.1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.inference_mode():
        chunks, total, _ = iter_hallo_audio_features(samples, model, extractor, mode=mode)
        frames = sum(chunk.shape[0] for chunk in chunks)  # the consumer keeps only what it needs
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert frames == total
    return {
        "minutes": minutes,
        "mode": mode,
        "frames": frames,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak),
        "rss_before_mb": round(before),
        "increase_mb": round(peak - before),
    }


def run_difference(speech: Path) -> dict:
    import numpy as np

    from emo_pipeline.audio import load_audio
    from emo_pipeline.hallo_inputs import hallo_audio_features

    samples = np.asarray(load_audio(str(speech), sample_rate=16000), dtype=np.float32).reshape(-1)
    result = {"speech": speech.name, "seconds": round(samples.size / 16000, 1)}
    for name, build in (("wav2vec2_base_shape_seed0", base_shaped_model), ("hallo_golden_tiny", golden_model)):
        model, extractor = build()
        parity, _ = hallo_audio_features(samples, model, extractor)
        fast, _ = hallo_audio_features(samples, model, extractor, mode="fast")
        diff = (fast - parity).abs()
        scale = parity.abs().mean().item()
        result[name] = {
            "frames": parity.shape[0],
            "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "mean_abs_feature": scale,
            "relative_mean_diff": diff.mean().item() / scale,
            "max_abs_diff_last_layer": diff[:, -1].max().item(),
            "frames_with_diff_over_1pct_of_scale": int((diff.amax(dim=(1, 2)) > 0.01 * scale).sum()),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parity-minutes", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    parser.add_argument("--fast-minutes", type=float, nargs="*", default=[1.0, 4.0, 10.0])
    parser.add_argument("--speech", type=Path, help="a speech file for the fast-vs-parity difference")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "hallo_audio_long.json")
    parser.add_argument("--child", nargs=2, metavar=("MINUTES", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-difference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_memory(float(args.child[0]), args.child[1])))
        return
    if args.child_difference:
        print(json.dumps(run_difference(args.child_difference)))
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    results: dict = {
        "cpu": cpu,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "model": "wav2vec2-base shape (facebook/wav2vec2-base-960h config, random weights), fp32, CPU",
        "memory": [],
    }
    import torch
    import transformers

    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    runs = [(m, "parity") for m in args.parity_minutes] + [(m, "fast") for m in args.fast_minutes]
    for minutes, mode in runs:
        command = [sys.executable, __file__, "--child", str(minutes), mode]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            entry = {"minutes": minutes, "mode": mode, "failed": done.stderr.strip().splitlines()[-1:]}
        else:
            entry = json.loads(done.stdout.strip().splitlines()[-1])
        print(entry, flush=True)
        results["memory"].append(entry)
    parity = [
        (e["minutes"], e["increase_mb"]) for e in results["memory"] if e["mode"] == "parity" and "failed" not in e
    ]
    if len(parity) >= 3:  # increase = a + b * minutes + c * minutes ** 2 (linear CNN, quadratic attention)
        import numpy as np

        coefficients = np.polyfit([m for m, _ in parity], [mb for _, mb in parity], 2)
        results["parity_increase_mb_fit"] = {
            "formula": "a * minutes**2 + b * minutes + c",
            "a_b_c": [round(float(c), 1) for c in coefficients],
            "extrapolated_mb": {str(m): round(float(np.polyval(coefficients, m))) for m in (5.0, 10.0)},
        }
    if args.speech:
        command = [sys.executable, __file__, "--child-difference", str(args.speech)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        results["difference"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(results["difference"])
    results["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
