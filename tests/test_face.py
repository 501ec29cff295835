"""Tests of emo_pipeline.face: image loading variants, face detection/selection/cropping, face-region masks, head
pose and head rotation speed."""

from __future__ import annotations

import importlib.resources
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import cv2
import numpy as np
import pytest
from PIL import Image

from emo_pipeline.errors import EMOInputError
from emo_pipeline.face import (
    GENERIC_FACE_MODEL_MM,
    FaceDetections,
    crop_to_face,
    detect_faces,
    estimate_head_poses,
    face_region_mask,
    head_rotation_speed,
    load_image,
    prepare_portrait,
    select_face,
)
from emo_pipeline.media import VideoWriter, read_video_frames

PORTRAIT = Path(str(importlib.resources.files("emo_pipeline") / "assets" / "portrait.png"))
# The astronaut's face, labelled by eye on the 512x512 asset: hairline to chin, cheek to cheek (x0, y0, x1, y1).
ASTRONAUT_FACE = np.array([180.0, 70.0, 275.0, 178.0])
FACE_CENTRE = (226.0, 120.0)  # pivot of the synthetic head rotation (centre of the detected face)


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return load_image(PORTRAIT)


def _iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ----------------------------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------------------------


def test_portrait_asset_loads_as_rgb(portrait):
    assert portrait.mode == "RGB" and portrait.size == (512, 512)


def test_sources_path_pil_array_bytes(portrait):
    pixels = np.asarray(portrait)
    for source in (str(PORTRAIT), PORTRAIT, PORTRAIT.read_bytes(), portrait, pixels, pixels / 255.0):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), pixels)
    grey = load_image(pixels[:, :, 0])
    np.testing.assert_array_equal(np.asarray(grey), np.repeat(pixels[:, :, :1], 3, axis=2))


def test_transparency_is_composited_on_white(tmp_path, portrait):
    rgba = np.dstack([np.asarray(portrait), np.full((512, 512), 255, np.uint8)])
    rgba[:, :256, 3] = 0  # left half fully transparent
    rgba[:, 256:384, 3] = 128  # a half-transparent band
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    for source in (path, rgba):
        loaded = np.asarray(load_image(source)).astype(int)
        assert (loaded[:, :256] == 255).all()
        expected_band = rgba[:, 256:384, :3].astype(float) * 128 / 255 + 255 * (1 - 128 / 255)
        assert np.abs(loaded[:, 256:384] - expected_band).max() <= 1
        np.testing.assert_array_equal(loaded[:, 384:], rgba[:, 384:, :3])
    la = Image.fromarray(rgba[:, :, [0, 3]], mode="LA")
    assert (np.asarray(load_image(la))[:, :256] == 255).all()


def test_grey_16bit_cmyk_and_palette_are_converted(tmp_path, portrait):
    pixels = np.asarray(portrait)
    grey_path = tmp_path / "grey.png"
    portrait.convert("L").save(grey_path)
    grey = np.asarray(load_image(grey_path))
    assert grey.shape == (512, 512, 3) and (grey[:, :, 0] == grey[:, :, 2]).all()

    deep = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 32896, 65535] * 16] * 48, dtype=np.uint16)).save(deep)
    np.testing.assert_array_equal(np.asarray(load_image(deep))[0, :3, 0], [0, 128, 255])  # scaled, not clipped

    cmyk_path = tmp_path / "cmyk.jpg"
    portrait.convert("CMYK").save(cmyk_path, quality=95)
    cmyk = np.asarray(load_image(cmyk_path)).astype(float)
    assert np.abs(cmyk - pixels).mean() < 3.0

    palette_path = tmp_path / "palette.gif"
    portrait.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(palette_path)
    palette = np.asarray(load_image(palette_path)).astype(float)
    assert np.abs(palette - pixels).mean() < 8.0


def test_exif_orientation_is_applied(tmp_path, portrait):
    # Stored rotated 90 degrees counter-clockwise, tagged Orientation=6 ("rotate 90 CW to display").
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    portrait.crop((0, 0, 512, 384)).rotate(90, expand=True).save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (512, 384)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(portrait)[:384])
    jpeg = tmp_path / "rotated.jpg"
    portrait.rotate(90).save(jpeg, exif=exif, quality=95)
    box = select_face(detect_faces(load_image(jpeg)))
    assert _iou(box, ASTRONAUT_FACE) > 0.6  # the face is found upright


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: opening must not try to decode it."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_images_raise_naming_the_input(tmp_path, portrait):
    with pytest.raises(EMOInputError, match=r"nowhere\.png.*does not exist"):
        load_image(tmp_path / "nowhere.png")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(EMOInputError, match=r"notes\.jpg.*not an image file"):
        load_image(text)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(PORTRAIT.read_bytes()[:20000])
    with pytest.raises(EMOInputError, match=r"truncated\.png.*truncated or corrupt"):
        load_image(truncated)
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_with_size(8200, 8200))
    with pytest.raises(EMOInputError, match=r"huge\.png' is 8200x8200 = 67240000 pixels.*max_pixels=67108864"):
        load_image(huge)
    absurd = tmp_path / "absurd.png"
    absurd.write_bytes(_png_with_size(100_000, 100_000))
    with pytest.raises(EMOInputError, match=r"absurd\.png.*max_pixels"):
        load_image(absurd)
    with pytest.raises(EMOInputError, match=r"512x512 = 262144 pixels.*max_pixels=100000"):
        load_image(portrait, max_pixels=100_000)
    with pytest.raises(EMOInputError, match=r"16x16, smaller than the minimum of min_size=32"):
        load_image(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(EMOInputError, match=r"float pixels must lie in \[0, 1\], found \[0, 255\]"):
        load_image(np.asarray(portrait).astype(np.float32))
    with pytest.raises(EMOInputError, match=r"unsupported dtype int16"):
        load_image(np.zeros((64, 64, 3), np.int16))
    with pytest.raises(EMOInputError, match=r"shape \(64, 64, 2\)"):
        load_image(np.zeros((64, 64, 2), np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Detection, selection, crop
# ----------------------------------------------------------------------------------------------------------------


def test_astronaut_face_box_is_where_the_face_is(portrait):
    detections = detect_faces(portrait)
    assert len(detections) == 1 and detections.scores[0] > 0.8
    box = detections.boxes[0]
    assert box.dtype == np.float32 and box.shape == (4,)
    assert _iou(box, ASTRONAUT_FACE) > 0.7
    assert abs((box[0] + box[2]) / 2 - FACE_CENTRE[0]) < 10 and abs((box[1] + box[3]) / 2 - FACE_CENTRE[1]) < 10


def _two_faces(portrait: Image.Image) -> Image.Image:
    """The portrait and a 0.75x copy of it side by side: two faces, the left one larger."""
    canvas = Image.new("RGB", (1024, 512), (200, 200, 200))
    canvas.paste(portrait, (0, 0))
    canvas.paste(portrait.resize((384, 384), Image.Resampling.LANCZOS), (576, 64))
    return canvas


def test_two_faces_largest_first_with_a_warning(portrait):
    image = _two_faces(portrait)
    detections = detect_faces(image)
    assert len(detections) == 2
    areas = (detections.boxes[:, 2] - detections.boxes[:, 0]) * (detections.boxes[:, 3] - detections.boxes[:, 1])
    assert areas[0] > areas[1] and detections.boxes[0, 2] < 512 < detections.boxes[1, 0]
    with pytest.warns(UserWarning, match=r"2 faces were found in two\.png; the largest is used"):
        box = select_face(detections, source="two.png")
    np.testing.assert_array_equal(box, detections.boxes[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(select_face(detections, face_index=1), detections.boxes[1])
    with pytest.raises(EMOInputError, match=r"face_index=2 is out of range: 2 face\(s\).*0\.\.1"):
        select_face(detections, face_index=2)
    prepared = prepare_portrait(image, size=256, face_index=1)
    assert prepared.image.size == (256, 256)


def test_no_face_says_so_and_how_to_pass_one_by_hand(tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 400), (128, 128, 128)).save(blank)
    assert len(detect_faces(load_image(blank))) == 0
    with pytest.raises(EMOInputError, match=r"no face was found in image file '.*blank\.png'.*face_box=.*face_mask="):
        prepare_portrait(blank)
    # By hand, the same image works: no silent whole-image fallback, but an explicit way through.
    by_box = prepare_portrait(blank, size=128, face_box=(150, 150, 250, 250))
    assert by_box.image.size == (128, 128)
    mask = np.zeros((400, 400), bool)
    mask[150:250, 150:250] = True
    by_mask = prepare_portrait(blank, size=128, face_mask=mask)
    np.testing.assert_allclose(by_mask.face_box, by_box.face_box)
    assert by_mask.mask.shape == (128, 128) and 0 < by_mask.mask.mean() < 1


def test_bad_manual_face_inputs():
    image = np.full((200, 300, 3), 100, np.uint8)
    with pytest.raises(EMOInputError, match=r"face_box=.*is empty"):
        prepare_portrait(image, face_box=(50, 50, 40, 80))
    with pytest.raises(EMOInputError, match=r"outside the 300x200 image"):
        prepare_portrait(image, face_box=(400, 10, 450, 60))
    with pytest.raises(EMOInputError, match=r"4 finite numbers"):
        prepare_portrait(image, face_box=(1, 2, 3))
    with pytest.raises(EMOInputError, match=r"face_mask has shape \(100, 100\), expected \(200, 300\)"):
        prepare_portrait(image, face_mask=np.ones((100, 100), bool))
    with pytest.raises(EMOInputError, match=r"face_mask is empty"):
        prepare_portrait(image, face_mask=np.zeros((200, 300), bool))
    with pytest.raises(EMOInputError, match=r"either face_box or face_mask"):
        prepare_portrait(image, face_box=(0, 0, 10, 10), face_mask=np.ones((200, 300), bool))


def test_prepare_portrait_crops_around_the_face(portrait):
    prepared = prepare_portrait(portrait, size=256, face_scale=2.5)
    assert prepared.image.size == (256, 256) and prepared.image.mode == "RGB"
    assert prepared.mask.shape == (256, 256) and prepared.mask.dtype == np.float32
    assert set(np.unique(prepared.mask)) == {0.0, 1.0}
    box = prepared.face_box
    side = max(box[2] - box[0], box[3] - box[1])
    assert abs(side * 2.5 - 256) < 2  # the face takes 1 / face_scale of the crop
    # The face is detected again where face_box says it is.
    assert _iou(detect_faces(prepared.image).boxes[0], box) > 0.7
    # Mask: the face box expanded 1.5x about its centre.
    rows, cols = np.nonzero(prepared.mask)
    assert abs((cols.max() + 1 - cols.min()) - 1.5 * (box[2] - box[0])) <= 2


def test_crop_never_stretches():
    # A wide image with a face box near the right edge, and a box bigger than the image height.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 600, 3), dtype=np.uint8)
    crop, box = crop_to_face(image, (500, 50, 580, 130), size=128, face_scale=2.0)  # square side 160
    assert crop.size == (128, 128)
    # Shifted inside the image: the crop is columns 440..600, rows 10..170 (centre 90 - 80), scaled by 0.8.
    np.testing.assert_allclose(box, [(500 - 440) * 0.8, (50 - 10) * 0.8, (580 - 440) * 0.8, (130 - 10) * 0.8])
    expected = Image.fromarray(image[10:170, 440:600]).resize((128, 128), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))
    # Square (side 300) taller than the 200-pixel image: edge rows replicated, same scale on both axes.
    crop, box = crop_to_face(image, (100, 50, 250, 150), size=300, face_scale=2.0)
    pixels = np.asarray(crop)
    np.testing.assert_array_equal(pixels[:50], np.broadcast_to(pixels[50], (50, 300, 3)))
    np.testing.assert_array_equal(pixels[50:250], image[:, 25:325])
    np.testing.assert_allclose(box, [75, 100, 225, 200])


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def test_face_region_mask_union_expand_and_clip():
    mask = face_region_mask([10, 20, 30, 40], 64)
    assert mask.shape == (64, 64) and mask.dtype == np.float32
    assert mask.sum() == 20 * 20 and mask[20:40, 10:30].all()
    wide = face_region_mask(np.array([[10, 20, 30, 40], [50, 0, 70, 10]]), (48, 64), expand=2.0)
    assert wide.shape == (48, 64)
    assert wide[10:48, 0:40].all() and wide[0:15, 40:64].all()  # (0, 10, 40, 50) and (40, -5, 80, 15), clipped
    assert wide.sum() == 40 * 38 + 24 * 15
    np.testing.assert_array_equal(face_region_mask([10.5, 20.5, 19.5, 29.5], 64)[20:30, 10:20], 1)
    assert face_region_mask([100, 100, 120, 120], 64).sum() == 0  # off the image: nothing
    with pytest.raises(EMOInputError, match=r"\(N, 4\)"):
        face_region_mask(np.zeros((2, 3)), 64)


# ----------------------------------------------------------------------------------------------------------------
# Head pose and speed
# ----------------------------------------------------------------------------------------------------------------


def _rotate_about_face(image: np.ndarray, degrees: float) -> np.ndarray:
    """In-plane rotation (roll) of the portrait about its face centre, counter-clockwise for positive degrees."""
    matrix = cv2.getRotationMatrix2D(FACE_CENTRE, degrees, 1.0)
    return cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def test_head_pose_solver_recovers_known_rotations():
    from emo_pipeline.face import _euler_to_matrix, _matrix_to_euler, _solve_head_pose

    camera = np.array([[512.0, 0, 256], [0, 512.0, 256], [0, 0, 1]])
    for yaw, pitch, roll in [(0.0, 0.0, 0.0), (0.3, -0.2, 0.1), (-0.5, 0.15, -0.4)]:
        rotation = _euler_to_matrix(np.array(yaw), np.array(pitch), np.array(roll))
        points = (rotation @ GENERIC_FACE_MODEL_MM.T).T + [10.0, -20.0, 600.0]
        projected = (camera @ points.T).T
        rvec, _ = _solve_head_pose(projected[:, :2] / projected[:, 2:], 512, 512)
        np.testing.assert_allclose(_matrix_to_euler(cv2.Rodrigues(rvec)[0]), (yaw, pitch, roll), atol=1e-4)


def test_head_rotation_speed_of_known_trajectories():
    fps = 25.0
    frames = np.arange(50)
    # 1 rad/s of yaw plus a constant pitch: geodesic speed exactly 1 rad/s.
    poses = np.stack([frames / fps, np.full(50, 0.2), np.zeros(50)], axis=1)
    result = head_rotation_speed(poses, fps)
    assert result.speed.shape == (50,) and result.speed.dtype == np.float32 and result.num_missing == 0
    np.testing.assert_allclose(result.speed, 1.0, rtol=1e-3)
    # Still head: zero. One frame: zero.
    np.testing.assert_allclose(head_rotation_speed(np.full((10, 3), 0.3), fps).speed, 0.0, atol=1e-6)
    np.testing.assert_array_equal(head_rotation_speed(np.zeros((1, 3)), fps).speed, [0.0])
    # Missing frames are interpolated and counted; the ends are held.
    gappy = poses.copy()
    gappy[[0, 1, 20, 21, 22]] = np.nan
    result = head_rotation_speed(gappy, fps, smooth_window=1)
    assert result.num_missing == 5 and result.missing[[0, 1, 20, 21, 22]].all() and result.missing.sum() == 5
    np.testing.assert_allclose(result.speed[5:45], 1.0, rtol=1e-3)
    assert result.speed[0] < 0.1  # held pose at the start: no motion
    with pytest.raises(EMOInputError, match=r"no face was found in any of the 4 video frames"):
        head_rotation_speed(np.full((4, 3), np.nan), fps)
    with pytest.raises(EMOInputError, match=r"smooth_window must be odd"):
        head_rotation_speed(poses, fps, smooth_window=4)


def test_turning_head_video_speed_matches_the_truth(tmp_path, portrait):
    """A video of the portrait rolling at 30 deg/s (0.524 rad/s) for 2 s at 25 fps, written to mp4 and read back:
    the median speed is within 10% of the truth and every frame within 25% (measured: median +3%, worst 17%)."""
    fps, degrees_per_second = 25, 30.0
    pixels = np.asarray(portrait)
    frames = [_rotate_about_face(pixels, -30.0 + degrees_per_second * i / fps) for i in range(50)]
    path = tmp_path / "turning.mp4"
    with VideoWriter(path, fps=fps) as writer:
        writer.write(np.stack(frames))
    decoded = read_video_frames(path)
    poses = estimate_head_poses(decoded)
    assert poses.shape == (50, 3) and np.isfinite(poses).all()
    roll = np.unwrap(poses[:, 2])
    assert roll[0] > roll[-1]  # counter-clockwise in the image is negative roll (clockwise is positive)
    truth = np.deg2rad(degrees_per_second)
    result = head_rotation_speed(poses, fps)
    assert result.num_missing == 0
    assert abs(np.median(result.speed) - truth) < 0.10 * truth
    assert np.abs(result.speed - truth).max() < 0.25 * truth

    # Three frames without a face (blank) are interpolated over and reported.
    blank = np.full_like(pixels, 128)
    gappy = list(decoded[:20]) + [blank] * 3 + list(decoded[23:])
    poses = estimate_head_poses(gappy)
    assert np.isnan(poses[20:23]).all() and np.isfinite(poses[:20]).all() and np.isfinite(poses[23:]).all()
    result = head_rotation_speed(poses, fps)
    assert result.num_missing == 3
    assert abs(np.median(result.speed) - truth) < 0.10 * truth


def test_still_video_speed_is_near_zero(portrait):
    """Identical frames: < 0.1 rad/s everywhere (measured max 0.03). With sensor-like noise (sigma 3 grey levels)
    per frame: mean < 0.1 rad/s and max < 0.2 rad/s (measured 0.045 and 0.07)."""
    pixels = np.asarray(portrait)
    still = head_rotation_speed(estimate_head_poses([pixels] * 30), 25)
    assert still.speed.max() < 0.1
    rng = np.random.default_rng(0)
    noisy = [np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).astype(np.uint8) for _ in range(30)]
    speed = head_rotation_speed(estimate_head_poses(noisy), 25).speed
    assert speed.mean() < 0.1 and speed.max() < 0.2


def test_no_face_in_any_frame_and_bad_frames():
    blank = np.full((128, 128, 3), 90, np.uint8)
    poses = estimate_head_poses([blank] * 3)
    assert poses.shape == (3, 3) and np.isnan(poses).all()
    with pytest.raises(EMOInputError, match="no face was found in any of the 3 video frames"):
        head_rotation_speed(poses, 25)
    with pytest.raises(EMOInputError, match=r"video frame 1: expected \(H, W, 3\) uint8"):
        estimate_head_poses([blank, blank.astype(np.float32)])


def test_face_detections_container():
    empty = FaceDetections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32))
    assert len(empty) == 0
    with pytest.raises(EMOInputError, match="no face was found in clip.png"):
        select_face(empty, source="clip.png")
