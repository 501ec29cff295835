"""EchoMimic weights (antgroup/echomimic, Apache-2.0) through the one sampling loop (docs/echomimic_architecture.md).

Conversion: `emo-convert --echomimic pretrained_weights [--variant audio|acc|pose|pose_acc]`
(`emo_pipeline.echomimic.load_echomimic_pipeline`). Front end (`emo_pipeline.echomimic_inputs`): the face box
(`face_box=` in the portrait's pixels, else facenet-pytorch's MTCNN as EchoMimic runs it when it imports,
else in fast mode mediapipe's largest face) -> the crop (box grown by
50%, squared) and the face mask (box grown by 10%); whisper-tiny features of the whole track at 50 Hz (the mel
normalised over the track, encoded in 30 s segments), 10 steps per frame. Schedule: joint context windows over the
whole video (12 frames every 9, wrapping, shifted by 2 frames per step, overlaps averaged). Reference: the portrait
through the ReferenceNet (no attn2) once per video. Unconditional branch: zero audio tokens (attn2 still adds its
output bias, x 3), zero face features, self-attention without the reference tokens. Pose variants (`pose_video=`,
`emo_pipeline.echomimic_pose`): per-frame landmark renders into the 3-channel face locator, drawn per window; windows
shifted by 3 frames per step; no noise clamp (EchoMimic's pose pipelines). Modes (`EchoMimicSettings.mode`):

* "fast" (default): reference keys/values projected once per video, conditioning built once per window, guidance
  batched, overlapping predictions always averaged, no fp16 rounding of the reference bank; any scheduler.
* "parity": EchoMimic's pipelines exactly: the reference bank rounded to float16, its DDIM (the acc variants: its
  acc step rule, `EchoMimicAccScheduler`), and for the plain variants at guidance <= 1 its sum of overlapping
  window predictions without dividing (its acc pipeline divides).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler

from emo_pipeline.echomimic import (
    ECHOMIMIC_MODES,
    ECHOMIMIC_VARIANTS,
    EchoMimicAccScheduler,
    EchoMimicModels,
    reference_latents,
)
from emo_pipeline.echomimic_inputs import (
    detect_face_box,
    echomimic_face_crop,
    echomimic_frame_count,
    fallback_face_box,
    whisper_features,
    whisper_frame_tokens,
)
from emo_pipeline.errors import EMOInputError
from emo_pipeline.families.base import BranchInputs, Family, Plan, Window
from emo_pipeline.sampling import average_windows

__all__ = ["EchoMimicFamily", "EchoMimicSettings", "echomimic_context_windows"]

SAMPLE_RATE = 16000


@dataclass
class EchoMimicSettings:
    """Settings of EchoMimic weights (`pipe(..., mode="parity")`); other families refuse them.

    Args:
        mode: "fast" (default) or "parity" (EchoMimic's own pipelines exactly, its DDIM only); see
            `emo_pipeline.families.echomimic`.
        context_frames: frames per context window (EchoMimic: 12).
        context_overlap: frames shared by consecutive windows (EchoMimic: 3, so windows start every 9 frames).
        whisper_features: precomputed `(N, layers, 384)` whisper features at 50 Hz (`whisper_features`) in place of
            the track's (the video's length still follows them).
        pose_video: the pose variants' (`--variant pose|pose_acc`) driving video, a path: its face's mediapipe
            landmarks, one pose-video frame per output frame (resampled by time when its frame rate differs), rendered
            as EchoMimic renders them into the 3-channel face locator (`emo_pipeline.echomimic_pose`). It must cover
            the whole track and show a face in every frame used. Refused by the audio and acc variants.
        pose_landmarks: in place of `pose_video`, the landmarks themselves: `(N, >= 478, 2 or 3)` x, y normalised to
            the driving frame's centre square, row i for output frame i (N >= the video's frames). EchoMimic's
            `.pkl` pose files hold them in 512-pixel units: stack them and divide by 512.
    """

    mode: str = "fast"
    context_frames: int = 12
    context_overlap: int = 3
    whisper_features: torch.Tensor | None = None
    pose_video: Any = None
    pose_landmarks: Any = None


def echomimic_context_windows(num_frames: int, context_frames: int = 12, context_overlap: int = 3) -> list[list[int]]:
    """EchoMimic's windows (AnimateDiff's `uniform` schedule as its pipelines call it, at step 0, closed loop):
    `context_frames` frames starting at 0, s, 2s, ... for every start below `num_frames` (s = frames - overlap),
    wrapping; the whole video as one window when it is not longer. (`sampling.context_windows` stops earlier, at
    `num_frames - length + stride`: for 28 frames it makes 3 windows where EchoMimic makes 4.)"""
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    stride = context_frames - context_overlap
    return [[(j + k) % num_frames for k in range(context_frames)] for j in range(0, num_frames, stride)]


class EchoMimicFamily(Family):
    name = "echomimic"
    label = "EchoMimic"
    variants = tuple(ECHOMIMIC_VARIANTS)
    convert_option = "--echomimic"
    settings = EchoMimicSettings
    schedule = "windows"
    refused_settings = ("speed", "face_mask", "step_cache", "face_index")
    refused_reason = "no speed condition; the face mask comes from the face box (face_box=); no step cache yet"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        config = getattr(pipe.unet.config, "audio_projection_config", None) or {}
        return bool(config.get("passthrough")) and getattr(pipe.unet.config, "audio_attention_scale", 1.0) != 1.0

    def check_settings(self, settings: Any) -> None:
        used = [name for name in self.refused_settings if getattr(settings, name) is not None]
        if used:
            raise EMOInputError(f"{used} are not available with EchoMimic weights ({self.refused_reason})")
        own: EchoMimicSettings = settings.family_settings
        if own.mode not in ECHOMIMIC_MODES:
            raise EMOInputError(f"mode must be one of {ECHOMIMIC_MODES}, got {own.mode!r}")
        if not (isinstance(own.context_frames, int) and 0 <= own.context_overlap < own.context_frames):
            raise EMOInputError(
                f"context_frames must be an int above context_overlap >= 0, got {own.context_frames!r} / "
                f"{own.context_overlap!r}"
            )
        if own.context_frames > self.pipe.unet.config.motion_max_seq_length:
            raise EMOInputError(
                f"context_frames ({own.context_frames}) exceeds the temporal layers' table "
                f"({self.pipe.unet.config.motion_max_seq_length})"
            )
        if own.mode == "parity":
            if settings.decoder != "vae":
                raise EMOInputError("mode='parity' decodes with the VAE as EchoMimic does: use decoder='vae'")
            if type(self.pipe.scheduler) not in (DDIMScheduler, EchoMimicAccScheduler):
                raise EMOInputError(
                    f"mode='parity' is EchoMimic's own DDIM loop: the scheduler {type(self.pipe.scheduler).__name__} "
                    "cannot be used in it; use mode='fast' (every sampler) or pipe.set_scheduler('ddim')"
                )
        pose = self.pipe.unet.face_locator.config.in_channels == 3
        if own.pose_video is not None and own.pose_landmarks is not None:
            raise EMOInputError("pass pose_video or pose_landmarks, not both")
        given = "pose_video" if own.pose_landmarks is None else "pose_landmarks"
        if pose and own.pose_video is None and own.pose_landmarks is None:
            raise EMOInputError(
                "this pipeline holds EchoMimic's pose weights (a 3-channel face locator fed with per-frame landmark "
                "renders): pass pose_video= (emo-animate --pose-video), a video of the driving face at least as long "
                "as the audio"
            )
        if not pose and (own.pose_video is not None or own.pose_landmarks is not None):
            raise EMOInputError(
                f"{given}= drives EchoMimic's pose variants only; this pipeline holds its audio-driven weights (a "
                f"1-channel face locator): drop {given}, or convert --variant pose or pose_acc"
            )
        if pose and isinstance(own.pose_video, (str, os.PathLike)) and not os.path.isfile(own.pose_video):
            raise EMOInputError(f"pose_video {os.fspath(own.pose_video)!r} does not exist or is not a file")
        if self.pipe.audio_encoder is None and own.whisper_features is None:
            raise EMOInputError("this pipeline has no whisper encoder (audio_encoder): pass whisper_features=")

    def prepare(self, image: Any, audio: Any, settings: Any, precompute: bool) -> tuple[Plan, _EchoMimicRun]:
        from emo_pipeline.audio import load_audio
        from emo_pipeline.face import PreparedPortrait, load_image

        own: EchoMimicSettings = settings.family_settings
        if image is None or audio is None:
            raise EMOInputError("pass a portrait image and an audio track")
        rgb = np.asarray(load_image(image).convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # EchoMimic reads the portrait with cv2 (BGR)
        box = settings.face_box
        if box is None:
            try:
                box = detect_face_box(bgr, device=self.pipe._execution_device)
            except EMOInputError:
                if own.mode == "parity":  # parity needs EchoMimic's own box: one pixel moves the frames
                    raise
                box = fallback_face_box(rgb)  # fast mode: mediapipe's box (not EchoMimic's detector)
            if box is None:
                raise EMOInputError(
                    f"no face found in the portrait {image!s:.100}: pass face_box=(x0, y0, x1, y1) in its pixels"
                )
        crop_bgr, mask = echomimic_face_crop(bgr, box, settings.width, settings.height)
        crop = np.ascontiguousarray(crop_bgr[:, :, ::-1])
        samples = load_audio(
            audio, SAMPLE_RATE, max_duration=settings.max_audio_seconds, src_sample_rate=settings.audio_sample_rate
        )
        features = own.whisper_features
        if features is None:
            features = whisper_features(samples, self.pipe.audio_encoder.eval())
        elif features.ndim != 3 or features.shape[-1] != 384:
            raise EMOInputError(f"whisper_features must be (N, layers, 384), got {tuple(features.shape)}")
        num_frames = echomimic_frame_count(features.shape[0], settings.fps)
        pose = None
        if own.pose_video is not None:
            from emo_pipeline.echomimic_pose import pose_video_landmarks

            pose = pose_video_landmarks(own.pose_video, num_frames, settings.fps).landmarks
        elif own.pose_landmarks is not None:
            pose = np.asarray(own.pose_landmarks, dtype=np.float32)
            if pose.ndim != 3 or pose.shape[1] < 478 or pose.shape[2] not in (2, 3) or len(pose) < num_frames:
                raise EMOInputError(
                    f"pose_landmarks must be (N >= {num_frames} frames, >= 478, 2 or 3) normalised x, y, got "
                    f"{pose.shape}"
                )
            pose = pose[:num_frames, :, :2]
        portrait = PreparedPortrait(
            image=PIL.Image.fromarray(crop), face_box=np.asarray(box, dtype=np.float32), mask=mask / 255.0
        )
        plan = Plan(portrait=portrait, audio=samples, num_frames=num_frames, num_clips=1)
        return plan, _EchoMimicRun(self.pipe, crop, mask, features, num_frames, settings, own, precompute, pose)


class _EchoMimicRun:
    """EchoMimic's joint context-window schedule (`emo_pipeline.families.base.WindowRun`).

    Pose variants (`pose`: `(num_frames, 478, 2)` landmarks): the face locator sees each frame's landmark render,
    computed per window (nothing per frame is held beyond the landmarks); as EchoMimic's pose pipelines, the windows
    shift by 3 frames per step (2 in the audio pipelines) and the initial noise is not clamped.
    """

    def __init__(self, pipe, crop, mask, features, num_frames, settings, own, precompute: bool, pose=None):
        self.pipe, self.fps, self.precompute = pipe, settings.fps, precompute
        self.parity = own.mode == "parity"
        self.pose, self.size = pose, (settings.width, settings.height)
        self.shift = 2 if pose is None else 3  # pipeline_echo_mimic.py: t_i * 2; pipeline_echo_mimic_pose*.py: t_i * 3
        device, dtype = pipe._execution_device, pipe.unet.dtype
        self.models = models = EchoMimicModels(pipe.reference_net, pipe.unet)
        if not self.parity:
            models.bank_dtype = None
        latents = reference_latents(pipe.vae, crop).to(device, dtype)
        self.reference = models.encode_reference(latents)
        if precompute and not self.parity:
            self.reference = pipe.unet.prepare_reference(self.reference)  # keys/values once per video
        self.mask = torch.from_numpy(mask).float()[None, None].div(255.0).to(device, dtype)
        self.face = models.face_features(self.mask) if precompute and pose is None else None
        self.features = features.to(device, dtype)
        self.windows_base = echomimic_context_windows(num_frames, own.context_frames, own.context_overlap)
        h, w = latents.shape[-2:]
        self.latent_shape = (1, 4, num_frames, h, w)
        self.latent_dtype = torch.float32
        # EchoMimic's plain pipeline at CFG <= 1 sums overlapping predictions (its acc pipeline divides; its plain
        # pose pipeline cannot run there: its reference bank is doubled for guidance whatever the scale)
        self.sum_unguided = self.parity and pose is None and not isinstance(pipe.scheduler, EchoMimicAccScheduler)

    def transform_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """EchoMimic clamps the unit noise to +-1.5 before scaling by `init_noise_sigma` (not its pose pipelines)."""
        if self.pose is not None:
            return noise
        sigma = self.pipe.scheduler.init_noise_sigma
        return (noise / sigma).clamp(-1.5, 1.5) * sigma

    def _pose_masks(self, frames: list[int]) -> torch.Tensor:
        """`(1, f, 3, H, W)` landmark renders of the window's frames in [0, 1]."""
        from emo_pipeline.echomimic_pose import render_poses

        renders = render_poses(self.pose[frames], *self.size)
        return renders[None].to(self.features.device, self.pipe.unet.dtype)

    def _inputs(self, frames: list[int]) -> BranchInputs:
        tokens = whisper_frame_tokens(self.features, frames, self.fps)  # (f, 10 * layers, 384)
        reference, device = self.reference, self.features.device
        face, mask = self.face, self.mask
        if self.pose is not None:
            mask = self._pose_masks(frames)
            face = self.models.face_features(mask) if self.precompute else None

        def guided() -> dict:
            inputs = self.models.guidance_inputs(tokens, face, True) if self.precompute else self._raw(tokens, mask, 2)
            return {
                **inputs,
                "reference_features": reference,
                "reference_rows": torch.tensor([False, True], device=device),
            }

        def conditional() -> dict:
            inputs = (
                self.models.guidance_inputs(tokens, face, False) if self.precompute else self._raw(tokens, mask, 1)
            )
            return {**inputs, "reference_features": reference}

        return BranchInputs(guided=guided, conditional=conditional)

    def _raw(self, tokens: torch.Tensor, mask: torch.Tensor, rows: int) -> dict:
        """Under offload hooks: the raw inputs, encoded (and zeroed for the uncond row) inside the forward."""
        layers = tokens.shape[1] // 10
        features = tokens.reshape(1, tokens.shape[0], 10, layers, tokens.shape[-1]).expand(rows, -1, -1, -1, -1)
        inputs = {"audio_features": features, "face_mask": mask}
        if rows == 2:
            inputs["unconditional_rows"] = torch.tensor([True, False], device=tokens.device)
        return inputs

    def windows(self, step: int, timestep: torch.Tensor) -> Iterator[Window]:
        frames_total = self.latent_shape[2]
        for window in self.windows_base:
            frames = [(c + self.shift * step) % frames_total for c in window]  # EchoMimic: (c + t_i * 2) % length
            yield Window(frames=frames, inputs=self._inputs(frames))

    def combine(self, noise: torch.Tensor, count: torch.Tensor, guided: bool) -> torch.Tensor:
        if not guided and self.sum_unguided:
            return noise
        return average_windows(noise, count)
