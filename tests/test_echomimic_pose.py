"""EchoMimic's pose condition: our landmark render against EchoMimic's own `FaceMeshVisualizer` and our mediapipe
face mesh against its landmark extractor (golden: tests/goldens/make_echomimic_pose_golden.py), the time resampling
of the pose video, and per-frame face features in the backbone. Generation with the pose variants:
tests/test_echomimic.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from echomimic_goldens import GOLDEN, pose_golden

from emo_pipeline.echomimic_pose import frame_landmarks, pose_source_frames, render_pose, render_poses


@pytest.mark.parametrize(
    ("key", "size"), [("render_512", (512, 512)), ("render_96", (96, 96)), ("render_80x64", (80, 64))]
)
def test_render_equals_echomimics_draw_landmarks(key, size):
    """Bit-exact: the same mediapipe edge sets, colours, thickness, pixel rounding, pupil/nose squares and resize."""
    golden = pose_golden()
    for landmarks, expected in zip(golden["landmarks"], golden[key]):
        render = render_pose(landmarks[:, :2], *size)
        assert render.shape == expected.shape and (expected > 0).any()
        np.testing.assert_array_equal(render, expected)


def test_render_of_landmarks_off_and_on_the_border_equals_echomimics():
    """Points outside [0, 1] skipped, a pupil square at a corner (EchoMimic's negative slice start kept as is)."""
    golden = pose_golden()
    for landmarks, expected in zip(golden["edge_landmarks"], golden["edge_render_512"]):
        np.testing.assert_array_equal(render_pose(landmarks, 512, 512), expected)
    assert not render_pose(None, 64, 64).any()  # no face: EchoMimic's blank canvas


def test_face_mesh_landmarks_are_within_a_few_pixels_of_echomimics_extractor():
    """Our extractor (mediapipe 0.10.21's bundled face mesh with iris) against EchoMimic's (the Tasks face landmarker
    v2 it ships) on the same frames, in pixels of the 512 canvas: measured mean 0.72-0.96, max 4.2 (the two bundles
    hold different model files); the renders then differ in 0.06-0.08% of their values."""
    golden = pose_golden()
    ours = frame_landmarks(golden["frames"])
    for landmarks, theirs in zip(ours, golden["landmarks"]):
        assert landmarks is not None and landmarks.shape == (478, 2)
        pixels = np.abs(landmarks - theirs[:, :2]) * 512
        assert pixels.mean() < 1.5 and pixels.max() < 6.0


def test_pose_frames_are_resampled_by_time():
    """Output frame i (from t = i / fps) takes the pose frame on screen at t: equal rates pair frame i with frame i
    (EchoMimic's file i -> frame i); other rates repeat or skip frames, never stretch the video."""
    np.testing.assert_array_equal(pose_source_frames(5, 24, 24), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(pose_source_frames(6, 24, 12), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(pose_source_frames(6, 24, 30), [0, 1, 2, 3, 5, 6])
    np.testing.assert_array_equal(pose_source_frames(4, 25, 29.97), [0, 1, 2, 3])
    np.testing.assert_array_equal(pose_source_frames(3, 24000 / 1001, 24), [0, 1, 2])


def test_render_poses_is_the_face_locators_input():
    """`(F, 3, H, W)` float in [0, 1] = the renders / 255, channels first (EchoMimic's pose list)."""
    landmarks = pose_golden()["landmarks"][:, :, :2]
    tensor = render_poses(landmarks, 96, 96)
    assert tensor.shape == (3, 3, 96, 96) and tensor.dtype == torch.float32
    expected = torch.from_numpy(pose_golden()["render_96"]).permute(0, 3, 1, 2) / 255.0
    torch.testing.assert_close(tensor, expected, atol=0, rtol=0)


def test_per_frame_face_features_reach_each_frame():
    """The backbone takes per-frame face features `(B, F, C, h, w)` (pose) beside shared ones `(B, C, h, w)`: equal
    frames give the shared result exactly; the per-frame masks `(B, F, 3, H, W)` encoded inside the forward (offload)
    give the precomputed features' result."""
    from emo_pipeline.echomimic import EchoMimicModels, build_echomimic_models

    torch.manual_seed(0)
    models: EchoMimicModels = build_echomimic_models(
        json.loads((GOLDEN / "unet_config.json").read_text()), whisper_layers=2, face_channels=3
    )
    for parameter in models.backbone.face_locator.parameters():  # its last conv is zero-initialised
        parameter.data.normal_(0, 0.2)
    frames, backbone = 3, models.backbone
    sample = torch.randn(1, 4, frames, 12, 12)
    tokens = torch.randn(frames, 20, 384)
    masks = torch.rand(1, frames, 3, 96, 96)
    with torch.no_grad():
        shared = models.face_features(masks[:, 0])
        per_frame = models.face_features(masks)
    assert per_frame.shape == (1, frames, *shared.shape[1:])

    @torch.no_grad()
    def run(**kwargs):
        return backbone(sample, 10, return_dict=False, **{"audio_tokens": tokens, **kwargs})[0]

    same = shared[:, None].expand(-1, frames, -1, -1, -1)
    torch.testing.assert_close(run(face_features=same), run(face_features=shared), atol=0, rtol=0)
    varied = run(face_features=per_frame)
    assert (varied - run(face_features=shared)).abs().max() > 1e-3
    features = tokens.reshape(1, frames, 10, 2, 384)
    torch.testing.assert_close(run(audio_tokens=None, audio_features=features, face_mask=masks), varied)
