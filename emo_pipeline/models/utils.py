"""Small helpers shared by the model classes."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from diffusers.utils import logging as diffusers_logging

__all__ = ["ZERO_SNR_V_PREDICTION_SCHEDULER", "extend_init_signature", "quiet_diffusers", "to_like"]

#: The DDIM settings Hallo's and EchoMimic's inference configs share (both trained after Moore-AnimateAnyone):
#: SD's betas, v-prediction, zero terminal SNR, trailing timesteps.
ZERO_SNR_V_PREDICTION_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def extend_init_signature(base_init, **extra_defaults) -> inspect.Signature:
    """Signature of `base_init` plus keyword-only `extra_defaults`.

    Lets a subclass of a diffusers model add config fields without restating the parent's ~40 arguments: diffusers'
    `register_to_config` and `from_config` read the config fields from `inspect.signature(cls.__init__)`.
    """
    base = inspect.signature(base_init)
    params = [p for p in base.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in extra_defaults.items()]
    return base.replace(parameters=params)


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' info/warning logs for a block (e.g. its warning about casting to the same dtype)."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def to_like(model: torch.nn.Module, reference: torch.nn.Module) -> torch.nn.Module:
    """Move `model` to `reference`'s device and dtype, changing only what differs (`.to(dtype)` logs a warning)."""
    parameter = next(reference.parameters())
    model.to(parameter.device)
    if next(model.parameters()).dtype != parameter.dtype:
        model.to(parameter.dtype)
    return model
