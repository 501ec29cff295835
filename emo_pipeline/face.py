"""Portrait input and face geometry for EMO (Tian et al. 2024, arXiv 2402.17485).

* `load_image`: any reasonable image -> upright RGB PIL image, refusing what cannot be a portrait.
* `detect_faces` / `select_face` / `crop_to_face` / `prepare_portrait`: mediapipe 0.10.21 face detection and the
  square crop around the face that the pipeline animates (never a stretch; no face -> an error, never a silent
  whole-image fallback).
* `face_region_mask`: the face-region mask of EMO's face locator (union of face boxes).
* `estimate_head_poses` / `head_rotation_speed`: mediapipe face mesh -> head pose by solvePnP -> head rotation
  speed in rad/s, the signal of EMO's speed layers.

mediapipe and OpenCV are imported on first use, so `load_image` stays cheap to import.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from emo_pipeline.errors import EMOInputError

__all__ = [
    "DEFAULT_FACE_SCALE",
    "DEFAULT_MASK_EXPAND",
    "DEFAULT_SMOOTH_WINDOW",
    "FaceDetections",
    "GENERIC_FACE_MODEL_MM",
    "HeadSpeed",
    "PreparedPortrait",
    "crop_to_face",
    "detect_faces",
    "estimate_head_poses",
    "face_region_mask",
    "head_rotation_speed",
    "load_image",
    "prepare_portrait",
    "select_face",
]

#: Side of the square crop / the larger side of the detector's face box. mediapipe's box spans brows to chin;
#: at 2.5 the face is ~40% of the frame width with hair, neck and the top of the shoulders in view, the framing
#: of EMO's samples and of talking-head datasets (HDTF, VFHQ crops).
DEFAULT_FACE_SCALE = 2.5

#: Scale of the face box (about its centre) for the face-region mask of a single portrait. EMO's mask is the union
#: of the face boxes over a clip, i.e. where the head moves; 1.5x the still face leaves room for that motion.
DEFAULT_MASK_EXPAND = 1.5

#: Frames of the smoothing (a moving average) applied to head poses before differentiating (0.2 s at 25 fps).
DEFAULT_SMOOTH_WINDOW = 5

#: A generic 3-D face in millimetres, in OpenCV camera axes (x right, y down, z away from the camera) with the
#: nose tip at the origin, so a frontal face gives the identity rotation. The six points are mediapipe's own
#: canonical face model (`modules/face_geometry/data/canonical_face_model.obj`, Apache-2.0; cm, y up, z towards
#: the viewer) at the face-mesh landmarks in `_MESH_LANDMARKS`, converted to these axes and units. "Left"/"right"
#: are as seen in the image.
GENERIC_FACE_MODEL_MM = np.array(
    [
        [0.0, 0.0, 0.0],  # nose tip (landmark 1)
        [0.0, 82.765, 32.111],  # chin (152)
        [-44.459, -37.909, 43.022],  # outer eye corner, image left: the subject's right eye (33)
        [44.459, -37.909, 43.022],  # outer eye corner, image right (263)
        [-24.562, 32.158, 31.917],  # mouth corner, image left (61)
        [24.562, 32.158, 31.917],  # mouth corner, image right (291)
    ],
    dtype=np.float64,
)
# mediapipe face-mesh indices of those points: nose tip, chin, eye corners 33 / 263, mouth corners 61 / 291.
_MESH_LANDMARKS = (1, 152, 33, 263, 61, 291)

_MANUAL_HINT = (
    "pass the face by hand: face_box=(x0, y0, x1, y1) in pixels of the image, or face_mask= (an array or image "
    "of the same size, nonzero on the face)"
)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"image file {os.fspath(src)!r}"
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or ""
        label = f"PIL image {name!r}" if name else "PIL image"
        return f"{label} ({src.mode}, {src.width}x{src.height})"
    if isinstance(src, np.ndarray):
        return f"image array of shape {tuple(src.shape)} and dtype {src.dtype}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    name = getattr(src, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return f"image file object {os.fspath(name)!r}"
    return f"image of type {type(src).__name__}"


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    """uint8 or [0, 1]-float HxW / HxWx1 / HxWx3 / HxWx4 array -> PIL image (L, RGB or RGBA)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise EMOInputError(f"{name}: expected an HxW, HxWx3 (RGB) or HxWx4 (RGBA) array")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise EMOInputError(f"{name}: contains NaN or infinite values")
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if low < 0.0 or high > 1.0:
            raise EMOInputError(
                f"{name}: float pixels must lie in [0, 1], found [{low:g}, {high:g}]; rescale it (e.g. divide "
                "0..255 data by 255) or pass uint8"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise EMOInputError(f"{name}: unsupported dtype {array.dtype}; pass uint8 (0..255) or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited on white, 16/32-bit grey scaled, palettes expanded."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grey (PNG/TIFF): PIL's own convert clips at 255; scale the 0..65535 range instead.
        grey = np.asarray(image).astype(np.float64)
        if grey.min(initial=0) < 0 or grey.max(initial=0) > 65535:
            raise EMOInputError(f"{name}: 32-bit integer pixels outside 0..65535; save it as 8- or 16-bit")
        grey8 = np.round(grey / 257.0).astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    if image.mode == "F":
        return _to_rgb(_array_to_pil(np.asarray(image, dtype=np.float32), name), name)
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as error:
        raise EMOInputError(f"{name}: cannot convert image mode {image.mode!r} to RGB ({error})") from error


def load_image(src: Any, max_pixels: int = 8192 * 8192, min_size: int = 32) -> Image.Image:
    """Load a portrait as an upright RGB PIL image.

    Args:
        src: a path, a binary file object or bytes of an image file, a PIL image, or a numpy array (uint8 HxW,
            HxWx3 RGB, HxWx4 RGBA, or float in [0, 1] of those shapes).
        max_pixels: largest accepted width * height (decoding is not attempted above it).
        min_size: smallest accepted width and height in pixels.

    Returns:
        An RGB `PIL.Image.Image`. The EXIF orientation (files and PIL images) is applied, so the result is the
        image as viewers show it. Transparency (RGBA, LA, palette or grey with a transparent colour) is composited
        on white; greyscale, 16-bit grey, CMYK and palette images are converted to RGB.

    Raises:
        EMOInputError naming the input: missing, unreadable or truncated file; unsupported array; larger than
        `max_pixels` or smaller than `min_size` (the limit is named).
    """
    name = _describe(src)
    if isinstance(src, np.ndarray):
        image = _array_to_pil(src, name)
    elif isinstance(src, Image.Image):
        image = src
    else:
        if isinstance(src, (str, os.PathLike)):
            path = os.fspath(src)
            if not os.path.exists(path):
                raise EMOInputError(f"{name} does not exist")
            if os.path.isdir(path):
                raise EMOInputError(f"{name} is a directory, not an image")
            opened: Any = path
        elif isinstance(src, (bytes, bytearray, memoryview)):
            opened = io.BytesIO(bytes(src))
        elif hasattr(src, "read"):
            opened = src
        else:
            raise EMOInputError(
                f"unsupported image input of type {type(src).__name__}; pass a path, a PIL image or a numpy array"
            )
        try:
            image = Image.open(opened)
        except UnidentifiedImageError as error:
            raise EMOInputError(f"{name} is not an image file PIL can read") from error
        except Image.DecompressionBombError as error:
            raise EMOInputError(
                f"{name} is far larger than the limit of max_pixels={max_pixels} ({error}); downscale it first"
            ) from error
        except OSError as error:
            raise EMOInputError(f"{name} could not be read ({error})") from error

    # Size checks before decoding the pixels: the header is enough, and an absurd image is never decoded.
    width, height = image.size
    if width * height > max_pixels:
        raise EMOInputError(
            f"{name} is {width}x{height} = {width * height} pixels, more than the limit of max_pixels={max_pixels}; "
            "downscale it first (the pipeline works at 512x512)"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise EMOInputError(f"{name} is too large to decode safely, max_pixels={max_pixels} ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:  # truncated / corrupt data
        raise EMOInputError(f"{name} could not be decoded, the file looks truncated or corrupt ({error})") from error
    width, height = image.size
    if min(width, height) < min_size:
        raise EMOInputError(
            f"{name} is {width}x{height}, smaller than the minimum of min_size={min_size} pixels per side"
        )
    image = _to_rgb(image, name)
    return image.copy() if image is src else image


# ----------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FaceDetections:
    """Faces found in one image, largest first.

    boxes: `(N, 4)` float32 `x0, y0, x1, y1` in pixels (may extend past the image border for a cut-off face).
    scores: `(N,)` float32 detector confidences in [0, 1].
    image_size: `(width, height)` of the image they were found in.
    """

    boxes: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


_DETECTORS = threading.local()  # mediapipe graphs are not thread-safe: one detector per thread (and process)


def _detector(model_selection: int, min_confidence: float) -> Any:
    cache = getattr(_DETECTORS, "cache", None)
    if cache is None or getattr(_DETECTORS, "pid", None) != os.getpid():  # a forked child builds its own
        cache = _DETECTORS.cache = {}
        _DETECTORS.pid = os.getpid()
    key = (model_selection, float(min_confidence))
    if key not in cache:
        import mediapipe as mp

        from emo_pipeline._native_log import quiet_native_logs

        with quiet_native_logs():  # the graph's first run prints TFLite/absl start-up lines: keep them off stderr
            detector = mp.solutions.face_detection.FaceDetection(
                model_selection=model_selection, min_detection_confidence=float(min_confidence)
            )
            detector.process(np.zeros((64, 64, 3), np.uint8))
        cache[key] = detector
    return cache[key]


def _as_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    return np.asarray(load_image(image))


def detect_faces(image: Any, min_confidence: float = 0.5) -> FaceDetections:
    """Detect faces with mediapipe 0.10.21 face detection (models bundled, nothing downloaded).

    Args:
        image: an RGB PIL image or `(H, W, 3)` uint8 array (anything `load_image` accepts).
        min_confidence: detections scoring below this are dropped.

    Returns:
        `FaceDetections` sorted largest box first. The full-range model (faces up to ~5 m, which also finds the
        smaller faces of group shots and half-body portraits) runs first; if it finds nothing, the short-range
        model (close-ups within ~2 m) runs too.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise EMOInputError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
    pixels = _as_rgb_array(image)
    height, width = pixels.shape[:2]
    boxes, scores = [], []
    for model_selection in (1, 0):
        result = _detector(model_selection, min_confidence).process(pixels)
        for detection in result.detections or []:
            box = detection.location_data.relative_bounding_box
            boxes.append(
                [box.xmin * width, box.ymin * height, (box.xmin + box.width) * width, (box.ymin + box.height) * height]
            )
            scores.append(detection.score[0])
        if boxes:
            break
    boxes_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores_array = np.asarray(scores, dtype=np.float32).reshape(-1)
    areas = (boxes_array[:, 2] - boxes_array[:, 0]) * (boxes_array[:, 3] - boxes_array[:, 1])
    order = np.argsort(-areas, kind="stable")
    return FaceDetections(boxes=boxes_array[order], scores=scores_array[order], image_size=(width, height))


def select_face(detections: FaceDetections, face_index: int | None = None, source: str = "image") -> np.ndarray:
    """The `(4,)` float32 box `x0, y0, x1, y1` (pixels) of the face to animate.

    No face -> EMOInputError saying how to pass the face by hand. Several faces and `face_index=None` -> the
    largest, with a warning naming the count. `face_index` indexes the faces sorted largest first.
    """
    count = len(detections)
    if count == 0:
        raise EMOInputError(f"no face was found in {source}; {_MANUAL_HINT}")
    if face_index is None:
        if count > 1:
            warnings.warn(
                f"{count} faces were found in {source}; the largest is used. Pass face_index=0..{count - 1} "
                "(largest first) to pick another.",
                stacklevel=2,
            )
        face_index = 0
    if isinstance(face_index, bool) or not isinstance(face_index, (int, np.integer)) or not 0 <= face_index < count:
        raise EMOInputError(
            f"face_index={face_index!r} is out of range: {count} face(s) found in {source}, valid indices are "
            f"0..{count - 1} (largest first)"
        )
    return detections.boxes[int(face_index)].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Crop and masks
# ----------------------------------------------------------------------------------------------------------------


def _validate_box(box: Any, name: str, image_size: tuple[int, int] | None = None) -> np.ndarray:
    try:
        array = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise EMOInputError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {box!r}") from error
    if array.size != 4 or not np.isfinite(array).all():
        raise EMOInputError(f"{name} must be 4 finite numbers (x0, y0, x1, y1) in pixels, got {box!r}")
    x0, y0, x1, y1 = array
    if not (x1 > x0 and y1 > y0):
        raise EMOInputError(f"{name}={tuple(array.tolist())} is empty: need x1 > x0 and y1 > y0")
    if image_size is not None:
        width, height = image_size
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise EMOInputError(f"{name}={tuple(array.tolist())} lies outside the {width}x{height} image")
    return array


def crop_to_face(
    image: Any, box: Any, size: int = 512, face_scale: float = DEFAULT_FACE_SCALE
) -> tuple[Image.Image, np.ndarray]:
    """Square crop centred on a face box, resized to `size` x `size` (aspect ratio kept, never a stretch).

    Args:
        image: RGB PIL image or `(H, W, 3)` uint8 array.
        box: `(4,)` face box `x0, y0, x1, y1` in pixels.
        size: output side in pixels.
        face_scale: crop side / larger side of the face box (see `DEFAULT_FACE_SCALE`).

    Returns:
        `(crop, box_in_crop)`: the RGB `size` x `size` crop (Lanczos resampling) and the face box in its pixels,
        `(4,)` float32. A square that leaves the image is shifted back inside; where the image is smaller than the
        square, the square is centred on the face as far as possible and the missing border is filled by
        replicating the edge pixels (no black bars, no stretch).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise EMOInputError(f"size must be a positive int, got {size!r}")
    if not face_scale > 0:
        raise EMOInputError(f"face_scale must be positive, got {face_scale!r}")
    pil = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image)
    width, height = pil.size
    x0, y0, x1, y1 = _validate_box(box, "face box", (width, height))
    side = max(1, int(round(face_scale * max(x1 - x0, y1 - y0))))

    def place(centre: float, extent: int) -> int:
        start = int(round(centre - side / 2))
        return int(np.clip(start, min(0, extent - side), max(0, extent - side)))

    left, top = place((x0 + x1) / 2, width), place((y0 + y1) / 2, height)
    inside = pil.crop((max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)))
    if inside.size != (side, side):
        pad_left, pad_top = max(0, -left), max(0, -top)
        pad_right, pad_bottom = side - pad_left - inside.width, side - pad_top - inside.height
        padded = np.pad(np.asarray(inside), ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), mode="edge")
        inside = Image.fromarray(padded)
    crop = inside.resize((size, size), Image.Resampling.LANCZOS) if side != size else inside
    scale = size / side
    box_in_crop = np.array([(x0 - left) * scale, (y0 - top) * scale, (x1 - left) * scale, (y1 - top) * scale])
    return crop, box_in_crop.astype(np.float32)


def face_region_mask(boxes: Any, size: int | tuple[int, int], expand: float = 1.0) -> np.ndarray:
    """EMO's face-region mask (arXiv 2402.17485, Sec. 3.2): 1 inside the union of the face boxes, else 0.

    Args:
        boxes: one `(4,)` box or `(N, 4)` boxes, `x0, y0, x1, y1` in pixels.
        size: mask size, an int for a square or `(height, width)` (numpy order, the order of the result).
        expand: each box is scaled by this about its centre before drawing (1.0 = as given).

    Returns:
        `(H, W)` float32 in {0, 1}. Every pixel the (expanded) box touches is set; boxes are clipped to the mask.
    """
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if height < 1 or width < 1:
        raise EMOInputError(f"mask size must be positive, got {size!r}")
    if not expand > 0:
        raise EMOInputError(f"expand must be positive, got {expand!r}")
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4 or not np.isfinite(array).all():
        raise EMOInputError(f"boxes must be (4,) or (N, 4) finite x0, y0, x1, y1, got shape {array.shape}")
    mask = np.zeros((int(height), int(width)), dtype=np.float32)
    for x0, y0, x1, y1 in array:
        cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * expand, (y1 - y0) / 2 * expand
        col0, col1 = max(0, math.floor(cx - half_w)), min(int(width), math.ceil(cx + half_w))
        row0, row1 = max(0, math.floor(cy - half_h)), min(int(height), math.ceil(cy + half_h))
        if col1 > col0 and row1 > row0:
            mask[row0:row1, col0:col1] = 1.0
    return mask


@dataclass
class PreparedPortrait:
    """A portrait ready for the pipeline.

    image: RGB PIL image, `size` x `size`.
    face_box: `(4,)` float32 `x0, y0, x1, y1` of the face in `image` pixels.
    mask: `(size, size)` float32 in {0, 1}, the face-region mask for the face locator.
    """

    image: Image.Image
    face_box: np.ndarray
    mask: np.ndarray


def _mask_array(face_mask: Any, image_size: tuple[int, int]) -> np.ndarray:
    """User mask (bool, uint8 0..255, float [0, 1]; array or PIL) -> bool (H, W), validated against the image."""
    width, height = image_size
    array = np.asarray(face_mask.convert("L") if isinstance(face_mask, Image.Image) else face_mask)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.shape != (height, width):
        raise EMOInputError(
            f"face_mask has shape {array.shape}, expected ({height}, {width}): the size of the (EXIF-rotated) image"
        )
    if array.dtype == bool:
        return array
    if array.dtype == np.uint8:
        return array > 127
    if array.dtype.kind == "f" and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1:
        return array > 0.5
    raise EMOInputError("face_mask must be bool, uint8 (0..255) or float in [0, 1]")


def prepare_portrait(
    image: Any,
    size: int = 512,
    face_scale: float = DEFAULT_FACE_SCALE,
    face_index: int | None = None,
    face_box: Any = None,
    face_mask: Any = None,
    mask_expand: float = DEFAULT_MASK_EXPAND,
) -> PreparedPortrait:
    """Load a portrait, find its face and crop it square around the face: the one call the pipeline uses.

    Args:
        image: anything `load_image` accepts.
        size: output side in pixels.
        face_scale: crop side / larger side of the face box (see `DEFAULT_FACE_SCALE`).
        face_index: which detected face (largest first) when there are several; default the largest (warns).
        face_box: `(x0, y0, x1, y1)` in pixels of the loaded (EXIF-rotated) image: skips detection.
        face_mask: array or PIL image of the loaded image's size, nonzero (> 0.5 / > 127) on the face: skips
            detection; the crop is centred on its bounding box and the mask itself (cropped like the image) is
            returned, without `mask_expand`.
        mask_expand: scale of the face box for the box-derived mask (see `DEFAULT_MASK_EXPAND`).

    Raises:
        EMOInputError: unusable image, no face found (the message says how to pass `face_box`/`face_mask`),
        bad `face_index`, or an invalid `face_box`/`face_mask`.
    """
    if face_box is not None and face_mask is not None:
        raise EMOInputError("pass either face_box or face_mask, not both")
    name = _describe(image)
    pil = load_image(image)
    if face_mask is not None:
        region = _mask_array(face_mask, pil.size)
        rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
        if rows.size == 0:
            raise EMOInputError("face_mask is empty (no pixel marks the face)")
        box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)
    elif face_box is not None:
        box = _validate_box(face_box, "face_box", pil.size)
    else:
        box = select_face(detect_faces(pil), face_index=face_index, source=name)
    crop, box_in_crop = crop_to_face(pil, box, size=size, face_scale=face_scale)
    if face_mask is not None:
        mask_image = Image.fromarray(region.astype(np.uint8) * 255).convert("RGB")
        mask_crop, _ = crop_to_face(mask_image, box, size=size, face_scale=face_scale)
        mask = (np.asarray(mask_crop)[:, :, 0] > 127).astype(np.float32)
    else:
        mask = face_region_mask(box_in_crop, size, expand=mask_expand)
    return PreparedPortrait(image=crop, face_box=box_in_crop, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Head pose and speed
# ----------------------------------------------------------------------------------------------------------------


def _euler_to_matrix(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """`R = Rz(roll) @ Ry(yaw) @ Rx(pitch)` in OpenCV camera axes, batched: (...,) angles -> (..., 3, 3)."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    matrix = np.empty(np.shape(yaw) + (3, 3))
    matrix[..., 0, 0] = cr * cy
    matrix[..., 0, 1] = cr * sy * sp - sr * cp
    matrix[..., 0, 2] = cr * sy * cp + sr * sp
    matrix[..., 1, 0] = sr * cy
    matrix[..., 1, 1] = sr * sy * sp + cr * cp
    matrix[..., 1, 2] = sr * sy * cp - cr * sp
    matrix[..., 2, 0] = -sy
    matrix[..., 2, 1] = cy * sp
    matrix[..., 2, 2] = cy * cp
    return matrix


def _matrix_to_euler(matrix: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `_euler_to_matrix` -> (yaw, pitch, roll) in radians, yaw in [-pi/2, pi/2]."""
    yaw = math.asin(float(np.clip(-matrix[2, 0], -1.0, 1.0)))
    pitch = math.atan2(matrix[2, 1], matrix[2, 2])
    roll = math.atan2(matrix[1, 0], matrix[0, 0])
    return yaw, pitch, roll


def _solve_head_pose(
    image_points: np.ndarray, width: int, height: int, guess: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """solvePnP of `GENERIC_FACE_MODEL_MM` onto `(6, 2)` pixel points -> (rvec, tvec), or None if it fails.

    Pinhole camera with focal length = image width (a ~53 degree field of view), principal point at the centre,
    no distortion. `guess` (the previous frame's solution) seeds the iteration: steadier, no flips between the
    mirror solutions of a near-planar point set.
    """
    import cv2

    camera = np.array([[width, 0.0, width / 2], [0.0, width, height / 2], [0.0, 0.0, 1.0]])
    points = np.ascontiguousarray(image_points, dtype=np.float64)
    if guess is None:
        ok, rvec, tvec = cv2.solvePnP(GENERIC_FACE_MODEL_MM, points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    else:
        ok, rvec, tvec = cv2.solvePnP(
            GENERIC_FACE_MODEL_MM,
            points,
            camera,
            None,
            guess[0].copy(),
            guess[1].copy(),
            useExtrinsicGuess=True,
            flags=cv2.SOLVEPNP_ITERATIVE,
        )
    return (rvec, tvec) if ok else None


def estimate_head_poses(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Head pose per video frame: mediapipe face mesh landmarks + `cv2.solvePnP` against `GENERIC_FACE_MODEL_MM`.

    Args:
        frames: consecutive `(H, W, 3)` uint8 RGB frames of one video (face mesh tracks from frame to frame).

    Returns:
        `(N, 3)` float64 `yaw, pitch, roll` in radians, with `R = Rz(roll) @ Ry(yaw) @ Rx(pitch)` the head's
        rotation in OpenCV camera axes (x right, y down, z into the scene): yaw turns the head left/right, pitch
        nods, roll tilts in the image plane (positive = clockwise as seen). A frontal face is (0, 0, 0). Rows are
        NaN where no face was found. Camera: pinhole, focal length = image width, principal point at the centre.
    """
    import cv2
    import mediapipe as mp

    from emo_pipeline._native_log import quiet_native_logs

    poses: list[tuple[float, float, float]] = []
    seen_face = False  # face mesh prints TFLite/absl start-up lines until its first face: keep them off stderr
    previous: tuple[np.ndarray, np.ndarray] | None = None
    with mp.solutions.face_mesh.FaceMesh(
        static_image_mode=False,
        max_num_faces=1,
        refine_landmarks=False,
        min_detection_confidence=0.5,
        min_tracking_confidence=0.5,
    ) as mesh:
        for index, frame in enumerate(frames):
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise EMOInputError(
                    f"video frame {index}: expected (H, W, 3) uint8 RGB, got shape {frame.shape} dtype {frame.dtype}"
                )
            frame = np.ascontiguousarray(frame)
            with contextlib.nullcontext() if seen_face else quiet_native_logs():
                result = mesh.process(frame)
                if result.multi_face_landmarks and previous is None:
                    # A newly found face gets landmarks from the detector's rough box; a second pass on the same
                    # frame takes them from the tracker's landmark-based box, like every later frame. Without it the
                    # first frame's pose is off by ~1 degree, a spurious 0.5 rad/s jump at 25 fps.
                    result = mesh.process(frame)
            seen_face = seen_face or bool(result.multi_face_landmarks)
            if not result.multi_face_landmarks:
                poses.append((math.nan, math.nan, math.nan))
                previous = None
                continue
            height, width = frame.shape[:2]
            landmarks = result.multi_face_landmarks[0].landmark
            image_points = np.array([[landmarks[i].x * width, landmarks[i].y * height] for i in _MESH_LANDMARKS])
            solved = _solve_head_pose(image_points, width, height, previous)
            if solved is None:
                poses.append((math.nan, math.nan, math.nan))
                previous = None
                continue
            previous = solved
            poses.append(_matrix_to_euler(cv2.Rodrigues(solved[0])[0]))
    return np.asarray(poses, dtype=np.float64).reshape(-1, 3)


@dataclass
class HeadSpeed:
    """Head rotation speed per frame.

    speed: `(N,)` float32 rad/s, >= 0.
    num_missing: frames without a face (their poses were interpolated).
    missing: `(N,)` bool, True where no face was found.
    """

    speed: np.ndarray
    num_missing: int
    missing: np.ndarray


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Savitzky-Golay smoothing of order 1 along axis 0: a centred moving average of `window` frames, and at each
    end the least-squares line through the first / last `window` frames (scipy's `savgol_filter(..., 1,
    mode="interp")`). Linear motion passes unchanged, including at the ends."""
    count = values.shape[0]
    window = min(window, count if count % 2 else count - 1)
    if window <= 2:
        return values
    half = window // 2
    cumulative = np.cumsum(np.pad(values, ((1, 0), (0, 0))), axis=0)
    smoothed = values.copy()
    smoothed[half : count - half] = (cumulative[window:] - cumulative[:-window]) / window
    positions = np.arange(window)[:, None]
    slope, intercept = np.polyfit(positions[:, 0], values[:window], 1)
    smoothed[:half] = (positions * slope + intercept)[:half]
    slope, intercept = np.polyfit(positions[:, 0], values[count - window :], 1)
    smoothed[count - half :] = (positions * slope + intercept)[window - half :]
    return smoothed


def head_rotation_speed(poses: np.ndarray, fps: float, smooth_window: int = DEFAULT_SMOOTH_WINDOW) -> HeadSpeed:
    """Head rotation speed in rad/s from per-frame `(yaw, pitch, roll)` (EMO's speed-layer signal, Sec. 3.3).

    Frames with a NaN pose are filled by linear interpolation (the first/last known pose held at the ends). The
    unwrapped angles are smoothed over `smooth_window` frames (odd; 1 = none) by a Savitzky-Golay filter of order 1
    (a centred moving average; a least-squares line at the ends, so steady turning is not bent), then
    the speed between consecutive frames is the geodesic angle between their rotation matrices times `fps`
    (independent of the Euler convention, unlike differences of Euler angles). Frame i gets the mean of the
    steps into and out of it.

    Args:
        poses: `(N, 3)` radians, as from `estimate_head_poses`.
        fps: frames per second.
        smooth_window: moving-average length in frames.

    Returns:
        `HeadSpeed` with `speed` `(N,)` float32 rad/s and the number of frames that had no face.

    Raises:
        EMOInputError if no frame has a face.
    """
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 2 or poses.shape[1] != 3 or poses.shape[0] == 0:
        raise EMOInputError(f"poses must be (N, 3) yaw, pitch, roll with N >= 1, got shape {poses.shape}")
    if not fps > 0:
        raise EMOInputError(f"fps must be positive, got {fps!r}")
    if isinstance(smooth_window, bool) or not isinstance(smooth_window, int) or smooth_window < 1:
        raise EMOInputError(f"smooth_window must be an odd int >= 1, got {smooth_window!r}")
    if smooth_window % 2 == 0:
        raise EMOInputError(f"smooth_window must be odd (a centred window), got {smooth_window}")
    count = poses.shape[0]
    missing = ~np.isfinite(poses).all(axis=1)
    if missing.all():
        raise EMOInputError(f"no face was found in any of the {count} video frames; cannot measure head speed")
    known = np.nonzero(~missing)[0]
    frame_index = np.arange(count)
    filled = np.stack([np.interp(frame_index, known, np.unwrap(poses[known, k])) for k in range(3)], axis=1)
    smoothed = _smooth(filled, smooth_window)
    rotations = _euler_to_matrix(smoothed[:, 0], smoothed[:, 1], smoothed[:, 2])
    # Geodesic angle: ||R1 - R2||_F = 2 sqrt(2) sin(theta / 2), accurate for small steps (arccos of the trace
    # is not).
    distance = np.linalg.norm(rotations[1:] - rotations[:-1], axis=(1, 2))
    step = 2.0 * np.arcsin(np.clip(distance / (2.0 * math.sqrt(2.0)), 0.0, 1.0)) * fps
    speed = np.zeros(count)
    if count > 1:
        speed[0], speed[-1] = step[0], step[-1]
        speed[1:-1] = (step[:-1] + step[1:]) / 2
    return HeadSpeed(speed=speed.astype(np.float32), num_missing=int(missing.sum()), missing=missing)
