"""Golden outputs of the metric reference implementations' own code on seeded random weights (not run in CI).

SyncNet: joonson/syncnet_python (MIT; imported at run time from ``--syncnet-src``, never copied here):
``SyncNetModel.S`` filled by ``emo_pipeline.evaluation.random_weights.fill_seeded`` (the same name-seeded values our
``SyncNetV2`` gets) and ``SyncNetInstance.evaluate`` run as released on the inputs of ``tests/metric_goldens.py``.
It records Sync-C (``conf``), the offset and the per-window distances per shift our ``sync_scores`` must reproduce.

Usage (the project's venv plus ``python_speech_features``)::

    git clone https://github.com/joonson/syncnet_python /tmp/syncnet_python   # any commit since 2020
    python tests/goldens/make_metric_goldens.py --syncnet-src /tmp/syncnet_python --output tests/goldens/metrics

Shims, applied at run time without editing syncnet_python's files:

1. ``.cuda()`` (module and tensor) is the identity: its code hard-codes CUDA; this runs on the CPU.
2. ``subprocess.call`` of ``evaluate`` runs ffmpeg twice on a video file; instead a stand-in writes what those two
   ffmpeg commands produce from our inputs: the frames as ``%06d.jpg`` files holding lossless PNG data (``cv2.imread``
   reads them by content, so no JPEG loss enters the comparison) and ``audio.wav``, 16 kHz mono 16-bit PCM converted
   from float as ffmpeg does (``lrintf(x * 32768)``, clipped).

FID needs no golden: pytorch-fid is installed with the test extra and the tests run its own ``get_activations``.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (metric_goldens)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (emo_pipeline)

from metric_goldens import SYNC_SEED, sync_inputs  # noqa: E402

from emo_pipeline.evaluation.random_weights import fill_seeded  # noqa: E402


def syncnet_golden(source: Path, output: Path) -> None:
    import cv2
    from scipy.io import wavfile

    torch.nn.Module.cuda = lambda self, *args, **kwargs: self  # shim 1
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(source))
    import SyncNetInstance as reference  # noqa: N813

    frames, audio = sync_inputs()

    def fake_ffmpeg(command: str, shell: bool = True, stdout=None) -> int:  # shim 2
        target = Path(command.split()[-1])
        if "image2" in command:
            for index, frame in enumerate(frames, start=1):
                ok, data = cv2.imencode(".png", frame)
                (target.parent / f"{index:06d}.jpg").write_bytes(data.tobytes())
        else:
            pcm = np.clip(np.rint(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
            wavfile.write(target, 16000, pcm)
        return 0

    reference.subprocess = types.SimpleNamespace(call=fake_ffmpeg)
    instance = reference.SyncNetInstance()
    fill_seeded(instance.__S__, SYNC_SEED)
    tmp = output / "_tmp"
    opt = types.SimpleNamespace(tmp_dir=str(tmp), reference="golden", batch_size=20, vshift=15)
    offset, conf, dists = instance.evaluate(opt, "unused.avi")
    mean_dists = dists.mean(axis=0)
    np.savez_compressed(
        output / "syncnet.npz",
        offset=np.asarray(offset),
        conf=np.asarray(conf),
        min_dist=np.asarray(mean_dists.min()),
        dists=dists.astype(np.float32),
    )
    import shutil

    shutil.rmtree(tmp)
    commit = (source / ".git").exists()
    (output / "syncnet.json").write_text(
        json.dumps(
            {
                "source": "joonson/syncnet_python SyncNetInstance.evaluate + SyncNetModel.S",
                "source_path": str(source),
                "git_checkout": commit,
                "seed": SYNC_SEED,
                "offset": int(offset),
                "conf": float(conf),
                "min_dist": float(mean_dists.min()),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )
    print(f"syncnet: offset {int(offset)} conf {float(conf):.4f} min_dist {float(mean_dists.min()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syncnet-src", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "metrics")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    syncnet_golden(args.syncnet_src, args.output)


if __name__ == "__main__":
    main()
