"""Seeded tiny components for tests, the demo and benchmarks.

Every factory builds a randomly initialised model from a fixed seed, small enough to run a whole video on a CPU
in seconds. Random weights produce noise, not faces: these exist to exercise every code path, not to look good.
`SD15_SHAPED_*` configs have Stable Diffusion 1.5's real layer sizes (random weights) for benchmarks.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from emo_pipeline.models.backbone import EMOUNet3DConditionModel
from emo_pipeline.models.reference_net import ReferenceNet

__all__ = [
    "TINY_EMO_CONFIG",
    "TINY_TAESD_CONFIG",
    "TINY_MOTION_ADAPTER_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_WAV2VEC2_CONFIG",
    "randomize_zero_initialized_layers",
    "SD15_SCHEDULER_CONFIG",
    "demo_assets",
    "tiny_emo_models",
    "tiny_emo_pipeline",
    "sd15_shaped_pipeline",
    "tiny_motion_adapter",
    "tiny_taesd",
    "tiny_unet2d",
    "tiny_vae",
    "tiny_wav2vec2",
    "to_original_animatediff_state_dict",
]

TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,  # as SD1.5, so per-layer indexing is exercised
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 2,  # diffusers' legacy name for the number of heads
    "norm_num_groups": 8,
}

TINY_MOTION_ADAPTER_CONFIG = {
    "block_out_channels": (32, 64),
    "motion_layers_per_block": 2,
    "motion_num_attention_heads": 2,
    "motion_norm_num_groups": 8,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}

# Four blocks: the SD VAE's downscale factor of 8 with tiny widths.
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}

# TAESD's layout (three 2x upsamplings: factor 8, 4 latent channels) with 8 channels instead of 64.
TINY_TAESD_CONFIG = {
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": 4,
}

# Conv strides multiply to 320 like wav2vec2-base, so features come at 50 Hz as with the real model.
TINY_WAV2VEC2_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "conv_dim": (16, 16, 16),
    "conv_stride": (5, 8, 8),
    "conv_kernel": (10, 8, 8),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}

TINY_EMO_CONFIG = {
    "motion_num_attention_heads": 2,
    "audio_projection_config": {
        "window_size": 5,
        "num_layers": TINY_WAV2VEC2_CONFIG["num_hidden_layers"],
        "audio_dim": TINY_WAV2VEC2_CONFIG["hidden_size"],
        "num_tokens": 4,
        "hidden_dim": 32,
    },
    "face_locator_config": {"channels": (4, 8, 8, 16)},
    "speed_encoder_config": {"hidden_dim": 16, "embed_dim": 16},
}


# Stable Diffusion 1.5's noise schedule (its scheduler_config.json), used by every EMO stage.
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def demo_assets() -> tuple[Path, Path]:
    """Paths of the bundled demo portrait (public-domain astronaut photo) and speech (espeak-ng)."""
    root = Path(__file__).parent / "assets"
    return root / "portrait.png", root / "speech.wav"


def tiny_unet2d(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def tiny_motion_adapter(seed: int = 1) -> MotionAdapter:
    torch.manual_seed(seed)
    return MotionAdapter(**TINY_MOTION_ADAPTER_CONFIG).eval()


def tiny_vae(seed: int = 2) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval()


def tiny_taesd(seed: int = 4) -> AutoencoderTiny:
    """A seeded tiny `AutoencoderTiny` (TAESD's architecture) for `decoder="tiny"` tests."""
    torch.manual_seed(seed)
    return AutoencoderTiny(**TINY_TAESD_CONFIG).eval()


def tiny_wav2vec2(seed: int = 3) -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    torch.manual_seed(seed)
    model = Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2_CONFIG)).eval()
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    return model, extractor


def tiny_emo_models(
    seed: int = 0, motion_adapter: MotionAdapter | None = None, **emo_config
) -> tuple[ReferenceNet, EMOUNet3DConditionModel]:
    """A ReferenceNet and backbone built from one tiny SD UNet, as `build_emo_pipeline` builds them from SD1.5."""
    unet = tiny_unet2d(seed)
    torch.manual_seed(seed + 10)
    config = {**TINY_EMO_CONFIG, **emo_config}
    if motion_adapter is not None:
        config.pop("motion_num_attention_heads")  # the adapter decides
    backbone = EMOUNet3DConditionModel.from_unet2d(unet, motion_adapter=motion_adapter, **config).eval()
    return ReferenceNet.from_unet2d(unet).eval(), backbone


@torch.no_grad()
def randomize_zero_initialized_layers(backbone: EMOUNet3DConditionModel, seed: int = 0, scale: float = 0.1) -> None:
    """Give the zero-initialised layers (temporal proj_out, speed outputs, face locator conv_out) random weights,
    as training would, so tests can see each conditioning input change the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in backbone.named_parameters():
        if name.endswith(("proj_out.weight", "proj_out.bias", "conv_out.weight", "conv_out.bias")) or (
            ".speed_attentions." in name and ".to_out." in name
        ):
            if "motion_modules" in name or name.startswith("face_locator."):
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(noise.to(parameter))


def to_original_animatediff_state_dict(adapter: MotionAdapter) -> dict[str, torch.Tensor]:
    """A MotionAdapter's weights in the original AnimateDiff key layout (as in `mm_sd_v15_v2.ckpt`), the inverse
    of diffusers' conversion, with the `pos_encoder.pe` tables the original files carry."""
    state = {}
    for key, value in adapter.state_dict().items():
        if key.endswith("pos_embed.pe"):
            key = key.replace("pos_embed.pe", "pos_encoder.pe")
        key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        key = (
            key.replace(".attn1.", ".attention_blocks.0.")
            .replace(".attn2.", ".attention_blocks.1.")
            .replace(".norm1.", ".norms.0.")
            .replace(".norm2.", ".norms.1.")
            .replace(".norm3.", ".ff_norm.")
        )
        if key.endswith(".pos_encoder.pe"):  # the original keeps one table per temporal attention
            for i in (0, 1):
                state[key.replace(".pos_encoder.pe", f".attention_blocks.{i}.pos_encoder.pe")] = value.clone()
            continue
        state[key] = value.clone()
    return state


def tiny_emo_pipeline(seed: int = 0, motion_adapter: MotionAdapter | None = None):
    """A complete EMOPipeline of seeded tiny random components (64 px is a natural size: VAE factor 8)."""
    from emo_pipeline.pipeline_emo import EMOPipeline

    reference_net, unet = tiny_emo_models(seed, motion_adapter=motion_adapter)
    audio_encoder, feature_extractor = tiny_wav2vec2(seed + 3)
    pipe = EMOPipeline(
        vae=tiny_vae(seed + 2),
        reference_net=reference_net,
        unet=unet,
        audio_encoder=audio_encoder,
        feature_extractor=feature_extractor,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_shaped_pipeline(seed: int = 0):
    """An EMOPipeline with Stable Diffusion 1.5's real layer sizes (and AnimateDiff v2 / wav2vec2-base shapes),
    randomly initialised: for speed and memory benchmarks without downloading weights (~9 GB in fp32)."""
    from emo_pipeline.pipeline_emo import EMOPipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # SD1.5's config
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    backbone = EMOUNet3DConditionModel.from_unet2d(unet, motion_adapter=MotionAdapter())
    audio_encoder = Wav2Vec2Model(Wav2Vec2Config()).eval()  # wav2vec2-base
    pipe = EMOPipeline(
        vae=vae.eval(),
        reference_net=ReferenceNet.from_unet2d(unet).eval(),
        unet=backbone.eval(),
        audio_encoder=audio_encoder,
        feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=False),
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
