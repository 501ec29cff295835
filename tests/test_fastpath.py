"""Fast path: the float32 pieces of a bf16 pipeline, and the TAESD preview decoder (`decoder="tiny"`)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from pipeline_settings import IMAGE, settings

from emo_pipeline import EMOInputError
from emo_pipeline.pipeline_emo import DEFAULT_TINY_DECODER
from emo_pipeline.testing import TINY_TAESD_CONFIG, tiny_emo_pipeline, tiny_taesd

AUDIO = (np.random.default_rng(0).standard_normal(round(0.2 * 16000)) * 0.1).astype(np.float32)  # 5 frames, 2 clips


@pytest.fixture(scope="module")
def pipe():
    return tiny_emo_pipeline()


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd")
    tiny_taesd().save_pretrained(folder)
    return folder


def test_tiny_decoder_loads_from_a_folder_and_decodes_the_video(pipe, taesd_folder):
    loaded = pipe.load_tiny_decoder(taesd_folder)
    assert pipe.tiny_decoder is loaded
    latents = pipe(IMAGE, AUDIO, **settings(output_type="latent")).frames  # (1, 4, 8, 8, 8): 2 clips, untrimmed
    frames = pipe(IMAGE, AUDIO, **settings(decoder="tiny")).frames
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.float32
    assert frames.min() >= 0 and frames.max() <= 1
    # TAESD decodes the UNet's (scaled) latents as they are; its output is in [-1, 1] like the VAE's.
    first = latents[0, :, 0][None]
    with torch.no_grad():
        expected = (loaded.decode(first).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(frames[0], expected, atol=1e-5)
    # ... and it is a different decoder from the VAE (its frames are not the VAE's).
    vae_frames = pipe.decode_latents(latents)[:5].permute(0, 2, 3, 1).numpy()
    assert np.abs(frames - vae_frames).mean() > 0.01
    np.testing.assert_allclose(pipe(IMAGE, AUDIO, **settings()).frames, vae_frames, atol=1e-6)  # default: the VAE


def test_missing_or_unusable_tiny_decoder_is_an_input_error_naming_it(tmp_path, taesd_folder):
    pipe = tiny_emo_pipeline()
    with pytest.raises(EMOInputError, match="no-such-taesd"):
        pipe.load_tiny_decoder(tmp_path / "no-such-taesd")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(EMOInputError, match=DEFAULT_TINY_DECODER):  # offline: the default hub id is not there
        pipe(IMAGE, AUDIO, **settings(decoder="tiny"))
    assert calls == []  # reported before any denoising
    with pytest.raises(EMOInputError, match="decoder must be one of"):
        pipe(IMAGE, AUDIO, **settings(decoder="taesd"))
    wrong = tmp_path / "taesd-16-channels"
    torch.manual_seed(0)
    type(tiny_taesd())(**{**TINY_TAESD_CONFIG, "latent_channels": 16}).save_pretrained(wrong)
    with pytest.raises(EMOInputError, match="16-channel"):
        pipe.load_tiny_decoder(wrong)
    assert pipe.tiny_decoder is None


def test_bf16_pipeline_runs_the_models_in_bf16_and_keeps_the_scheduler_in_float32():
    """Schedulers do their arithmetic in the latents' dtype: bf16 latents would round each step's update to 8 bits.
    The backbone gets bf16 input; guidance, the scheduler's step, callbacks and "latent" output see float32."""
    pipe = tiny_emo_pipeline().to(torch.bfloat16)
    seen = {"unet": set(), "step": set(), "callback": set(), "reference_net": set()}
    pipe.unet.register_forward_pre_hook(lambda m, a: seen["unet"].add(a[0].dtype))
    pipe.reference_net.register_forward_pre_hook(lambda m, a: seen["reference_net"].add(a[0].dtype))
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kwargs):
        seen["step"].update({model_output.dtype, sample.dtype})
        return step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = recording_step

    def callback(pipe, step, timestep, tensors):
        seen["callback"].update(value.dtype for value in tensors.values())
        return {}

    latents = pipe(
        IMAGE,
        AUDIO,
        **settings(
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents", "motion_latents"],
        ),
    ).frames
    assert seen == {
        "unet": {torch.bfloat16},
        "reference_net": {torch.bfloat16},
        "step": {torch.float32},
        "callback": {torch.float32},
    }
    assert latents.dtype == torch.float32
    frames = pipe(IMAGE, AUDIO, **settings()).frames  # the bf16 VAE decodes; frames come out float32
    assert frames.dtype == np.float32 and frames.shape == (5, 64, 64, 3)
