"""Hallo's conditioning front end: what Hallo computes from the portrait and the audio before the networks run.

Hallo ("Hierarchical Audio-Driven Visual Synthesis for Portrait Image Animation", Xu et al. 2024, arXiv
2406.08801; fudan-generative-vision/hallo at commit 8fd7c572, MIT) conditions its denoiser on

* face landmarks (mediapipe, 478 points) -> a face box, a lip box, and from them the FaceLocator input and the
  full / face / lip attention masks at the four UNet levels (`hallo/utils/util.py:get_mask` and
  `hallo/datasets/image_processor.py:ImageProcessor.preprocess`) -> `hallo_face_landmarks`, `hallo_face_masks`;
* an insightface identity embedding of the largest face (`ImageProcessor.preprocess`) -> `hallo_face_embedding`;
* wav2vec2 hidden states of every layer, one row per video frame, with the CNN features linearly interpolated to
  the frame count before the transformer (`hallo/datasets/audio_processor.py`, `hallo/models/wav2vec.py`), and
  Hallo2's per-segment variant for long audio (fudan-generative-vision/hallo2, `scripts/inference_long.py`)
  -> `hallo_audio_features`, `hallo_audio_windows`;
* optionally the vocals separated from music by audio-separator -> `separate_vocals`.

Each function re-states Hallo's computation with the same OpenCV / PIL / transformers operations, so the results
equal Hallo's own (tests/test_hallo_inputs.py checks them against goldens made from Hallo's code). Hallo writes
its intermediate masks to PNG files and reads them back; PNG is lossless for these uint8 images, so the arrays are
used directly here. insightface, onnxruntime and audio-separator are an optional extra:
`pip install "emo-pipeline[hallo]"`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from emo_pipeline.errors import EMOInputError
from emo_pipeline.hallo_audio import (
    HALLO_AUDIO_MODES,
    HALLO_CHUNK_CONTEXT_SECONDS,
    HALLO_CHUNK_SECONDS,
    hallo2_segment_bounds,
    hallo_audio_features,
    hallo_audio_windows,
    iter_hallo_audio_features,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "HALLO_AUDIO_MODES",
    "HALLO_CHUNK_CONTEXT_SECONDS",
    "HALLO_CHUNK_SECONDS",
    "HALLO_FACE_ANALYSIS_FILES",
    "HALLO_LIP_IDS",
    "HALLO_SILHOUETTE_IDS",
    "HalloFaceMasks",
    "hallo2_segment_bounds",
    "hallo_audio_features",
    "hallo_audio_windows",
    "hallo_face_embedding",
    "hallo_face_landmarks",
    "hallo_face_masks",
    "iter_hallo_audio_features",
    "separate_vocals",
]

#: Face-oval landmark ids of the 478-point mediapipe mesh whose bounding box is Hallo's face box (util.py:323).
HALLO_SILHOUETTE_IDS = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288,
    397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136,
    172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
#: Outer-lip landmark ids whose bounding box is Hallo's lip box (util.py:328).
HALLO_LIP_IDS = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375)

#: Latent downsampling of the four UNet levels the attention masks are made for (image_processor.py:74-101).
MASK_LEVEL_DIVISORS = (8, 16, 32, 64)
#: Hallo blurs the face and lip boxes at this resolution (util.py: blur_mask's resize_dim), whatever the image size.
BLUR_RESOLUTION = (64, 64)
FACE_BLUR_KERNEL = (51, 51)  # util.py:511 get_mask
_MASK_SOURCES = (("full", "sep_background"), ("face", "sep_face"), ("lip", "sep_lip"))  # kind -> get_mask's PNG
LIP_BLUR_KERNEL = (31, 31)  # util.py:514 get_mask

#: insightface models Hallo's face embedding needs, in `<face_analysis_dir>/models/` (Hallo's README download
#: layout): the SCRFD detector (its keypoints align the face) and the ArcFace recognition model (the embedding).
HALLO_FACE_ANALYSIS_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
#: audio-separator's default vocal model in Hallo's configs (audio_separator.model_path).
DEFAULT_VOCAL_MODEL = "Kim_Vocal_2.onnx"
#: Model lists audio-separator reads from its model folder and downloads when absent (Hallo's download ships them in
#: pretrained_models/audio_separator): with them present it runs offline.
AUDIO_SEPARATOR_DATA_FILES = ("download_checks.json", "mdx_model_data.json", "vr_model_data.json")

_HALLO_EXTRA = 'pip install "emo-pipeline[hallo]"'


# ----------------------------------------------------------------------------------------------------------------
# Landmarks and masks
# ----------------------------------------------------------------------------------------------------------------


def hallo_face_landmarks(image: Image.Image, *, min_confidence: float = 0.5) -> np.ndarray:
    """478 face-mesh landmarks of the portrait, in pixels, as Hallo's `get_landmark` returns them (util.py:351).

    Hallo runs mediapipe's FaceLandmarker (`face_landmarker_v2_with_blendshapes.task`); this runs the face mesh
    bundled with mediapipe 0.10.21 (`FaceMesh(static_image_mode=True, refine_landmarks=True)`: the same 478-point
    topology, nothing to download). The two are different model releases, so the points can differ somewhat (not
    measured: the .task file is not available offline); Hallo only uses the bounding boxes of the face oval and the
    lips, so a box edge may move by a few pixels.

    Args:
        image: the portrait (RGB or convertible to it).
        min_confidence: mediapipe's detection threshold.

    Returns:
        `(478, 2)` float64 `(x, y)` pixel coordinates (`x = landmark.x * width`, `y = landmark.y * height`) of the
        most prominent face.

    Raises:
        EMOInputError naming the image if no face is found.
    """
    import mediapipe as mp

    from emo_pipeline._native_log import quiet_native_logs

    if not isinstance(image, Image.Image):
        raise EMOInputError(f"hallo_face_landmarks expects a PIL image, got {type(image).__name__}")
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    height, width = pixels.shape[:2]
    with (
        quiet_native_logs(),
        mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=float(min_confidence),
        ) as mesh,
    ):
        result = mesh.process(pixels)
    if not result.multi_face_landmarks:
        name = getattr(image, "filename", "") or ""
        label = f"portrait {name!r}" if name else "portrait"
        raise EMOInputError(
            f"no face landmarks found in the {label} ({width}x{height}); Hallo needs one clearly visible face: "
            "pass a clearer frontal portrait (face unobstructed, at least ~100 px wide)"
        )
    points = result.multi_face_landmarks[0].landmark
    return np.array([[point.x * width, point.y * height] for point in points], dtype=np.float64)


@dataclass
class HalloFaceMasks:
    """Hallo's mask conditioning of one portrait (image_processor.py:143-180).

    Attributes:
        face_region: `(1, 3, size, size)` float32 in [0, 1], the FaceLocator input: the expanded face box of the
            whole image resized to `size` x `size` (bilinear, so the box edge is soft); the 3 channels are equal.
        region_masks: level -> `(full, face, lip)`, each `(1, r * r)` float32 in [0, 1] (row-major y, x) with
            `r = size / 8, size / 16, size / 32, size / 64` for levels 0..3: "full" is the background / pose
            mask (1 - blurred face box), "face" the blurred face box minus the blurred lip box, "lip" the blurred
            lip box. Hallo repeats each to `(frames, r * r)` per clip.
        face_box: `(x0, x1, y0, y1)` pixel box of the face mask in the source image (after expansion).
        lip_box: the same for the lip mask.
    """

    face_region: torch.Tensor
    region_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    face_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    lip_box: tuple[int, int, int, int] = (0, 0, 0, 0)


def _expand_region(
    region: list[float], image_w: int, image_h: int, expand_ratio: float = 1.0
) -> tuple[int, int, int, int]:
    """Hallo's `expand_region` (util.py:529-564), statement for statement: float floor divisions, shifts into the
    image, Python's round-half-to-even. A box larger than the image can end with a negative start, as in Hallo."""
    min_x, max_x, min_y, max_y = region
    mid_x = (max_x + min_x) // 2
    side_len_x = (max_x - min_x) * expand_ratio
    mid_y = (max_y + min_y) // 2
    side_len_y = (max_y - min_y) * expand_ratio
    min_x = mid_x - side_len_x // 2
    max_x = mid_x + side_len_x // 2
    min_y = mid_y - side_len_y // 2
    max_y = mid_y + side_len_y // 2
    if min_x < 0:
        max_x -= min_x
        min_x = 0
    if max_x > image_w:
        min_x -= max_x - image_w
        max_x = image_w
    if min_y < 0:
        max_y -= min_y
        min_y = 0
    if max_y > image_h:
        min_y -= max_y - image_h
        max_y = image_h
    return round(min_x), round(max_x), round(min_y), round(max_y)


def _box_mask(
    landmarks: np.ndarray, ids: tuple[int, ...], height: int, width: int, expand_ratio: float
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Hallo's `get_lip_mask` / `get_face_mask` (util.py:407-476): the expanded bounding box of `ids`, 255 inside."""
    points = np.take(landmarks, list(ids), 0)
    min_xy = np.round(np.min(points, 0))  # numpy rounds half to even, like Hallo
    max_xy = np.round(np.max(points, 0))
    box = _expand_region([min_xy[0], max_xy[0], min_xy[1], max_xy[1]], width, height, expand_ratio)
    min_x, max_x, min_y, max_y = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[min_y:max_y, min_x:max_x] = 255
    return mask, box


def _blur_mask(mask: np.ndarray, kernel_size: tuple[int, int]) -> np.ndarray:
    """Hallo's `blur_mask` (util.py:589-608): resize to 64x64 (bilinear), Gaussian blur, min-max normalise."""
    import cv2

    resized = cv2.resize(mask, BLUR_RESOLUTION)
    blurred = cv2.GaussianBlur(resized, kernel_size, 0)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)


def _hallo_mask_images(
    image_size: tuple[int, int], landmarks: np.ndarray, face_expand_ratio: float, lip_expand_ratio: float
) -> dict[str, Any]:
    """The uint8 images Hallo's `get_mask` (util.py:497-527) writes to its cache folder, keyed by the file suffix."""
    import cv2

    height, width = image_size
    lip_mask, lip_box = _box_mask(landmarks, HALLO_LIP_IDS, height, width, lip_expand_ratio)
    face_mask, face_box = _box_mask(landmarks, HALLO_SILHOUETTE_IDS, height, width, face_expand_ratio)
    face_mask_blur = _blur_mask(face_mask, FACE_BLUR_KERNEL)
    sep_lip = _blur_mask(lip_mask, LIP_BLUR_KERNEL)
    # get_background_mask (util.py:611-635): the float round trip truncates, e.g. 255 - 3 can become 251
    sep_background = ((1.0 - face_mask_blur / 255.0) * 255).astype(np.uint8)
    sep_face = cv2.subtract(face_mask_blur, sep_lip)  # get_sep_face_mask (util.py:638-665): saturating
    return {
        "face_mask": face_mask,
        "lip_mask": lip_mask,
        "face_mask_blur": face_mask_blur,
        "sep_lip": sep_lip,
        "sep_background": sep_background,
        "sep_face": sep_face,
        "face_box": face_box,
        "lip_box": lip_box,
    }


def _resize_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """torchvision `Compose([Resize((size, size)), ToTensor()])` on a PIL image: PIL bilinear, uint8 / 255."""
    import torch

    array = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def _check_landmarks(landmarks: Any) -> np.ndarray:
    array = np.asarray(landmarks, dtype=np.float64)
    needed = max(max(HALLO_SILHOUETTE_IDS), max(HALLO_LIP_IDS)) + 1
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < needed:
        raise EMOInputError(
            f"landmarks must be (478, 2) pixel (x, y) face-mesh points (hallo_face_landmarks), got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise EMOInputError("landmarks contain NaN or infinite values; recompute them with hallo_face_landmarks")
    return array


def hallo_face_masks(
    image_size: tuple[int, int],
    landmarks: np.ndarray,
    size: int,
    *,
    face_expand_ratio: float = 1.2,
    lip_expand_ratio: float = 2.0,
) -> HalloFaceMasks:
    """Hallo's FaceLocator input and full / face / lip attention masks from face landmarks.

    Reproduces `get_mask` (util.py:497-527: face box = silhouette box x `face_expand_ratio`, lip box = lip box x
    `lip_expand_ratio`; both blurred at 64x64 with 51 / 31 px kernels; background = 255 - face; face = face - lip)
    and `ImageProcessor.preprocess` (image_processor.py:143-180: PIL bilinear resizes to `size` and the four latent
    resolutions) exactly, with the same OpenCV and PIL operations.

    Args:
        image_size: `(H, W)` of the image the landmarks are in pixels of (any aspect; Hallo resizes the face mask
            to `size` x `size` without keeping the aspect, as it does the portrait).
        landmarks: `(478, 2)` float pixel `(x, y)` points (`hallo_face_landmarks`).
        size: the generated video's side in pixels (Hallo: 512); a multiple of 64 so every level is whole.
        face_expand_ratio: Hallo's `face_expand_ratio` (default.yaml: 1.2).
        lip_expand_ratio: `get_lip_mask`'s `expand_ratio` (2.0, not configurable in Hallo).

    Returns:
        `HalloFaceMasks`; see its fields for shapes.
    """
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        raise EMOInputError(f"image_size must be (H, W) positive ints, got {image_size!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 64 or size % 64:
        raise EMOInputError(
            f"size must be a positive multiple of 64 (the masks are made at size / 8 ... size / 64), got {size!r}"
        )
    for name, ratio in (("face_expand_ratio", face_expand_ratio), ("lip_expand_ratio", lip_expand_ratio)):
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
            raise EMOInputError(f"{name} must be a positive number, got {ratio!r}")
    height, width = (int(v) for v in image_size)
    size = int(size)
    images = _hallo_mask_images((height, width), _check_landmarks(landmarks), face_expand_ratio, lip_expand_ratio)

    face_region = _resize_to_tensor(Image.fromarray(images["face_mask"]).convert("RGB"), size)  # cond_transform
    sources = {kind: Image.fromarray(images[key]) for kind, key in _MASK_SOURCES}
    region_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for level, divisor in enumerate(MASK_LEVEL_DIVISORS):
        side = size // divisor
        full, face, lip = (_resize_to_tensor(sources[kind], side).view(1, -1) for kind in ("full", "face", "lip"))
        region_masks[level] = (full, face, lip)
    return HalloFaceMasks(
        face_region=face_region.unsqueeze(0),
        region_masks=region_masks,
        face_box=images["face_box"],
        lip_box=images["lip_box"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Identity embedding
# ----------------------------------------------------------------------------------------------------------------

_FACE_ANALYSIS_CACHE: dict[tuple, Any] = {}


def _import_face_analysis() -> Any:
    try:
        from insightface.app import FaceAnalysis
    except ImportError as error:
        raise EMOInputError(
            f"Hallo's face embedding needs insightface and onnxruntime ({error}): {_HALLO_EXTRA}, "
            "or pass the (1, 512) embedding directly with face_embedding="
        ) from error
    return FaceAnalysis


def _face_analysis_models_dir(face_analysis_dir: str | os.PathLike) -> Path:
    """`<face_analysis_dir>/models` as Hallo lays it out (or the models folder itself), checked for its files."""
    root = Path(face_analysis_dir).expanduser()
    candidates = [root / "models", root]
    for models_dir in candidates:
        if all((models_dir / name).is_file() for name in HALLO_FACE_ANALYSIS_FILES):
            return models_dir.resolve()
    expected = ", ".join(HALLO_FACE_ANALYSIS_FILES)
    if not root.is_dir():
        problem = "does not exist"
    else:
        present = sorted(p.name for d in candidates if d.is_dir() for p in d.glob("*.onnx"))
        problem = f"lacks them (found {present or 'no .onnx files'})"
    raise EMOInputError(
        f"face analysis folder {os.fspath(root)!r} {problem}: Hallo's face embedding needs {expected} in "
        f"{os.fspath(root / 'models')!r} (pretrained_models/face_analysis/models of Hallo's download), "
        "or pass the (1, 512) embedding directly with face_embedding="
    )


def _load_face_analysis(models_dir: Path, providers: tuple[str, ...], det_size: tuple[int, int]) -> Any:
    """insightface's `FaceAnalysis` on Hallo's models (image_processor.py:103-108), cached per folder/settings.

    Only the detector and the recognition model are loaded: the embedding depends on nothing else (the other
    models Hallo loads add landmarks, age and gender to each face). `name` is the absolute models folder, which
    insightface 0.7 (`os.path.join(root, "models", name)`) and 2.x (a folder name is used as is) both resolve to
    that folder without trying to download anything.
    """
    key = (os.fspath(models_dir), providers, det_size)
    if key not in _FACE_ANALYSIS_CACHE:
        face_analysis_class = _import_face_analysis()
        try:
            analysis = face_analysis_class(
                name=os.fspath(models_dir),
                root=os.fspath(models_dir.parent),
                allowed_modules=["detection", "recognition"],
                providers=list(providers),
            )
            analysis.prepare(ctx_id=0, det_size=det_size)
        except Exception as error:  # onnxruntime's errors for a truncated file, insightface's assert, ...
            raise EMOInputError(
                f"insightface could not load the face analysis models in {os.fspath(models_dir)!r} ({error}); "
                f"download {', '.join(HALLO_FACE_ANALYSIS_FILES)} again (a truncated file does this), "
                "or pass the (1, 512) embedding directly with face_embedding="
            ) from error
        if "recognition" not in getattr(analysis, "models", {}):
            raise EMOInputError(
                f"insightface found no recognition model in {os.fspath(models_dir)!r} (expected "
                f"{HALLO_FACE_ANALYSIS_FILES[1]}): the face embedding needs it"
            )
        _FACE_ANALYSIS_CACHE[key] = analysis
    return _FACE_ANALYSIS_CACHE[key]


def _default_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError as error:
        raise EMOInputError(
            f"Hallo's face embedding needs onnxruntime ({error}): {_HALLO_EXTRA}, "
            "or pass the (1, 512) embedding directly with face_embedding="
        ) from error
    available = onnxruntime.get_available_providers()
    # Hallo asks for CUDA then CPU; keep that order among the providers this onnxruntime build has.
    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available) or tuple(available)


def hallo_face_embedding(
    image: Image.Image,
    face_analysis_dir: str | os.PathLike,
    *,
    providers: tuple[str, ...] | None = None,
    det_size: tuple[int, int] = (640, 640),
) -> torch.Tensor:
    """Hallo's identity embedding: insightface ArcFace of the largest detected face (image_processor.py:116-135).

    Args:
        image: the portrait (RGB or convertible; passed to insightface as BGR, as Hallo does).
        face_analysis_dir: Hallo's `pretrained_models/face_analysis` (with `models/scrfd_10g_bnkps.onnx` and
            `models/glintr100.onnx`), or that `models` folder itself.
        providers: onnxruntime execution providers; default CUDA (if this onnxruntime has it) then CPU.
        det_size: SCRFD input size (Hallo: 640x640).

    Returns:
        `(1, 512)` float32, the raw (not normalised) `face.embedding`, on the CPU.

    Raises:
        EMOInputError: insightface / onnxruntime missing (install the `hallo` extra), the model folder or files
        missing (names the path and the files), or no face detected. Hallo then silently uses a zero embedding and
        the whole image as the face; here it is an error, and `face_embedding=` passes an embedding directly.
    """
    import torch

    if not isinstance(image, Image.Image):
        raise EMOInputError(f"hallo_face_embedding expects a PIL image, got {type(image).__name__}")
    _import_face_analysis()
    models_dir = _face_analysis_models_dir(face_analysis_dir)
    providers = tuple(providers) if providers is not None else _default_providers()
    analysis = _load_face_analysis(models_dir, providers, tuple(det_size))
    rgb = np.asarray(image.convert("RGB"))
    faces = analysis.get(np.ascontiguousarray(rgb[:, :, ::-1]))  # cv2.COLOR_RGB2BGR
    if not faces:
        name = getattr(image, "filename", "") or ""
        label = f"portrait {name!r}" if name else "portrait"
        raise EMOInputError(
            f"insightface found no face in the {label} ({image.width}x{image.height}); Hallo would silently use a "
            "zero identity embedding here. Pass a clearer frontal portrait, or an embedding with face_embedding="
        )
    # The largest box, as Hallo sorts them; sorted() is stable, so ties keep detection order like Hallo's.
    face = sorted(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]), reverse=True)[0]
    embedding = np.asarray(face["embedding"], dtype=np.float32).reshape(1, -1)
    return torch.from_numpy(embedding.copy())


# ----------------------------------------------------------------------------------------------------------------
# Audio: emo_pipeline.hallo_audio (re-exported here, the front end's public module)
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Vocal separation
# ----------------------------------------------------------------------------------------------------------------


def separate_vocals(
    samples: np.ndarray,
    sample_rate: int,
    model_dir: str | os.PathLike,
    model_name: str = DEFAULT_VOCAL_MODEL,
    *,
    output_sample_rate: int | None = None,
) -> np.ndarray:
    """The vocal stem of `samples`, separated by audio-separator as Hallo's `AudioProcessor` does.

    Hallo (audio_processor.py:56-68, 92-103) makes `Separator(output_dir=cache, output_single_stem="vocals",
    model_file_dir=model_dir)`, loads `model_name` (default.yaml: `Kim_Vocal_2.onnx`, an MDX-Net model), separates
    the driving audio file and resamples the first output to 16 kHz. Here the samples are written to a temporary
    WAV file (float32), separated there, and the stem is read back with `load_audio`. For Hallo's result pass the
    audio at its original rate: Hallo separates the original file, before any resampling to 16 kHz.

    Args:
        samples: `(N,)` float mono.
        sample_rate: rate of `samples` in Hz.
        model_dir: the folder holding the separation model (Hallo: `pretrained_models/audio_separator`).
        model_name: the model file in `model_dir`.
        output_sample_rate: rate of the returned samples (default: `sample_rate`; Hallo then uses 16000).

    Returns:
        `(M,)` float32 mono vocals at `output_sample_rate`.

    Raises:
        EMOInputError: audio-separator not installed (the `hallo` extra), a model file missing (names the folder
        and the files), audio-separator failing to load the model (e.g. no `ffmpeg` command), or no output.
    """
    from emo_pipeline.audio import load_audio

    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.dtype.kind != "f" or samples.size == 0:
        raise EMOInputError(
            f"samples must be non-empty 1-D float mono audio, got shape {samples.shape} dtype {samples.dtype}"
        )
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise EMOInputError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    folder = Path(model_dir).expanduser()
    model_path = folder / model_name
    missing = [name for name in (model_name, *AUDIO_SEPARATOR_DATA_FILES) if not (folder / name).is_file()]
    if missing:
        raise EMOInputError(
            f"vocal separation model folder {os.fspath(folder)!r} lacks {', '.join(missing)}: it needs "
            f"{model_name} and {', '.join(AUDIO_SEPARATOR_DATA_FILES)} (Hallo's pretrained_models/audio_separator; "
            "without the .json files audio-separator tries to download them), or skip vocal separation"
        )
    try:
        import soundfile
        from audio_separator.separator import Separator
    except ImportError as error:
        raise EMOInputError(
            f"vocal separation needs audio-separator ({error}): {_HALLO_EXTRA}, or skip vocal separation"
        ) from error

    with tempfile.TemporaryDirectory(prefix="emo-vocals-") as work_dir:
        source = Path(work_dir) / "driving_audio.wav"
        soundfile.write(source, samples.astype(np.float32), int(sample_rate), subtype="FLOAT")
        try:
            separator = Separator(
                log_level=logging.WARNING,
                output_dir=work_dir,
                output_single_stem="vocals",
                model_file_dir=os.fspath(folder),
            )
            separator.load_model(model_name)
        except Exception as error:  # no ffmpeg command, an unreadable model, a broken onnx2torch/torchvision, ...
            raise EMOInputError(
                f"audio-separator could not load {os.fspath(model_path)!r}: {type(error).__name__}: {error} "
                "(it also needs the ffmpeg command on PATH)"
            ) from error
        outputs = separator.separate(os.fspath(source))
        if not outputs:
            raise EMOInputError(f"audio-separator produced no vocal stem with {os.fspath(model_path)!r}")
        stem = Path(outputs[0])
        if not stem.is_absolute():  # audio-separator returns names relative to its output_dir
            stem = Path(work_dir) / stem
        return load_audio(stem, sample_rate=int(output_sample_rate or sample_rate), max_duration=None)
