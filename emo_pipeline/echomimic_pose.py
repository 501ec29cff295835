"""EchoMimic's pose condition: a driving video's face-mesh landmarks, rendered as EchoMimic renders them.

EchoMimic's pose variants (antgroup/echomimic, Apache-2.0: `infer_audio2vid_pose*.py`) feed their 3-channel face
locator one image per output frame: the driving face's mediapipe landmarks drawn by `FaceMeshVisualizer(
draw_iris=False, draw_mouse=False).draw_landmarks` (`src/utils/draw_utils.py`) on a black 512 x 512 canvas, resized
to the output size, divided by 255. Drawn (mediapipe's own connection sets, `cv2.line`, thickness 2):

* eyes and eyebrows: `FACEMESH_LEFT_EYE` (180, 200, 10), `FACEMESH_RIGHT_EYE` (10, 200, 180),
  `FACEMESH_LEFT_EYEBROW` (180, 220, 10), `FACEMESH_RIGHT_EYEBROW` (10, 220, 180), in that order;
* then 6 x 6 squares at the pupils, landmark 468 (10, 200, 250) and 473 (250, 200, 10), and at the nose tip,
  landmark 4 (200, 200, 200); no mouth, iris rings or face oval.

Colours are written into the channels as given (EchoMimic never converts the render's channel order). Landmark
coordinates are normalised to the driving frame, rounded to float32 (mediapipe's landmark protobuf), and placed as
mediapipe's `draw_landmarks` places them: `min(floor(x * 512), 511)`, skipped outside [0, 1]; the squares at
`int(512 * x)` (skipped at x >= 1 or x < 0), rows/columns `[p - 3, p + 3)`.

Landmarks: EchoMimic's scripts read pre-extracted `.pkl` files (`assets/test_pose_demo_pose`: mediapipe landmarks of
a driving video's frames, centre-cropped to a square and resized to 512 x 512, in 512-pixel units). Here
`pose_video_landmarks` extracts them from the video itself, with the same crop and resize, by mediapipe 0.10.21's
face mesh (`refine_landmarks=True`: 478 points with the iris, each frame on its own, as EchoMimic's `LMKExtractor`
runs its face landmarker in IMAGE mode). EchoMimic's extractor is the Tasks API's `face_landmarker_v2` bundle, which
mediapipe's wheel does not ship; the face mesh model it bundles gives landmarks within a few pixels of it
(tests/test_echomimic_pose.py measures both on the same frames).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from emo_pipeline.errors import EMOInputError

__all__ = [
    "POSE_CANVAS",
    "PoseTrack",
    "frame_landmarks",
    "pose_source_frames",
    "pose_video_landmarks",
    "render_pose",
    "render_poses",
]

POSE_CANVAS = 512  # draw_utils.py draw_landmarks: ini_size = [512, 512]; img_utils.py pils_from_video: 512 x 512
LINE_THICKNESS = 2  # draw_utils.py f_thick
POINT_HALF_WIDTH = 3  # draw_points(..., 3) for the pupils and the nose
NUM_LANDMARKS = 478  # face mesh with iris (refine_landmarks=True), as EchoMimic's face landmarker
# draw_utils.py: pupil_landmark_spec {468: right_iris_draw, 473: left_iris_draw}, then nose_landmark_spec {4: nose}
POINTS = ((468, (10, 200, 250)), (473, (250, 200, 10)), (4, (200, 200, 200)))


@cache
def _connection_colours() -> tuple[tuple[tuple[int, int], tuple[int, int, int]], ...]:
    """The drawn face-mesh edges and their colours, in EchoMimic's drawing order (a later set recolours an edge it
    shares with an earlier one, as EchoMimic's dict assignment does)."""
    import mediapipe as mp

    mesh = mp.solutions.face_mesh
    colours: dict[tuple[int, int], tuple[int, int, int]] = {}
    for edges, colour in (
        (mesh.FACEMESH_LEFT_EYE, (180, 200, 10)),
        (mesh.FACEMESH_RIGHT_EYE, (10, 200, 180)),
        (mesh.FACEMESH_LEFT_EYEBROW, (180, 220, 10)),
        (mesh.FACEMESH_RIGHT_EYEBROW, (10, 220, 180)),
    ):
        for edge in edges:
            colours[edge] = colour
    return tuple(colours.items())


def _on_canvas(value: float) -> bool:
    """mediapipe's `_normalized_to_pixel_coordinates` test: inside [0, 1] up to `math.isclose`."""
    return (value > 0 or math.isclose(0, value)) and (value < 1 or math.isclose(1, value))


def render_pose(landmarks: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """`(N >= 478, 2)` landmarks normalised to the driving frame (x right, y down; None: no face) -> `(height,
    width, 3)` uint8: EchoMimic's render (module docstring) on the 512 x 512 canvas, resized with `cv2.resize`
    (bilinear) to the output size."""
    import cv2

    canvas = np.zeros((POSE_CANVAS, POSE_CANVAS, 3), np.uint8)
    if landmarks is not None:
        points = np.asarray(landmarks, dtype=np.float32)[:, :2].astype(np.float64).tolist()
        pixels = {
            index: (
                min(math.floor(x * POSE_CANVAS), POSE_CANVAS - 1),
                min(math.floor(y * POSE_CANVAS), POSE_CANVAS - 1),
            )
            for index, (x, y) in enumerate(points)
            if _on_canvas(x) and _on_canvas(y)
        }
        for (start, end), colour in _connection_colours():
            if start in pixels and end in pixels:
                cv2.line(canvas, pixels[start], pixels[end], colour, LINE_THICKNESS)
        half = POINT_HALF_WIDTH
        for index, colour in POINTS:
            if index >= len(points):
                continue
            x, y = points[index]
            if not (0 <= x < 1 and 0 <= y < 1):
                continue
            column, row = int(POSE_CANVAS * x), int(POSE_CANVAS * y)
            canvas[row - half : row + half, column - half : column + half, :] = colour  # EchoMimic's slice, as is
    return cv2.resize(canvas, (width, height))


def render_poses(landmarks: np.ndarray, width: int, height: int):
    """`(F, 478, 2)` normalised landmarks -> `(F, 3, height, width)` float32 torch tensor in [0, 1]: the pose
    variants' face-locator input (EchoMimic: `render / 255.0`, channels first)."""
    import torch

    frames = np.stack([render_pose(frame, width, height) for frame in landmarks])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255.0)


# ------------------------------------------------------------------------------------------------ extraction


@dataclass
class PoseTrack:
    """The pose condition of one video: `landmarks` `(num_frames, 478, 2)` float32, normalised to the driving
    frame's centre square, one row per output frame; `source_frames` `(num_frames,)` the pose video's frame each
    output frame took; `source_fps` the pose video's frame rate."""

    landmarks: np.ndarray
    source_frames: np.ndarray
    source_fps: float


def pose_source_frames(num_frames: int, fps: float, source_fps: float) -> np.ndarray:
    """Output frame i (shown from t = i / fps) takes the pose-video frame on screen at t: `floor(i * source_fps /
    fps)` (a 1e-6 frame tolerance for float rates). Equal rates: frame i -> frame i, as EchoMimic's scripts pair
    pose file i with output frame i; other rates are resampled by time (frames repeated or skipped), never
    stretched."""
    return np.floor(np.arange(num_frames) * (source_fps / fps) + 1e-6).astype(np.int64)


def _centre_square(frame: np.ndarray) -> np.ndarray:
    """img_utils.py `center_crop_cv2`: the centre square (offset `(long - short) // 2`)."""
    height, width = frame.shape[:2]
    if height > width:
        return frame[(height - width) // 2 : (height - width) // 2 + width]
    return frame[:, (width - height) // 2 : (width - height) // 2 + height]


def _describe_frames(indices: list[int], fps: float) -> str:
    shown = ", ".join(f"{i} ({i / fps:.2f} s)" for i in indices[:8])
    return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")


class _FaceMesh:
    """mediapipe 0.10.21's face mesh as EchoMimic's extractor runs: `(H, W, 3)` uint8 RGB frame -> centre square,
    `cv2.resize` to 512 x 512 (bilinear) -> `(478, 2)` float32 normalised landmarks of one face, or None."""

    def __enter__(self) -> _FaceMesh:
        import contextlib

        import mediapipe as mp

        from emo_pipeline._native_log import quiet_native_logs

        # the graph's worker threads print their start-up lines during the first frames, after `process` returns:
        # keep descriptor 2 captured for the whole extraction (lines that are not that noise are replayed)
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(quiet_native_logs())
        self.mesh = self.stack.enter_context(
            mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.5
            )
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        import cv2

        square = cv2.resize(np.ascontiguousarray(_centre_square(frame)), (POSE_CANVAS, POSE_CANVAS))
        result = self.mesh.process(square)
        if not result.multi_face_landmarks:
            return None
        return np.array([(m.x, m.y) for m in result.multi_face_landmarks[0].landmark], dtype=np.float32)


def frame_landmarks(frames: Any) -> list[np.ndarray | None]:
    """`pose_video_landmarks` on decoded frames: each `(H, W, 3)` uint8 RGB frame -> `(478, 2)` landmarks or None."""
    with _FaceMesh() as mesh:
        return [mesh(np.asarray(frame)) for frame in frames]


def pose_video_landmarks(path: Any, num_frames: int, fps: float, chunk: int = 32) -> PoseTrack:
    """Face-mesh landmarks of the pose-video frame under each of `num_frames` output frames at `fps`
    (`pose_source_frames`). Each frame: centre square, `cv2.resize` to 512 x 512 (bilinear), mediapipe 0.10.21 face
    mesh with iris, one face, each frame on its own (as EchoMimic's `LMKExtractor` in IMAGE mode).

    Raises `EMOInputError` naming `pose_video` when the file is missing or not a readable video, when it is shorter
    than the audio (it must cover every output frame), or when any used frame has no face (EchoMimic's extraction
    stops at such a frame too: "bad video, face not detected"; the message lists them, so the video can be trimmed).
    Memory: the landmarks of the used frames (3.8 KB a frame); frames are decoded `chunk` at a time.
    """
    from emo_pipeline.media import read_video_frames, read_video_info

    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if name is None:
        raise EMOInputError(f"pose_video must be a path to a video file, got {type(path).__name__}")
    try:
        info = read_video_info(name)
    except EMOInputError as error:
        raise EMOInputError(f"pose_video: {error}; pass a readable video of the driving face") from None
    sources = pose_source_frames(num_frames, fps, info.fps)
    if num_frames and sources[-1] >= info.num_frames:
        raise EMOInputError(
            f"pose_video {name!r} is shorter than the audio: it has {info.num_frames} frames at {info.fps:g} fps "
            f"({info.duration:.2f} s), the video needs {num_frames} frames at {fps:g} fps ({num_frames / fps:.2f} s); "
            "pass a longer pose video or a shorter track"
        )
    unique = np.unique(sources)
    found: dict[int, np.ndarray] = {}
    missing: list[int] = []
    with _FaceMesh() as mesh:
        for start in range(0, len(unique), chunk):
            indices = unique[start : start + chunk]
            try:
                frames = read_video_frames(name, indices)
            except EMOInputError as error:
                raise EMOInputError(f"pose_video: {error}") from None
            for index, frame in zip(indices.tolist(), frames):
                marks = mesh(frame)
                if marks is None:
                    missing.append(index)
                else:
                    found[index] = marks
    if not found:
        raise EMOInputError(
            f"pose_video {name!r}: no face found in any of its {len(unique)} frames used: pass a video of a face"
        )
    if missing:
        raise EMOInputError(
            f"pose_video {name!r}: no face found in {len(missing)} of its {len(unique)} frames used: frames "
            f"{_describe_frames(missing, info.fps)}; every frame needs the face (EchoMimic's extraction stops at such "
            "a frame too): trim or re-cut the video"
        )
    landmarks = np.stack([found[int(i)] for i in sources]) if num_frames else np.zeros((0, NUM_LANDMARKS, 2))
    return PoseTrack(landmarks=landmarks.astype(np.float32), source_frames=sources, source_fps=info.fps)
