"""The EMO backbone denoiser (arXiv 2402.17485, section 3.2): diffusers' `UNetMotionModel` with EMO's conditioning.

* attn1 of every spatial transformer block: reference attention (`ReferenceAttnProcessor`);
* attn2: audio cross-attention; its context is `audio_proj(audio_features)`, per-frame tokens `(B*F, T, 768)`
  in place of SD's text tokens (same width, so SD's attn2 weights are the initialisation);
* temporal layers: AnimateDiff motion modules that also see the motion frames and cross-attend to head speed
  (`EMOTemporalTransformer3D`);
* face locator features added to the `conv_in` output.

Per-call conditioning is written into one `ConditioningState` for the duration of a `forward` call; reference
attention is a forward pre-hook on each attn1 module, so it survives any attention processor (see
`emo_pipeline.models.attention`). The whole forward traces under `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import ModelMixin, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D, UNetMotionOutput
from diffusers.utils.accelerate_utils import apply_forward_hook

from emo_pipeline.errors import EMOInputError
from emo_pipeline.models.attention import (
    ConditioningState,
    EMOAttentionSwitches,
    ReferenceAttentionHook,
    ReferenceFeatures,
    broadcast_batch,
    check_reference_tokens,
    checkpoint_with_state,
    install_emo_processors,
    reference_key_value,
    reference_row_runs,
)
from emo_pipeline.models.audio_modules import AudioModuleHook, RegionAudioTransformer, audio_module_inner_dims
from emo_pipeline.models.audio_projection import AudioProjection
from emo_pipeline.models.face_locator import FaceLocator
from emo_pipeline.models.speed import SpeedEncoder
from emo_pipeline.models.step_cache import StepCache, StepCacheConfig, check_diffusers_cache, hooked_layers
from emo_pipeline.models.temporal import EMOTemporalTransformer3D
from emo_pipeline.models.utils import extend_init_signature, quiet_diffusers, to_like

__all__ = ["EMOUNet3DConditionModel", "ModelMixin"]

# Parameter groups the training stages select by name (see configs/train/*.yaml and emo_pipeline.config).
PARAMETER_GROUPS: dict[str, Callable[[str], bool]] = {
    "audio": lambda n: (
        n.startswith("audio_proj.") or ".audio_modules." in n or (".attn2." in n and "motion_modules" not in n)
    ),
    "face_locator": lambda n: n.startswith("face_locator."),
    "speed": lambda n: n.startswith("speed_encoder.") or ".speed_" in n,
    "temporal": lambda n: "motion_modules." in n and ".speed_" not in n,
}


def parameter_group(name: str) -> str:
    """The group a backbone parameter belongs to: audio, face_locator, speed, temporal or spatial (the rest)."""
    return next((group for group, test in PARAMETER_GROUPS.items() if test(name)), "spatial")


class EMOUNet3DConditionModel(EMOAttentionSwitches, CacheMixin, UNetMotionModel):
    """EMO backbone. Build it from an SD1.5 UNet with `from_unet2d`; load a saved one with `from_pretrained`."""

    # Regional compilation (`compile_repeated_blocks`): the spatial and temporal transformer blocks, Hallo's audio
    # module blocks; the conditioning hooks inside them are traced with them.
    _repeated_blocks = ["BasicTransformerBlock", "RegionAudioBlock"]

    def __init__(
        self,
        *args,
        audio_projection_config: dict | None = None,
        face_locator_config: dict | None = None,
        speed_encoder_config: dict | None = None,
        audio_attention: str = "attn2",
        temporal_norm: str = "across_frames",
        disabled_temporal_layers: list[str] | None = None,
        audio_module_config: dict | None = None,
        audio_attention_scale: float = 1.0,
        **kwargs,
    ):
        """EMO's own fields plus the options of other checkpoint families (defaults: EMO; DESIGN section 6):

        `audio_attention`: "attn2" (EMO: the spatial transformers' attn2 attends to the audio tokens) or
        "audio_modules" (Hallo: a region-masked audio transformer after every spatial transformer, attn2 then attends
        to `context_tokens`, e.g. identity tokens; `emo_pipeline.models.audio_modules`).
        `audio_module_config`: `{"heads": 8, "cross_attention_dim": audio token width, "inner_dims": {name: dim}}`
        (inner dims default to Hallo's rule, `audio_module_inner_dims`).
        `temporal_norm`: "across_frames" (diffusers / EMO) or "per_frame" (original AnimateDiff, Hallo).
        `disabled_temporal_layers`: temporal layers that are loaded but act as the identity (Hallo never runs
        `down_blocks.3.motion_modules.*` and `up_blocks.0.motion_modules.*`).
        `audio_attention_scale`: factor on the output of every spatial attn2 before its residual add (EchoMimic: 3.0,
        its `audio_feature_ratio`; the bias of `to_out` is scaled too, as in EchoMimic).
        """
        if audio_attention not in ("attn2", "audio_modules"):
            raise ValueError(f"audio_attention must be 'attn2' or 'audio_modules', got {audio_attention!r}")
        if temporal_norm not in ("across_frames", "per_frame"):
            raise ValueError(f"temporal_norm must be 'across_frames' or 'per_frame', got {temporal_norm!r}")
        super().__init__(*args, **kwargs)
        audio_projection_config = {"output_dim": self.config.cross_attention_dim, **(audio_projection_config or {})}
        face_locator_config = {"out_channels": self.config.block_out_channels[0], **(face_locator_config or {})}
        speed_encoder_config = dict(speed_encoder_config or {})
        self.audio_proj = AudioProjection(**audio_projection_config)
        self.face_locator = FaceLocator(**face_locator_config)
        self.speed_encoder = SpeedEncoder(**speed_encoder_config)
        if audio_attention == "attn2" and self.audio_proj.config.output_dim != self.config.cross_attention_dim:
            raise ValueError(
                f"audio_projection_config output_dim ({self.audio_proj.config.output_dim}) must equal the UNet's "
                f"cross_attention_dim ({self.config.cross_attention_dim})"
            )
        # Record the resolved sub-configs so save_pretrained/from_pretrained rebuild exactly this model.
        self.register_to_config(
            audio_projection_config=_public(self.audio_proj.config),
            face_locator_config=_public(self.face_locator.config),
            speed_encoder_config=_public(self.speed_encoder.config),
        )
        # Conditioning of the call in progress, shared by reference with every conditioned layer and hook.
        self._conditioning = ConditioningState()
        speed_dim = self.speed_encoder.config.embed_dim
        for name, module in list(self.named_modules()):
            if isinstance(module, AnimateDiffTransformer3D) and not isinstance(module, EMOTemporalTransformer3D):
                EMOTemporalTransformer3D.from_animatediff(module, name, speed_dim, self._conditioning)
        self._reference_layer_names: list[str] = []
        for name, module in self.named_modules():
            if name.endswith(".attn1") and "motion_modules" not in name and isinstance(module, Attention):
                module.register_forward_pre_hook(ReferenceAttentionHook(name, self._conditioning), with_kwargs=True)
                self._reference_layer_names.append(name)
        disabled = set(disabled_temporal_layers or ())
        unknown = disabled - set(self.temporal_layers)
        if unknown:
            raise ValueError(f"disabled_temporal_layers names no temporal layer: {sorted(unknown)}")
        for name, module in self.temporal_layers.items():
            module.temporal_norm = temporal_norm
            module.enabled = name not in disabled
        self._temporal_layer_names = [name for name in self.temporal_layers if name not in disabled]
        self._audio_module_names: list[str] = []
        if audio_attention == "audio_modules":
            audio_module_config = self._add_audio_modules(dict(audio_module_config or {}))
            self.register_to_config(audio_module_config=audio_module_config)
        install_emo_processors(self)
        self.conv_in.register_forward_hook(FaceFeaturesHook(self._conditioning))
        if audio_attention_scale != 1.0:
            for name, module in self.named_modules():
                if name.endswith(".attn2") and "motion_modules" not in name and isinstance(module, Attention):
                    module.register_forward_hook(ScaleOutput(audio_attention_scale))

    def _add_audio_modules(self, config: dict) -> dict:
        """A `RegionAudioTransformer` after every spatial transformer (`X.audio_modules.j` after `X.attentions.j`)."""
        channels = list(self.config.block_out_channels)
        layers = self.config.layers_per_block
        if not isinstance(layers, int):
            raise ValueError("audio_attention='audio_modules' needs an int layers_per_block")
        heads = int(config.get("heads", 8))
        cross_dim = int(config.get("cross_attention_dim", self.audio_proj.config.output_dim))
        inner_dims = {**audio_module_inner_dims(channels, layers), **config.get("inner_dims", {})}
        if self.audio_proj.config.output_dim != cross_dim:
            raise ValueError(
                f"audio_projection_config output_dim ({self.audio_proj.config.output_dim}) must equal the audio "
                f"modules' cross_attention_dim ({cross_dim})"
            )
        last = len(channels) - 1
        blocks = [(f"down_blocks.{i}", b, i) for i, b in enumerate(self.down_blocks)]
        blocks.append(("mid_block", self.mid_block, last))
        blocks += [(f"up_blocks.{i}", b, last - i) for i, b in enumerate(self.up_blocks)]
        groups = self.config.norm_num_groups
        for prefix, block, level in blocks:
            attentions = getattr(block, "attentions", None)
            if not attentions:
                continue
            modules = []
            for j, transformer in enumerate(attentions):
                name = f"{prefix}.audio_modules.{j}"
                width = transformer.norm.num_channels
                module = RegionAudioTransformer(width, inner_dims[name], heads, cross_dim, groups)
                transformer.register_forward_hook(AudioModuleHook(name, module, level, self._conditioning))
                modules.append(module)
                self._audio_module_names.append(name)
            block.audio_modules = torch.nn.ModuleList(modules)
        return {"heads": heads, "cross_attention_dim": cross_dim, "inner_dims": inner_dims}

    __init__.__signature__ = extend_init_signature(
        UNetMotionModel.__init__,
        audio_projection_config=None,
        face_locator_config=None,
        speed_encoder_config=None,
        audio_attention="attn2",
        temporal_norm="across_frames",
        disabled_temporal_layers=None,
        audio_module_config=None,
        audio_attention_scale=1.0,
    )
    __init__ = register_to_config(__init__)

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_unet2d(
        cls,
        unet: UNet2DConditionModel,
        motion_adapter: MotionAdapter | None = None,
        load_weights: bool = True,
        **emo_config: Any,
    ) -> EMOUNet3DConditionModel:
        """Backbone with SD1.5 spatial weights and, if given, AnimateDiff temporal weights.

        `emo_config`: `audio_projection_config`, `face_locator_config`, `speed_encoder_config` (dicts of the
        sub-models' fields) and any `UNetMotionModel` field such as `motion_max_seq_length`. Without a motion
        adapter the temporal layers' output projections are zero-initialised (diffusers does not do it), so the
        untrained backbone reproduces SD1.5 frame by frame.
        """
        with quiet_diffusers():  # it warns about casting to the dtype the weights already have
            base = UNetMotionModel.from_unet2d(unet, motion_adapter=motion_adapter, load_weights=load_weights)
        config = {k: v for k, v in base.config.items() if not k.startswith("_")}
        config.update(emo_config)
        model = cls.from_config(config)
        if load_weights:
            model._load_base_state_dict(base.state_dict())
        if motion_adapter is None:
            for module in model.temporal_layers.values():
                torch.nn.init.zeros_(module.proj_out.weight)
                torch.nn.init.zeros_(module.proj_out.bias)
        return to_like(model, unet)

    def _load_base_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        # Sinusoid tables are not weights: each model computes its own, sized by its motion_max_seq_length.
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("pos_embed.pe")}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        unexpected_missing = [
            k for k in missing if parameter_group(k) not in ("audio", "face_locator", "speed") and "pos_embed" not in k
        ]
        if unexpected or unexpected_missing:
            raise ValueError(f"weights do not fit the backbone: missing {unexpected_missing}, unexpected {unexpected}")

    def load_motion_adapter(self, motion_adapter: MotionAdapter) -> None:
        """Copy AnimateDiff temporal weights into the temporal layers (the speed branches are left as they are)."""
        adapter_state = {k: v for k, v in motion_adapter.state_dict().items() if ".motion_modules." in k}
        own = {k for k in self.state_dict() if "motion_modules." in k and ".speed_" not in k}
        missing, extra = sorted(own - set(adapter_state)), sorted(set(adapter_state) - own)
        if missing or extra:
            raise ValueError(
                f"motion adapter does not fit the backbone: {len(missing)} temporal weights missing "
                f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
            )
        self.load_state_dict(adapter_state, strict=False)

    @property
    def temporal_layers(self) -> dict[str, EMOTemporalTransformer3D]:
        return {n: m for n, m in self.named_modules() if isinstance(m, EMOTemporalTransformer3D)}

    @property
    def reference_layer_names(self) -> list[str]:
        """attn1 modules that take reference tokens."""
        return list(self._reference_layer_names)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters by training group: spatial, audio, temporal, speed, face_locator."""
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            groups.setdefault(parameter_group(name), []).append(parameter)
        return groups

    # ------------------------------------------------------------------------------------- attention backends
    # Reference attention rides on a pre-hook of each attn1 module, so every processor keeps it. The processor switches
    # (`EMOAttentionSwitches`) put EMO's dispatching processor (which also takes the cached reference keys/values)
    # back where diffusers installs its plain default.

    # ------------------------------------------------------------------------------------------------ caches

    def enable_cache(self, config: Any) -> None:
        """diffusers' cache API (`CacheMixin`): `PyramidAttentionBroadcastConfig` (its `current_timestep_callback`
        reading `pipe.current_timestep`), `TaylorSeerCacheConfig(cache_identifiers=TAYLORSEER_IDENTIFIERS)`, or EMO's
        step cache, `StepCacheConfig(interval=N)` (DeepCache). The diffusers configs that do not fit a UNet are
        refused with the reason (`step_cache.UNFIT_DIFFUSERS_CACHES`), and so is a config that hooks no layer (it
        would change nothing). README, "Speed switches", has the table."""
        if isinstance(config, StepCacheConfig):
            if self.is_cache_enabled:
                raise ValueError(f"Caching is already enabled with {type(self._cache_config)}; disable it first.")
            self._step_cache = StepCache(self, config.interval).install()
            self._cache_config = config
            return
        check_diffusers_cache(config)
        super().enable_cache(config)
        if not hooked_layers(self):
            self.disable_cache()
            raise EMOInputError(
                f"{type(config).__name__} matched no layer of EMO's backbone, so it would change nothing: its module "
                "identifiers name a DiT's blocks (TaylorSeerCacheConfig: cache_identifiers="
                "emo_pipeline.models.step_cache.TAYLORSEER_IDENTIFIERS)"
            )

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """diffusers' reset of stateful cache hooks (the pipeline's `maybe_free_model_hooks`, after every video); a
        backbone without hooks is left untouched: creating the empty registry would change the module mid-session and
        make a compiled backbone recompile on the next video."""
        if getattr(self, "_diffusers_hook", None) is not None:
            super()._reset_stateful_cache(recurse)

    def disable_cache(self) -> None:
        if isinstance(self._cache_config, StepCacheConfig):
            self._step_cache.remove()
            self._step_cache = self._cache_config = None
            return
        super().disable_cache()

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """diffusers' gradient checkpointing, the recomputation seeing the conditioning of its forward call."""
        super().enable_gradient_checkpointing(checkpoint_with_state(self._conditioning, gradient_checkpointing_func))

    # ---------------------------------------------------------------------------------------------- forward

    @torch.no_grad()
    @apply_forward_hook  # under model CPU offload, onload the backbone as its forward would
    def prepare_reference(self, reference_features: ReferenceFeatures) -> ReferenceFeatures:
        """The reference features with every attn1 layer's reference keys/values projected once (inference).

        The reference tokens and the weights do not change during a video, so the backbone can reuse these at every
        frame, step and clip instead of projecting the tokens again (exact; `EMOAttnProcessor` uses them, any other
        processor gets the tokens). Recompute after changing weights (LoRA, fusing).
        """
        modules = dict(self.named_modules())
        key_value = {}
        for name in self._reference_layer_names:
            tokens = reference_features.spatial.get(name)
            check_reference_tokens(name, tokens, modules[name])
            key_value[name] = reference_key_value(modules[name], tokens.to(self.dtype))
        return ReferenceFeatures(
            spatial=reference_features.spatial,
            temporal=reference_features.temporal,
            key_value=key_value,
            tiled=reference_features.tiled,
        )

    @apply_forward_hook
    def encode_conditioning(
        self,
        audio_features: torch.Tensor,
        face_mask: torch.Tensor | None = None,
        speed: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Audio tokens `(B*F, T, C)`, face-locator features `(B, C, h, w)` (per-frame masks `(B, F, C_in, H, W)`:
        `(B, F, C, h, w)`) and speed embeddings `(B, F, l)`.

        They depend on the clip's inputs only, not on the noisy sample or the step: a sampler computes them once per
        clip and passes them to `forward` as `audio_tokens=`, `face_features=`, `speed_embeddings=`.
        `dtype`: the compute dtype (default: the model's).
        """
        dtype = dtype or self.dtype
        face_features = None
        if face_mask is not None and face_mask.ndim == 5:  # one mask per frame (B, F, C, H, W): EchoMimic's pose
            face_features = self.face_locator(face_mask.flatten(0, 1).to(dtype)).unflatten(0, face_mask.shape[:2])
        elif face_mask is not None:
            face_features = self.face_locator(face_mask.to(dtype))
        return {
            "audio_tokens": self.audio_proj(audio_features.to(dtype)),
            "face_features": face_features,
            "speed_embeddings": self.speed_encoder(speed.to(dtype)) if speed is not None else None,
        }

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        audio_features: torch.Tensor | None = None,
        reference_features: ReferenceFeatures | None = None,
        face_mask: torch.Tensor | None = None,
        speed: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        audio_tokens: torch.Tensor | None = None,
        face_features: torch.Tensor | None = None,
        speed_embeddings: torch.Tensor | None = None,
        context_tokens: torch.Tensor | None = None,
        region_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        region_scales: tuple[float, float, float] | None = None,
        reference_rows: torch.Tensor | None = None,
        unconditional_rows: torch.Tensor | None = None,
    ) -> UNetMotionOutput | tuple[torch.Tensor]:
        """Predict noise for a clip.

        Args:
            sample: `(B, 4, F, h, w)` noisy latents of the clip's F frames.
            timestep: scalar or `(B,)`.
            audio_features: `(B, F, 2m+1, L, D)` windowed wav2vec2 features; zeros mean "no audio".
            reference_features: from the ReferenceNet: reference tokens (`spatial`, or their projections in
                `key_value` from `prepare_reference`) and/or the motion frames' features (`temporal`, n frames).
            face_mask: `(B, 1, H, W)` in [0, 1] at pixel resolution (H = h * the face locator's factor), the same for
                every frame; or `(B, F, C_in, H, W)`, one per frame (EchoMimic's pose variants: landmark renders).
            speed: `(B, F)` head rotation speed in rad/s.
            audio_tokens, face_features, speed_embeddings: the same three already encoded (`encode_conditioning`),
                in place of `audio_features`, `face_mask`, `speed`.
            context_tokens: `(B*F, T, C)` attn2 context when `audio_attention="audio_modules"` (Hallo: identity
                tokens); the audio tokens then go to the audio modules.
            region_masks: `{level: (full, face, lip)}`, each broadcastable to `(B*F, h_l*w_l)` in [0, 1] (level 0 =
                latent resolution), and `region_scales` their weights (audio modules only).
            reference_rows: `(B,)` bool, which samples attend to the reference tokens (default: all; Hallo's
                unconditional branch does not).
            unconditional_rows: `(B,)` bool, samples whose audio tokens and face features are zeros when they are
                encoded here from `audio_features` / `face_mask` (Hallo's unconditional branch; under offload hooks a
                sampler passes the raw inputs and this instead of encoding them itself).
            Conditioning whose batch divides B is tiled along the batch (guidance stacks branches that share it).
        Returns:
            `UNetMotionOutput` with `.sample (B, 4, F, h, w)`, or a 1-tuple when `return_dict=False`.
        """
        # One static graph per input shape under torch.compile (a handful per video: one per guidance mode), not an
        # automatic-dynamic recompile (see ReferenceNet.forward).
        for tensor in (sample, audio_features, audio_tokens, face_mask, face_features, speed, speed_embeddings):
            if tensor is not None:
                torch._dynamo.mark_static(tensor)
        eager = not torch.compiler.is_compiling()
        if eager:
            self._check_inputs(
                sample, timestep, audio_features, reference_features, face_mask, speed, audio_tokens, face_features
            )
        if audio_tokens is None:
            encoded = self.encode_conditioning(audio_features, face_mask, speed, dtype=sample.dtype)
            audio_tokens = encoded["audio_tokens"]
            face_features = encoded["face_features"] if face_features is None else face_features
            speed_embeddings = encoded["speed_embeddings"] if speed_embeddings is None else speed_embeddings
            if unconditional_rows is not None:
                keep = (~unconditional_rows).to(audio_tokens.dtype)
                audio_tokens = audio_tokens * keep.repeat_interleave(sample.shape[2])[:, None, None]
                if face_features is not None:
                    face_features = face_features * keep.view(-1, *[1] * (face_features.ndim - 1))
        state = self._conditioning
        state.num_frames = sample.shape[2]
        if reference_features is not None:
            state.spatial = reference_features.spatial or None
            state.key_value = reference_features.key_value or None
            state.temporal = reference_features.temporal or None
            state.reference_tiled = reference_features.tiled
        state.speed_embeddings = speed_embeddings
        state.face_features = face_features
        state.reference_rows = reference_rows
        state.reference_runs = reference_row_runs(reference_rows, sample.shape[2])
        attn2_context = audio_tokens
        if self._audio_module_names:
            if context_tokens is None or region_masks is None:
                raise EMOInputError(
                    "this backbone has audio modules (audio_attention='audio_modules'): pass context_tokens "
                    "(B*F, T, C) for attn2 and region_masks {level: (full, face, lip)}"
                )
            state.audio_module_tokens, state.audio_module_masks = audio_tokens, region_masks
            state.audio_module_scales = region_scales
            attn2_context = context_tokens.to(sample.dtype)
        state.reached = set() if eager else None
        try:
            output = super().forward(sample, timestep, encoder_hidden_states=attn2_context, return_dict=return_dict)
            if eager:
                self._check_reached(state)
        finally:
            state.clear()
        return output

    def _check_reached(self, state: ConditioningState) -> None:
        """Fail loudly if conditioning was silently dropped somewhere (a replaced module, a removed hook).

        Runs in eager calls only (a compiled graph has no Python bookkeeping; the same modules run in it).
        """
        reached = state.reached
        expected = []
        if state.spatial is not None or state.key_value is not None:
            expected += self._reference_layer_names
        if state.temporal is not None:
            expected += self._temporal_layer_names
        if state.face_features is not None:
            expected.append("conv_in")
        if state.audio_module_tokens is not None:
            expected += self._audio_module_names
        missed = [name for name in expected if name not in reached]
        if missed:
            raise RuntimeError(
                f"conditioning did not reach {len(missed)} layers (a module replaced or a hook removed?), e.g. "
                f"{missed[:3]}"
            )

    def _check_inputs(
        self, sample, timestep, audio_features, reference_features, face_mask, speed, audio_tokens, face_features
    ) -> None:
        in_channels = self.config.in_channels
        if sample.ndim != 5 or sample.shape[1] != in_channels:
            raise EMOInputError(f"sample must have shape (B, {in_channels}, F, h, w), got {tuple(sample.shape)}")
        batch, _, frames, height, width = sample.shape
        window, layers, dim = self.audio_proj.expected_feature_shape
        expected_audio = (batch, frames, window, layers, dim)
        if audio_tokens is not None:
            if audio_tokens.ndim != 3 or audio_tokens.shape[0] != batch * frames:
                raise EMOInputError(
                    f"audio_tokens must have shape (B*F, T, C) with B*F = {batch * frames}, got "
                    f"{tuple(audio_tokens.shape)}"
                )
        elif audio_features is None:
            raise EMOInputError("pass audio_features (B, F, 2m+1, L, D), or audio_tokens from encode_conditioning")
        elif tuple(audio_features.shape) != expected_audio:
            raise EMOInputError(
                f"audio_features must have shape (B, F, 2m+1, L, D) = {expected_audio} for a sample of shape "
                f"{tuple(sample.shape)}, got {tuple(audio_features.shape)}"
            )
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape != (batch,) and timestep.numel() != 1:
            raise EMOInputError(f"timestep must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}")
        if speed is not None and (speed.ndim != 2 or speed.shape[1] != frames or batch % speed.shape[0]):
            raise EMOInputError(f"speed must have shape (B, F) = {(batch, frames)} rad/s, got {tuple(speed.shape)}")
        if face_mask is not None and face_mask.ndim == 5:  # per frame
            factor = self.face_locator.downscale_factor
            channels = self.face_locator.config.in_channels
            expected_mask = (batch, frames, channels, height * factor, width * factor)
            if tuple(face_mask.shape[1:]) != expected_mask[1:] or batch % face_mask.shape[0]:
                raise EMOInputError(
                    f"a per-frame face_mask must have shape (B, F, {channels}, H, W) = {expected_mask}, got "
                    f"{tuple(face_mask.shape)}"
                )
        elif face_mask is not None:
            factor = self.face_locator.downscale_factor
            channels = self.face_locator.config.in_channels  # 1 (EMO's mask); 3 (Hallo's face region image)
            expected_mask = (batch, channels, height * factor, width * factor)
            if (
                face_mask.ndim != 4
                or face_mask.shape[1] != channels
                or tuple(face_mask.shape[2:]) != expected_mask[2:]
                or batch % face_mask.shape[0]
            ):
                raise EMOInputError(
                    f"face_mask must have shape (B, {channels}, H, W) = {expected_mask}, got {tuple(face_mask.shape)}"
                )
        if reference_features is not None and reference_features.temporal:
            motion = reference_features.num_motion_frames
            limit = self.config.motion_max_seq_length
            if motion + frames > limit:
                raise EMOInputError(
                    f"num_motion_frames ({motion}) + num_frames ({frames}) = {motion + frames} exceeds the temporal "
                    f"layers' positional table (motion_max_seq_length = {limit})"
                )


class FaceFeaturesHook:
    """conv_in forward hook: add the face locator's features `(B, C, h, w)` to every frame of the clip (per-frame
    features `(B, F, C, h, w)`: each to its frame)."""

    def __init__(self, state: ConditioningState):
        self.state = state

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        state = self.state
        if state.face_features is None:
            return None
        face = broadcast_batch(state.face_features.to(output.dtype), output.shape[0] // state.num_frames, "face_mask")
        state.mark("conv_in")
        if face.ndim == 5:
            return output + face.flatten(0, 1)
        return output + face.repeat_interleave(state.num_frames, dim=0)


class ScaleOutput:
    """Forward hook of an attention module: its output times a constant (EchoMimic's attn2 `audio_feature_ratio`).
    A module hook, not a processor, so every attention processor (and `torch.compile`) keeps it."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale


def _public(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}
