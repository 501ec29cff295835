"""Golden of Hallo's face / lip / background masks computed from face landmarks (not run in CI).

Runs Hallo's own mask functions from ``hallo/utils/util.py`` (``expand_region``, ``get_lip_mask``,
``get_face_mask``, ``get_blur_mask``, ``blur_mask``, ``get_background_mask``, ``get_sep_face_mask`` and the
``silhouette_ids`` / ``lip_ids`` tables), in the order of ``get_mask`` (util.py:497-527), on synthetic
478-point landmarks, then the resizing of ``ImageProcessor.preprocess`` (image_processor.py:143-180) to the
attention masks of the four UNet levels and the FaceLocator input. See docs/hallo_architecture.md, section 7.

Shims (run in the project's venv: numpy, opencv, Pillow; no Hallo dependency stack):

* util.py's module imports (mediapipe, moviepy, av, torchvision, ...) are skipped: the needed top-level
  functions and id tables are executed from its source with ``ast``, with ``cv2`` and ``np`` provided;
  ``get_landmark`` (mediapipe FaceLandmarker on an image file) is replaced by the synthetic landmarks.
* torchvision is not installable next to the CPU build of torch 2.13 (its wheel needs CUDA torch ops), so
  ``transforms.Resize(size)`` + ``ToTensor()`` on a PIL image is re-stated as what it does for PIL input:
  ``img.resize((w, h), Image.BILINEAR)`` then ``uint8 / 255`` in (C, H, W).

Usage::

    python tests/goldens/make_hallo_mask_golden.py --hallo-src /tmp/hallo-src --output tests/goldens/hallo/masks
"""

from __future__ import annotations

import argparse
import ast
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import save_file

HEIGHT, WIDTH = 360, 300  # the source image, before ImageProcessor's resize (not square on purpose)
IMAGE_SIZES = (512, 64)  # released data.source_image size, and the tiny goldens' size
FACE_EXPAND_RATIO = 1.2  # default.yaml face_expand_ratio
SEED = 7
UTIL_NAMES = {
    "silhouette_ids",
    "lip_ids",
    "expand_region",
    "get_lip_mask",
    "get_face_mask",
    "get_blur_mask",
    "blur_mask",
    "get_background_mask",
    "get_sep_face_mask",
}


def load_util(hallo_src: Path) -> dict:
    """Execute the mask functions and id tables of hallo/utils/util.py verbatim, without its imports."""
    path = hallo_src / "hallo" / "utils" / "util.py"
    tree = ast.parse(path.read_text())
    body = []
    for node in tree.body:
        names = {node.name} if isinstance(node, ast.FunctionDef) else set()
        if isinstance(node, ast.Assign):
            names = {target.id for target in node.targets if isinstance(target, ast.Name)}
        if names & UTIL_NAMES:
            body.append(node)
    namespace = {"cv2": cv2, "np": np}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    missing = UTIL_NAMES - namespace.keys()
    if missing:
        raise SystemExit(f"{path} lacks {sorted(missing)}")
    return namespace


def synthetic_landmarks(util: dict) -> np.ndarray:
    """478 (x, y) pixel landmarks: silhouette ids on a face oval, lip ids on a mouth oval, the rest inside."""
    rng = np.random.default_rng(SEED)
    centre = np.array([WIDTH * 0.52, HEIGHT * 0.47])
    points = centre + rng.normal(0, 1, size=(478, 2)) * [WIDTH * 0.08, HEIGHT * 0.08]
    silhouette, lips = util["silhouette_ids"], util["lip_ids"]
    angles = np.linspace(0, 2 * np.pi, len(silhouette), endpoint=False)
    points[silhouette] = centre + np.stack([np.cos(angles) * WIDTH * 0.27, np.sin(angles) * HEIGHT * 0.33], 1)
    angles = np.linspace(0, 2 * np.pi, len(lips), endpoint=False)
    mouth = centre + [0, HEIGHT * 0.18]
    points[lips] = mouth + np.stack([np.cos(angles) * WIDTH * 0.07, np.sin(angles) * HEIGHT * 0.03], 1)
    return points + rng.normal(0, 0.7, size=points.shape)  # sub-pixel jitter: exercises np.round in the boxes


def resize_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """torchvision ``Compose([Resize((h, w)), ToTensor()])`` on a PIL image: bilinear resize, uint8 / 255."""
    resized = image.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(resized, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hallo-src", type=Path, required=True, help="a checkout of fudan-generative-vision/hallo")
    parser.add_argument("--output", type=Path, default=Path("tests/goldens/hallo/masks"))
    args = parser.parse_args()
    util = load_util(args.hallo_src.resolve())
    landmarks = synthetic_landmarks(util)

    tensors: dict[str, torch.Tensor] = {"landmarks": torch.from_numpy(landmarks)}  # (478, 2) float64, (x, y) px
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Path(cache_dir)
        name = "source"
        # get_mask (util.py:497-527) after its get_landmark call
        util["get_lip_mask"](landmarks, HEIGHT, WIDTH, str(cache / f"{name}_lip_mask.png"))
        util["get_face_mask"](landmarks, HEIGHT, WIDTH, str(cache / f"{name}_face_mask.png"), FACE_EXPAND_RATIO)
        util["get_blur_mask"](
            str(cache / f"{name}_face_mask.png"), str(cache / f"{name}_face_mask_blur.png"), kernel_size=(51, 51)
        )
        util["get_blur_mask"](
            str(cache / f"{name}_lip_mask.png"), str(cache / f"{name}_sep_lip.png"), kernel_size=(31, 31)
        )
        util["get_background_mask"](
            str(cache / f"{name}_face_mask_blur.png"), str(cache / f"{name}_sep_background.png")
        )
        util["get_sep_face_mask"](
            str(cache / f"{name}_face_mask_blur.png"),
            str(cache / f"{name}_sep_lip.png"),
            str(cache / f"{name}_sep_face.png"),
        )
        for png in ("face_mask", "lip_mask", "face_mask_blur", "sep_lip", "sep_background", "sep_face"):
            tensors[png] = torch.from_numpy(cv2.imread(str(cache / f"{name}_{png}.png"), cv2.IMREAD_GRAYSCALE))

        # ImageProcessor.preprocess (image_processor.py:143-180) at each image size
        for size in IMAGE_SIZES:
            face_mask_pil = Image.open(cache / f"{name}_face_mask.png").convert("RGB")
            region = resize_to_tensor(face_mask_pil, (size, size))  # cond_transform: (3, size, size)
            assert torch.equal(region[0], region[1]) and torch.equal(region[0], region[2])
            tensors[f"face_region_{size}"] = (region[0] * 255).round().to(torch.uint8)  # one channel, uint8
            for kind, png in (("full", "sep_background"), ("face", "sep_face"), ("lip", "sep_lip")):
                mask_pil = Image.open(cache / f"{name}_{png}.png")
                for level, divisor in enumerate((8, 16, 32, 64)):
                    mask = resize_to_tensor(mask_pil, (size // divisor, size // divisor))
                    tensors[f"{kind}_mask_{size}_{level}"] = mask.view(1, -1)  # (1, r*r) in [0, 1]

    args.output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.output / "mask_golden.safetensors")
    metadata = {
        "image_height": HEIGHT,
        "image_width": WIDTH,
        "image_sizes": list(IMAGE_SIZES),
        "face_expand_ratio": FACE_EXPAND_RATIO,
        "lip_expand_ratio": 2.0,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
        "layout": {
            "landmarks": "(478, 2) float64 pixel (x, y) of the source image (mediapipe FaceLandmarker order)",
            "face_mask, lip_mask": "(H0, W0) uint8 {0, 255}: expanded boxes (face 1.2 of the silhouette box, lip 2.0)",
            "face_mask_blur, sep_lip, sep_background, sep_face": "(64, 64) uint8 PNG contents",
            "face_region_S": "(S, S) uint8: channel 0 of the FaceLocator input (all 3 equal); tensor = value / 255",
            "{full,face,lip}_mask_S_L": "(1, r*r) float32 in [0, 1], r = S / 8, S / 16, S / 32, S / 64 for L = 0..3",
        },
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    (args.output / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(json.dumps(metadata["shapes"]))


if __name__ == "__main__":
    main()
