"""The context-window schedule of the one sampling loop (`emo_pipeline.sampling.sample_windows`, EchoMimic's kind),
driven here by a small window run over the tiny EMO backbone: windows, averaging, the shared step core."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from emo_pipeline.families.base import BranchInputs, Window
from emo_pipeline.models.attention import ReferenceFeatures
from emo_pipeline.sampling import average_windows, context_windows, sample_windows
from emo_pipeline.settings import GenerationSettings
from emo_pipeline.testing import tiny_emo_pipeline

FRAMES = 8


def test_context_windows_wrap_shift_and_cover_every_frame() -> None:
    """EchoMimic's windows: 12 frames every 9, the last wrapping to the start, all shifted by 2 x the step."""
    windows = context_windows(20, 12, 9)
    assert windows == [list(range(12)), [*range(9, 20), 0]]
    shifted = context_windows(20, 12, 9, shift=4)
    assert shifted[0][0] == 4 and shifted[-1] == [(13 + i) % 20 for i in range(12)]
    assert context_windows(10, 12, 9) == [list(range(10))]  # shorter than a window: one window
    counts = torch.zeros(20)
    for window in context_windows(20, 12, 9, shift=6):
        counts[window] += 1
    assert (counts >= 1).all()
    noise = torch.ones(1, 1, 20, 1, 1) * counts.view(1, 1, -1, 1, 1)  # every window predicted 1
    assert torch.equal(average_windows(noise, counts), torch.ones_like(noise))


@dataclass
class EMOWindowRun:
    """A window run (`families.base.WindowRun`) over the tiny EMO backbone: the portrait's reference tokens, random
    audio features per frame, no motion frames; `windows_of(step)` gives the windows."""

    pipe: object
    audio: torch.Tensor  # (1, N, 2m+1, L, D)
    reference: ReferenceFeatures
    windows_of: object
    noise: torch.Tensor | None = None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, 4, self.audio.shape[1], 8, 8)

    latent_dtype = torch.float32

    def transform_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise if self.noise is None else self.noise

    def windows(self, step, timestep):
        for frames in self.windows_of(step):
            audio = self.audio[:, frames]
            guided = {"audio_features": torch.cat([torch.zeros_like(audio), audio])}
            guided["reference_features"] = self.reference
            yield Window(frames, BranchInputs(guided=guided, conditional={**guided, "audio_features": audio}))

    def combine(self, noise, count, guided):
        return average_windows(noise, count)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_emo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_run(pipe, windows_of, noise=None, frames=FRAMES):
    config = pipe.unet.audio_proj.config
    shape = (1, frames, config.window_size, config.num_layers, config.audio_dim)
    audio = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    portrait = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))  # the portrait's latents
    reference = pipe.unet.prepare_reference(pipe.reference_net(portrait))
    reference = ReferenceFeatures(spatial=reference.spatial, key_value=reference.key_value)  # no motion frames
    return EMOWindowRun(pipe, audio, reference, windows_of, noise)


def settings(**overrides) -> GenerationSettings:
    return GenerationSettings(num_inference_steps=2, generator=torch.Generator().manual_seed(0), **overrides)


def test_disjoint_windows_denoise_as_separate_videos_of_their_frames(pipe) -> None:
    """With windows that do not overlap, the joint run equals each window denoised alone from its slice of the same
    noise: the loop's indexing, per-window predictions and single scheduler step are exact."""
    noise = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(3))
    halves = [list(range(4)), list(range(4, 8))]
    joint = sample_windows(pipe, make_run(pipe, lambda step: halves, noise), settings())
    for frames in halves:
        run = make_run(pipe, lambda step: [list(range(4))], noise[:, :, frames])
        run.audio = make_run(pipe, None).audio[:, frames]
        alone = sample_windows(pipe, run, settings())
        torch.testing.assert_close(joint[:, :, frames], alone, atol=1e-5, rtol=0)


def test_overlapping_shifted_windows_run_guided_batches_and_skip_the_unconditional_branch(pipe) -> None:
    """Shifted, wrapping, overlapping windows: every window one backbone call of batch 2 with guidance, batch 1 at
    guidance <= 1; a callback sees (and may replace) the whole video's latents."""
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[:3]))
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return {}

    try:
        windows_of = lambda step: context_windows(FRAMES, 6, 4, shift=2 * step)  # noqa: E731
        latents = sample_windows(pipe, make_run(pipe, windows_of), settings(callback_on_step_end=callback))
        assert batches == [(2, 4, 6)] * 4 and seen == [(1, 4, FRAMES, 8, 8)] * 2
        assert torch.isfinite(latents).all()
        batches.clear()
        sample_windows(pipe, make_run(pipe, windows_of), settings(guidance_scale=1.0))
        assert batches == [(1, 4, 6)] * 4
    finally:
        hook.remove()


def test_a_window_family_plugs_into_the_pipeline_and_streams_its_frames(pipe, monkeypatch) -> None:
    """The seam a window family (EchoMimic) uses: `Family.schedule = "windows"` and `prepare` returning its run; the
    pipeline runs `sample_windows` once for the whole video, then decodes and yields it clip by clip."""
    import numpy as np
    import PIL.Image

    import emo_pipeline.families as families
    from emo_pipeline.face import PreparedPortrait
    from emo_pipeline.families.base import Family, Plan

    class WindowFamily(Family):
        name, label, schedule = "windows-test", "a window family", "windows"

        @classmethod
        def matches(cls, pipe) -> bool:
            return True

        def prepare(self, image, audio, settings, precompute):
            portrait = PreparedPortrait(
                image=PIL.Image.new("RGB", (64, 64)),
                face_box=np.zeros(4, np.float32),
                mask=np.zeros((64, 64), np.float32),
            )
            plan = Plan(
                portrait=portrait, audio=np.zeros(16000 * FRAMES // 25, np.float32), num_frames=FRAMES - 1, num_clips=2
            )
            return plan, make_run(self.pipe, lambda step: context_windows(FRAMES, 6, 4, shift=2 * step))

    monkeypatch.setattr(families, "family_of", lambda pipe: WindowFamily(pipe))
    clips = list(pipe.iter_clips(None, None, num_frames_per_clip=4, num_inference_steps=2, height=64, width=64))
    assert [len(clip) for clip in clips] == [4, 3]  # the last clip trimmed to the video's frames
    assert all(np.isfinite(clip).all() for clip in clips)
