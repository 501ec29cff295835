"""Golden of EchoMimic's pose condition: its own landmark extractor and landmark renderer (not run in CI).

Runs EchoMimic's ``LMKExtractor`` (src/utils/mp_utils.py: mediapipe's Tasks face landmarker with EchoMimic's
bundled ``face_landmarker_v2_with_blendshapes.task``) and ``FaceMeshVisualizer(draw_iris=False, draw_mouse=False)
.draw_landmarks`` (src/utils/draw_utils.py, as ``infer_audio2vid_pose*.py`` build it) on a few frames of a tiny
synthetic driving video (the package's bundled portrait, moved and scaled, on a 160 x 120 grey frame), after the
crop and resize its scripts apply to driving frames (img_utils.py ``center_crop_cv2`` then ``cv2.resize`` to 512).
EchoMimic's code is imported at run time from ``--echomimic-src``, never copied here.

Recorded (``tests/goldens/echomimic/pose_golden.npz``, compressed):

* ``frames``: the driving frames, ``(N, 120, 160, 3)`` uint8 RGB (the inputs of both extractors);
* ``landmarks``: EchoMimic's extractor's landmarks ``(N, 478, 3)`` (normalised x, y; z) of each frame;
* ``render_512`` / ``render_96`` / ``render_80x64``: its renders of those landmarks, ``draw_landmarks((W, H),
  lmks[:, :2], normed=True)`` (``demo_motion_sync.py``'s call; the pose scripts' ``.pkl`` files hold the same
  landmarks in 512-pixel units, divided by (W, H) = 512 there);
* ``edge_landmarks`` / ``edge_render_512``: landmarks moved partly off the canvas and to its borders (the skipped
  points and the clipped pupil squares).

Usage (EchoMimic's venv, see make_echomimic_goldens.py; plus mediapipe, as EchoMimic's requirements.txt)::

    /work/venvs/echomimic/bin/pip install --no-deps mediapipe==0.10.21
    /work/venvs/echomimic/bin/pip install absl-py attrs flatbuffers "protobuf<5" matplotlib
    /work/venvs/echomimic/bin/python tests/goldens/make_echomimic_pose_golden.py --echomimic-src /tmp/echomimic

Shims: ``img_utils.py`` imports IPython and imageio_ffmpeg (not installed), so its ``center_crop_cv2`` is executed
verbatim from the file's source with ``ast``; ``mp_utils`` and ``draw_utils`` import as released
(opencv-python-headless stands in for the opencv-contrib-python that mediapipe's wheel asks for: the same cv2).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "tests" / "goldens" / "echomimic" / "pose_golden.npz"
PORTRAIT = ROOT / "emo_pipeline" / "assets" / "portrait.png"
# (x offset, y offset, face size) of the portrait in each 160 x 120 driving frame
PLACEMENTS = ((20, 0, 120), (30, -4, 124), (14, 6, 112))


def driving_frames() -> np.ndarray:
    """`(3, 120, 160, 3)` uint8 RGB: the portrait moved and scaled on grey (cv2 only, so either venv can build it)."""
    portrait = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    frames = []
    for dx, dy, size in PLACEMENTS:
        face = cv2.resize(portrait, (size, size), interpolation=cv2.INTER_AREA)
        shift = np.float32([[1, 0, dx], [0, 1, dy]])
        frames.append(cv2.warpAffine(face, shift, (160, 120), borderValue=(90, 90, 90)))
    return np.stack(frames)


def _own_function(path: Path, name: str):
    """EchoMimic's function `name`, executed verbatim from its file's source (the module imports IPython and
    imageio_ffmpeg, which its venv lacks)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {"np": np, "cv2": cv2}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echomimic-src", required=True, help="a checkout of github.com/antgroup/echomimic")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.echomimic_src).resolve()))
    from src.utils.draw_utils import FaceMeshVisualizer
    from src.utils.mp_utils import LMKExtractor

    center_crop_cv2 = _own_function(Path(args.echomimic_src) / "src" / "utils" / "img_utils.py", "center_crop_cv2")

    frames = driving_frames()
    extractor = LMKExtractor()
    visualizer = FaceMeshVisualizer(draw_iris=False, draw_mouse=False)  # infer_audio2vid_pose*.py
    landmarks = []
    for frame in frames:
        bgr = cv2.resize(center_crop_cv2(frame[:, :, ::-1]), (512, 512))  # pils_from_video + infer_*_pose_acc.py
        result = extractor(np.ascontiguousarray(bgr))
        assert result is not None, "EchoMimic's extractor found no face"
        landmarks.append(result["lmks"])
    landmarks = np.stack(landmarks)

    def render(size, marks):
        return np.stack([visualizer.draw_landmarks(size, m[:, :2], normed=True) for m in marks])

    rng = np.random.default_rng(0)
    edge = landmarks[:1, :, :2].repeat(3, axis=0).copy()
    edge[0, :, 0] += 0.998 - edge[0, 468, 0]  # the right pupil at the right border: points off the canvas
    edge[1] -= edge[1][468] - (0.001, 0.002)  # the right pupil at the top-left corner: negative slice starts
    edge[2] = rng.uniform(-0.1, 1.1, size=edge[2].shape)  # anywhere, some outside
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUTPUT,
        frames=frames,
        landmarks=landmarks.astype(np.float32),
        render_512=render((512, 512), landmarks),
        render_96=render((96, 96), landmarks),
        render_80x64=render((80, 64), landmarks),
        edge_landmarks=edge.astype(np.float32),
        edge_render_512=render((512, 512), edge),
    )
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
