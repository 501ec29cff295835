"""Golden outputs of the metric reference implementations' own code on seeded random weights (not run in CI).

SyncNet: joonson/syncnet_python (MIT; imported at run time from ``--syncnet-src``, never copied here):
``SyncNetModel.S`` filled by ``emo_pipeline.evaluation.random_weights.fill_seeded`` (the same name-seeded values our
``SyncNetV2`` gets) and ``SyncNetInstance.evaluate`` run as released on the inputs of ``tests/metric_goldens.py``.
It records Sync-C (``conf``), the offset and the per-window distances per shift our ``sync_scores`` must reproduce.

Usage (the project's venv plus ``python_speech_features``)::

    git clone https://github.com/joonson/syncnet_python /tmp/syncnet_python   # the goldens: commit 6efbb1c3
    python tests/goldens/make_metric_goldens.py --syncnet-src /tmp/syncnet_python --output tests/goldens/metrics

Shims, applied at run time without editing syncnet_python's files:

1. ``.cuda()`` (module and tensor) is the identity: its code hard-codes CUDA; this runs on the CPU.
2. ``subprocess.call`` of ``evaluate`` runs ffmpeg twice on a video file; instead a stand-in writes what those two
   ffmpeg commands produce from our inputs: the frames as ``%06d.jpg`` files holding lossless PNG data (``cv2.imread``
   reads them by content, so no JPEG loss enters the comparison) and ``audio.wav``, 16 kHz mono 16-bit PCM converted
   from float as ffmpeg does (``lrintf(x * 32768)``, clipped).

The face-track crop: ``crop_video`` of syncnet_python's ``run_pipeline.py`` (a script that runs its whole pipeline at
import) is taken from the file's source with ``ast`` and executed verbatim on the frames and boxes of
``tests/metric_goldens.crop_inputs``, with three more shims: its frames are PNG data under ``%06d.jpg`` names (read
back losslessly by ``cv2.imread``), its ``cv2.VideoWriter`` records the 224x224 crops it is given instead of encoding
them as XVID, and its ffmpeg calls (audio cut and mux) write the wav it reads back. It records the crops our
``crop_face_track`` must equal.

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

from metric_goldens import SYNC_SEED, crop_inputs, sync_inputs  # noqa: E402

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
    (output / "syncnet.json").write_text(
        json.dumps(
            {
                "source": "joonson/syncnet_python SyncNetInstance.evaluate + SyncNetModel.S",
                "source_path": str(source),
                "commit": "6efbb1c305c23f47a62b09cf4215a8ac45e97d49 (the checkout these goldens were made from)",
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


def crop_golden(source: Path, output: Path) -> None:
    import ast
    import glob
    import os
    import shutil

    import cv2
    from scipy import signal
    from scipy.io import wavfile

    tree = ast.parse((source / "run_pipeline.py").read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "crop_video")
    frames, boxes = crop_inputs()
    work = output / "_crop_tmp"
    (work / "frames" / "golden").mkdir(parents=True, exist_ok=True)
    (work / "tmp" / "golden").mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames, start=1):
        ok, data = cv2.imencode(".png", np.ascontiguousarray(frame[..., ::-1]))  # stored as cv2 (BGR) would
        (work / "frames" / "golden" / f"{index:06d}.jpg").write_bytes(data.tobytes())
    recorded = []

    class RecordingWriter:  # shim: keeps the crops instead of encoding them as XVID
        def __init__(self, path, *args):
            Path(path).touch()

        def write(self, image):
            recorded.append(image.copy())

        def release(self):
            pass

    def fake_ffmpeg(command: str, shell: bool = True, stdout=None) -> int:  # audio cut + mux
        target = command.split()[-1]
        if target.endswith(".wav"):
            wavfile.write(target, 16000, np.zeros(640 * len(frames), np.int16))
        return 0

    cv2_shim = types.SimpleNamespace(
        VideoWriter=RecordingWriter, VideoWriter_fourcc=cv2.VideoWriter_fourcc, imread=cv2.imread, resize=cv2.resize
    )
    namespace = {
        "os": os, "glob": glob, "np": np, "cv2": cv2_shim, "signal": signal, "wavfile": wavfile,
        "subprocess": types.SimpleNamespace(call=fake_ffmpeg), "pdb": None,
    }  # fmt: skip
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(source / "run_pipeline.py"), "exec"), namespace)
    opt = types.SimpleNamespace(
        frames_dir=str(work / "frames"), tmp_dir=str(work / "tmp"), avi_dir=str(work / "tmp"), reference="golden",
        frame_rate=25, crop_scale=0.4,
    )  # fmt: skip
    namespace["crop_video"](opt, {"frame": np.arange(len(frames)), "bbox": boxes}, str(work / "crop"))
    np.savez_compressed(output / "syncnet_crop.npz", crops_bgr=np.stack(recorded))
    shutil.rmtree(work)
    print(f"crop: {len(recorded)} crops of {recorded[0].shape}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syncnet-src", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "metrics")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    syncnet_golden(args.syncnet_src, args.output)
    crop_golden(args.syncnet_src, args.output)


if __name__ == "__main__":
    main()
