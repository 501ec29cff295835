"""The noise schedule of a training run, and the same schedule for the pipeline's sampler.

Training noises latents with a DDPM schedule; the pipeline samples with its own scheduler (DDIM by default). Both
must agree on the prediction type (epsilon or v, Salimans & Ho 2022) and on the betas (zero terminal SNR, Lin et
al. 2024, arXiv 2305.08891), or the exported pipeline reads a v-prediction as noise. Zero terminal SNR also needs
"trailing" timesteps at sampling (Lin et al., Sec. 3.3), so that the first step is the pure-noise timestep.
"""

from __future__ import annotations

from typing import Any

from emo_pipeline.config import TrainConfig, check_noise_schedule

__all__ = ["noise_schedule", "sampling_scheduler", "training_scheduler"]


def noise_schedule(pretrained_config: Any, config: TrainConfig) -> dict[str, Any]:
    """The noise-schedule fields of this run: the config's, else the pretrained scheduler's (checked).

    Returns `{"prediction_type", "rescale_betas_zero_snr"}` plus `"timestep_spacing": "trailing"` with zero SNR.
    """
    prediction_type = config.prediction_type or pretrained_config.get("prediction_type", "epsilon")
    zero_snr = config.zero_terminal_snr
    if zero_snr is None:
        zero_snr = bool(pretrained_config.get("rescale_betas_zero_snr", False))
    check_noise_schedule(prediction_type, zero_snr, config.snr_gamma)
    fields: dict[str, Any] = {"prediction_type": prediction_type, "rescale_betas_zero_snr": zero_snr}
    if zero_snr:
        fields["timestep_spacing"] = "trailing"
    return fields


def training_scheduler(pretrained_scheduler, config: TrainConfig):
    """A `DDPMScheduler` with the pretrained pipeline's betas and this run's noise schedule (adds the noise)."""
    from diffusers import DDPMScheduler

    fields = noise_schedule(pretrained_scheduler.config, config)
    return DDPMScheduler.from_config(pretrained_scheduler.config, **fields)


def sampling_scheduler(pretrained_scheduler, config: TrainConfig):
    """The pipeline's scheduler class rebuilt with this run's noise schedule: what validation samples with and the
    exported pipeline saves."""
    return type(pretrained_scheduler).from_config(
        pretrained_scheduler.config, **noise_schedule(pretrained_scheduler.config, config)
    )
