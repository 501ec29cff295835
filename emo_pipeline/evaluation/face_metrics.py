"""Frame-level face metrics: mouth landmarks (LMD, mouth opening), PSNR / SSIM, and face-identity similarity (CSIM).

* Landmarks: mediapipe 0.10.21's bundled face mesh (468 points, fully offline) in tracking mode, one video at a time.
  The mouth is mediapipe's `FACEMESH_LIPS` contour (40 points), in pixels of the reference video's frame size.
* LMD: the mean Euclidean distance (pixels) between corresponding mouth landmarks of the generated and the
  ground-truth frame, over landmarks and frames where both have a face.
* Mouth opening: inner-lip gap (points 13-14) over face height (points 10-152), per frame (the report's plot).
* PSNR / SSIM: OpenCV's `cv2.PSNR` (8-bit peak 255) and `cv2.quality.QualitySSIM` (Wang et al. 2004: Gaussian 11x11
  window, sigma 1.5) per RGB frame, SSIM averaged over the three channels; generated frames are resized to the
  ground truth's size (`cv2.INTER_AREA`) when the two differ.
* CSIM: cosine similarity of ArcFace embeddings (insightface's `glintr100.onnx` through onnxruntime, the face-analysis
  models Hallo ships; faces found and aligned by insightface's SCRFD `scrfd_10g_bnkps.onnx` with its 5 keypoints)
  between the portrait (or the ground truth's first frame) and every generated frame.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import numpy as np

from emo_pipeline.errors import EMOInputError

__all__ = [
    "FaceIdentity",
    "MouthTracker",
    "landmark_distance",
    "mouth_indices",
    "mouth_opening",
    "psnr",
    "ssim",
]


@functools.lru_cache(maxsize=1)
def mouth_indices() -> np.ndarray:
    """Indices of mediapipe's `FACEMESH_LIPS` contour points, sorted."""
    import mediapipe as mp

    return np.array(sorted({i for edge in mp.solutions.face_mesh.FACEMESH_LIPS for i in edge}))


class MouthTracker:
    """Face-mesh landmarks of one video's frames, in order: `track(frames)` -> `(T, 468, 2)` pixels (NaN: no face).

    `size` = `(width, height)` of the frame the coordinates are expressed in (default each frame's own size).
    """

    def __init__(self, size: tuple[int, int] | None = None):
        self.size = size

    def track(self, frames: Iterable[np.ndarray]) -> np.ndarray:
        import mediapipe as mp

        from emo_pipeline._native_log import quiet_native_logs

        points = []
        with (
            quiet_native_logs(),
            mp.solutions.face_mesh.FaceMesh(
                static_image_mode=False, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.5
            ) as mesh,
        ):
            for index, frame in enumerate(frames):
                frame = np.asarray(frame)
                if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                    raise EMOInputError(
                        f"frame {index}: expected (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}"
                    )
                result = mesh.process(np.ascontiguousarray(frame))
                if not result.multi_face_landmarks:
                    points.append(np.full((468, 2), np.nan))
                    continue
                width, height = self.size or (frame.shape[1], frame.shape[0])
                marks = result.multi_face_landmarks[0].landmark
                points.append(np.array([[p.x * width, p.y * height] for p in marks[:468]]))
        return np.asarray(points, dtype=np.float64).reshape(-1, 468, 2)


def landmark_distance(generated: np.ndarray, reference: np.ndarray) -> tuple[float, np.ndarray]:
    """LMD of two `(T, 468, 2)` landmark tracks (same pixel frame): `(mean, per-frame distances (NaN: no face))`.

    Raises:
        EMOInputError when no frame has a face in both.
    """
    count = min(len(generated), len(reference))
    mouth = mouth_indices()
    per_frame = np.linalg.norm(generated[:count, mouth] - reference[:count, mouth], axis=-1).mean(axis=-1)
    if not np.isfinite(per_frame).any():
        raise EMOInputError("no frame has a face in both the generated and the ground-truth video")
    return float(np.nanmean(per_frame)), per_frame


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over face height per frame of a `(T, 468, 2)` track (NaN where no face)."""
    gap = np.linalg.norm(landmarks[:, 13] - landmarks[:, 14], axis=-1)
    height = np.linalg.norm(landmarks[:, 10] - landmarks[:, 152], axis=-1)
    return gap / height


def _same_size(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    import cv2

    if generated.shape == reference.shape:
        return generated
    return cv2.resize(generated, (reference.shape[1], reference.shape[0]), interpolation=cv2.INTER_AREA)


def psnr(generated: np.ndarray, reference: np.ndarray) -> float:
    """PSNR (dB) of one uint8 RGB frame against the ground truth's (`cv2.PSNR`; identical frames give 361 dB, its
    cap)."""
    import cv2

    return float(cv2.PSNR(_same_size(generated, reference), reference))


def ssim(generated: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of one uint8 RGB frame against the ground truth's: `cv2.quality.QualitySSIM`, mean over channels."""
    import cv2

    score, _ = cv2.quality.QualitySSIM_compute(_same_size(generated, reference), reference)
    return float(np.mean(score[:3]))


class FaceIdentity:
    """ArcFace embeddings through insightface (onnxruntime): `embed(rgb_frame)` -> unit `(512,)` vector or None.

    `detection` / `recognition` are insightface model-zoo models (`SCRFD`, `ArcFaceONNX`); `from_files` loads them.
    Frames go to both as BGR (insightface works on cv2 images); the recognizer aligns the face with the detector's
    5 keypoints (`norm_crop` to 112x112) and normalises it itself.
    """

    def __init__(self, detection: Any, recognition: Any):
        self.detection = detection
        self.recognition = recognition

    @classmethod
    def from_files(
        cls, recognition_path: str | os.PathLike[str], detection_path: str | os.PathLike[str]
    ) -> FaceIdentity:
        try:
            from insightface.model_zoo import get_model
        except ImportError as error:
            raise EMOInputError(
                f"CSIM needs insightface and onnxruntime ({error}): pip install 'emo-pipeline[hallo]'"
            ) from error
        with contextlib.redirect_stdout(None):
            recognition = get_model(os.fspath(recognition_path), providers=["CPUExecutionProvider"])
            detection = get_model(os.fspath(detection_path), providers=["CPUExecutionProvider"])
            detection.prepare(ctx_id=-1, input_size=(640, 640), det_thresh=0.5)
            recognition.prepare(ctx_id=-1)
        return cls(detection, recognition)

    def embed(self, rgb_frame: np.ndarray) -> np.ndarray | None:
        bgr = np.ascontiguousarray(np.asarray(rgb_frame)[..., ::-1])
        boxes, keypoints = self.detection.detect(bgr, max_num=1)
        if len(boxes) == 0:
            return None
        face = SimpleNamespace(bbox=boxes[0, :4], kps=keypoints[0], det_score=boxes[0, 4])  # what get() reads
        embedding = np.asarray(self.recognition.get(bgr, face), dtype=np.float64)
        return embedding / np.linalg.norm(embedding)


def cosine(first: Any, second: Any) -> float:
    return float(np.dot(first, second) / (np.linalg.norm(first) * np.linalg.norm(second)))
