"""Weight memory and frame difference of each quantization recipe that runs on this machine. Writes json.

    python benchmarks/bench_quantization.py     # tiny random pipeline -> results/quantization_tiny.json

Rows: fp32 (the reference), torchao `int8` loaded with `EMOPipeline.from_pretrained(..., quantization_config=...)`,
and bitsandbytes `bnb-8bit` / `bnb-4bit` where bitsandbytes is installed. diffusers' bitsandbytes loader needs a GPU,
so on a machine without one those rows are built in place (`replace_linear_with_bitsandbytes`, bitsandbytes' CPU
backend): the same layers the loader builds. Memory: `get_memory_footprint()` of the backbone and the ReferenceNet (the
bytes the parameters and buffers occupy; bitsandbytes counts its packed int8 / 4-bit storage).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from emo_pipeline import EMOPipeline  # noqa: E402
from emo_pipeline.quantization import quantization_config, replace_linear_with_bitsandbytes  # noqa: E402
from emo_pipeline.testing import tiny_emo_pipeline  # noqa: E402
from tests.pipeline_settings import IMAGE, settings, speech  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="bench_quant_")
    tiny_emo_pipeline().save_pretrained(folder)
    result = {
        "model": "tiny random",
        "device": "cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {cpu_model()}",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "bitsandbytes_rows": "built in place (no GPU: diffusers' bitsandbytes loader refuses a CPU)"
        if not torch.cuda.is_available()
        else "built in place",
        "rows": {},
    }
    reference = None
    for row in ("fp32", "int8", "bnb-8bit", "bnb-4bit"):
        try:
            kwargs = {"quantization_config": quantization_config(row)} if row == "int8" else {}
            pipe = EMOPipeline.from_pretrained(folder, **kwargs)
            if row.startswith("bnb"):
                for name in ("unet", "reference_net"):
                    replace_linear_with_bitsandbytes(getattr(pipe, name), row)
        except ImportError as error:
            result["rows"][row] = {"error": f"not installed: {error}"}
            continue
        pipe.set_progress_bar_config(disable=True)
        frames = pipe(IMAGE, speech(0.2), **settings()).frames
        entry = {name: getattr(pipe, name).get_memory_footprint() for name in ("unet", "reference_net")}
        entry = {f"{name}_bytes": size for name, size in entry.items()}
        if reference is None:
            reference = frames
        else:
            entry["max_abs_difference_to_fp32"] = round(float(np.abs(frames - reference).max()), 5)
            entry["mean_abs_difference_to_fp32"] = round(float(np.abs(frames - reference).mean()), 6)
        result["rows"][row] = entry
        print(row, json.dumps(entry), flush=True)
    out = HERE / "results" / "quantization_tiny.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
