"""Peer benchmark: Hallo's own inference loop against ours on the same random Hallo weights, alternated in one process.

    python benchmarks/bench_peers.py --hallo-src /tmp/hallo-src                 # SD1.5-shaped, 128 px, the json below
    python benchmarks/bench_peers.py --hallo-src /tmp/hallo-src --tiny --output /tmp/peers_tiny.json   # 64 px, quick
    python benchmarks/bench_peers.py --echomimic-src /tmp/echomimic   # EchoMimic: benchmarks/peers_echomimic.py

Hallo (fudan-generative-vision/hallo, MIT; commit 8fd7c572) is imported at run time from ``--hallo-src`` with the
shims of ``tests/goldens/make_hallo_goldens.py`` (stub ``xformers``, diffusers 0.27's gradient-checkpointing switch,
``Net`` / ``process_audio_emb`` executed from ``scripts/inference.py``'s source) plus ``einops``, which Hallo
imports and our venv lacks: ``pip install --target DIR einops`` and pass ``--extra-path DIR`` (or install it).

What it does:

1. Builds Hallo's five networks from Hallo's classes at SD1.5's shape (SD1.5's ``unet/config.json``, Hallo's
   ``unet_additional_kwargs`` from ``configs/inference/default.yaml``, the audio projection of ``inference.py``:
   12 wav2vec2-base layers x 768) and randomises EVERY parameter (zero-initialised ones too), seeded; saves
   ``Net.state_dict()`` as ``net.pth`` (float32, the released key layout) and strictly loads it back as
   ``inference.py`` does.
2. Loads the same weights into our classes with ``emo_pipeline.hallo``'s loader (``check_hallo_state_dict``,
   ``infer_hallo_sizes``, ``build_hallo_models``, ``load_hallo_weights``: ``load_hallo_models`` step by step) from
   Hallo's in-memory ``Net.state_dict()``, the tensors *assigned* (shared), not copied: two float32 copies of the
   SD1.5-shaped networks (~2 x 10 GB) do not fit this 24 GB machine. The shared weights are fingerprinted before
   and after the runs (``weights_unchanged``).
3. One random-weight ``AutoencoderKL`` with SD's VAE config, shared by both sides, and the same preprocessed inputs:
   source image, face embedding, face region, region masks at the 4 latent levels, per-frame wav2vec2-shaped
   features ``(T, 12, 768)`` (random: both sides get the same), windowed by Hallo's ``process_audio_emb`` for Hallo
   (as ``inference.py`` does, inside the timed region) and by our pipeline for ours.
4. Warm-up (one clip, one step, each side), then ``--repeats`` rounds of Hallo, ours-mode-1, ours-mode-2, ...
   Each run: ``torch.manual_seed(42)`` (Hallo's generator), timed with ``perf_counter``, frames compared with
   Hallo's frames of the same round (``max_abs_diff`` in [0, 1] pixel units).
5. Memory sweep (``--audio-seconds``): each side at each audio length (``--sweep-steps`` steps), loop peak memory.

Memory: ``loop_peak_above_start_mb`` is the kernel's resident high-water mark (``VmHWM`` of /proc/self/status,
reset by writing 5 to /proc/self/clear_refs just before the run, after ``gc.collect()`` and glibc ``malloc_trim``)
minus the resident size at the start of the run: the run's own allocations (activations, caches, features,
frames), not the weights. ``sampled_peak_above_start_mb`` is the same from a psutil thread sampling every 20 ms
(a cross-check; it can miss short peaks).

Ours: ``--modes parity,fast`` (``--api pipeline``, the default where ``EMOPipeline`` takes ``hallo_conditioning=``):
``EMOPipeline`` built by ``emo_pipeline.hallo_conversion.build_hallo_pipeline``, called as ``pipe(None, None,
hallo_conditioning=..., mode=...)`` in each mode, frames returned (as Hallo's script keeps them); its memory sweep goes
through ``pipe.iter_clips`` (streaming, as ``write_video``). ``--api hallo_generate``: the whole video through
``emo_pipeline.hallo_conversion.hallo_generate`` (a thin wrapper over the same pipeline loop; sweep through
``iter_clips``), labelled ``hallo_generate-MODE``. ``--hallo-floor`` adds one untimed Hallo run with 1 torch thread:
how far Hallo's own frames move on float noise alone (Hallo rounds its reference bank to fp16, so ~1e-7 differences
flip roundings and grow through the steps and the clip chain): the scale on which the parity mode's difference is read.
Load averages before and after every run are in the json: the machine has 2 cores shared with other work.

Precision (``--dtype fp32|bf16|fp16``) applies to BOTH sides: Hallo's networks and the shared VAE are cast as its
``weight_dtype`` switch casts them (``inference.py``: ``pipeline.to(dtype=weight_dtype)``, the audio projection too)
before our classes take the same tensors, so both run the same rounded weights. One shim (``bank_dtype_shim``, listed
in the json's ``hallo_precision_shims``): in bf16 Hallo's reference bank is cast to bf16 instead of its hard-coded
fp16 (``cat`` of bf16 tokens with an fp16 bank gives float32, which its bf16 ``to_k`` refuses). ``--device cuda``
runs both on a GPU (``gpu_check.py --hallo-src``). ``--modes compiled``: ours in the parity mode after
``pipe.compile()`` (regional); its warm-up's time is its cold start (``cold_start_first_clip_s`` in the summary).
Where the time goes inside one run: ``benchmarks/profile_peers.py`` (torch.profiler, same builds).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import threading
import time
import unittest.mock
from functools import partialmethod
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # Hallo's per-frame decode progress bar

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED = 42  # scripts/inference.py: generator = torch.manual_seed(42)
WEIGHT_SEED = 1234
FPS = 25
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# stable-diffusion-v1-5/unet/config.json (layer sizes only; the weights are random)
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stabilityai/sd-vae-ft-mse/config.json (Hallo's VAE)
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}
# scripts/inference.py's AudioProjModel (wav2vec2-base: 12 layers x 768)
SD15_AUDIO_PROJ_KWARGS = {
    "seq_len": 5,
    "blocks": 12,
    "channels": 768,
    "intermediate_dim": 512,
    "output_dim": 768,
    "context_tokens": 32,
}


def load_goldens_module():
    """tests/goldens/make_hallo_goldens.py: its shims, ``randomise_`` and tiny configuration are reused here."""
    path = ROOT / "tests" / "goldens" / "make_hallo_goldens.py"
    spec = importlib.util.spec_from_file_location("make_hallo_goldens", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- memory ---------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the kernel, so RSS starts low
    except OSError:
        pass


class LoopMemory:
    """The run's resident high-water mark above its start (VmHWM after a clear_refs reset), and a sampled peak."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.sampled = max(self.sampled, self.process.memory_info().rss)
            self.stop.wait(self.interval)

    def __enter__(self) -> LoopMemory:
        _release_free_memory()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        self.start_kb = _status_kb("VmRSS")
        self.sampled = self.process.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak_kb = _status_kb("VmHWM")
        self.sampled = max(self.sampled, self.process.memory_info().rss)

    def report(self) -> dict:
        return {
            "rss_at_start_mb": round(self.start_kb / 1024, 1),
            "loop_peak_above_start_mb": round((self.peak_kb - self.start_kb) / 1024, 1),
            "sampled_peak_above_start_mb": round(self.sampled / 2**20 - self.start_kb / 1024, 1),
        }


# --- building both sides ---------------------------------------------------------------------------------------


def build_hallo(args: argparse.Namespace, goldens, work: Path) -> dict:
    """Hallo's networks from Hallo's code, every parameter random; net.pth saved and strictly loaded back."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from hallo.animate.face_animate import FaceAnimatePipeline
    from hallo.models.audio_proj import AudioProjModel
    from hallo.models.face_locator import FaceLocator
    from hallo.models.image_proj import ImageProjModel
    from hallo.models.unet_2d_condition import UNet2DConditionModel
    from hallo.models.unet_3d import UNet3DConditionModel
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    hallo_src = args.hallo_src
    script = goldens.load_from_inference_script(hallo_src, {"Net", "process_audio_emb"})
    config = OmegaConf.load(hallo_src / "configs" / "inference" / "default.yaml")
    unet_additional_kwargs = OmegaConf.to_container(config.unet_additional_kwargs)
    if args.tiny:
        unet_config, audio_proj_kwargs = goldens.TINY_UNET_CONFIG, goldens.AUDIO_PROJ_KWARGS
        unet_additional_kwargs["audio_attention_dim"] = audio_proj_kwargs["output_dim"]
        vae_config = {**goldens.TINY_VAE_CONFIG, "sample_size": args.size}
    else:
        unet_config, audio_proj_kwargs, vae_config = SD15_UNET_CONFIG, SD15_AUDIO_PROJ_KWARGS, SD_VAE_CONFIG
    sched_kwargs = OmegaConf.to_container(config.noise_scheduler_kwargs)
    if config.enable_zero_snr:  # inference.py:186-191
        sched_kwargs.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")

    # The base folder from_pretrained_2d reads: SD's unet config and an EMPTY weights file (the strict net.pth load
    # overwrites every tensor anyway; an empty file keeps a third SD1.5-sized copy out of memory), no motion module.
    base = work / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2))
    save_file({}, base / "unet" / "diffusion_pytorch_model.safetensors")

    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    reference_unet = UNet2DConditionModel.from_config(unet_config).eval()  # inference.py:196 (from_pretrained: eval)
    denoising_unet = UNet3DConditionModel.from_pretrained_2d(  # inference.py:198-205
        base, work / "absent.ckpt", subfolder="unet", unet_additional_kwargs=unet_additional_kwargs, use_landmark=False
    )
    face_locator = FaceLocator(conditioning_embedding_channels=unet_config["block_out_channels"][0])  # 320 at SD1.5
    image_proj = ImageProjModel(
        cross_attention_dim=denoising_unet.config.cross_attention_dim,
        clip_embeddings_dim=512,
        clip_extra_context_tokens=4,
    )
    audio_proj = AudioProjModel(**audio_proj_kwargs)
    for module in (image_proj, reference_unet, denoising_unet, face_locator, audio_proj):
        module.requires_grad_(False)
    goldens.enable_gradient_checkpointing_027(reference_unet)  # inference.py:233-234 (shim 2)
    goldens.enable_gradient_checkpointing_027(denoising_unet)
    net = script["Net"](reference_unet, denoising_unet, face_locator, image_proj, audio_proj)
    goldens.randomise_(net, generator)
    net_path = work / "net.pth"
    torch.save(net.state_dict(), net_path)  # float32 (no second copy in memory), the released key layout
    released = torch.load(net_path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no second copy
    missing, unexpected = net.load_state_dict(released)  # inference.py:243-250, strict
    assert len(missing) == 0 and len(unexpected) == 0, "Fail to load correct checkpoint."
    del released
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    shims = []
    if dtype != torch.float32 or device.type != "cpu":  # inference.py:142-149,220,262: weight_dtype casts every
        net.to(device=device, dtype=dtype)  # network (before load_ours: our side shares the cast tensors)
        if dtype != torch.float16:
            shims.append(bank_dtype_shim(dtype))

    vae = AutoencoderKL(**vae_config)
    goldens.randomise_(vae, generator)
    vae.eval().requires_grad_(False).to(device=device, dtype=dtype)  # one VAE for both sides, compared precision
    pipeline = FaceAnimatePipeline(  # inference.py:254-262
        vae=vae,
        reference_unet=net.reference_unet,
        denoising_unet=net.denoising_unet,
        face_locator=net.face_locator,
        scheduler=DDIMScheduler(**sched_kwargs),
        image_proj=net.imageproj,
    )
    pipeline.to(device=device, dtype=dtype)  # inference.py:262
    pipeline.set_progress_bar_config(disable=True)
    assert denoising_unet.training and not reference_unet.training  # the released code path (train-mode denoiser)
    return {
        "net": net,
        "net_path": net_path,
        "pipeline": pipeline,
        "vae": vae,
        "process_audio_emb": script["process_audio_emb"],
        "unet_config": unet_config,
        "audio_dim": audio_proj_kwargs["channels"],
        "audio_layers": audio_proj_kwargs["blocks"],
        "unet_additional_kwargs": unet_additional_kwargs,
        "scheduler_config": sched_kwargs,
        "vae_config": vae_config,
        "dtype": dtype,
        "device": device,
        "shims": shims,
    }


def bank_dtype_shim(dtype: torch.dtype) -> str:
    """Hallo's only precision shim: its reference bank is cast to the models' dtype, not to float16.

    `FaceAnimatePipeline` calls `reference_control_reader.update(writer)`, whose default `dtype=torch.float16` rounds
    the bank to fp16 (harmless in fp32 and fp16: `cat` promotes fp16 with fp32, and fp16 is the models' dtype). In
    bf16, `cat([bf16 tokens, fp16 bank])` promotes to float32 and attn1's bf16 `to_k` then refuses float32 input, so
    the bank goes to the models' dtype (what `weight_dtype` means). Nothing else of Hallo is changed for bf16/fp16.
    """
    from hallo.models.mutual_self_attention import ReferenceAttentionControl

    original = ReferenceAttentionControl.update
    if getattr(original, "bank_dtype_shim", None) != dtype:
        original = getattr(original, "__wrapped__", original)

        def update(self, writer, dtype=dtype):
            return original(self, writer, dtype=dtype)

        update.__wrapped__, update.bank_dtype_shim = original, dtype
        ReferenceAttentionControl.update = update
    return f"ReferenceAttentionControl.update(writer) casts the reference bank to {dtype} (Hallo: torch.float16)"


def load_ours(hallo: dict):
    """Our classes with Hallo's weights: load_hallo_models' steps on Hallo's in-memory state, tensors shared."""
    from emo_pipeline import hallo as ours

    state = hallo["net"].state_dict()  # the released layout; equal to net.pth (strictly loaded from it above)
    ours.check_hallo_state_dict(state, str(hallo["net_path"]))
    sizes = ours.infer_hallo_sizes(state, audio_dim=hallo["audio_dim"])
    with torch.device("meta"):  # no storage: every tensor comes from the checkpoint
        models = ours.build_hallo_models(hallo["unet_config"], **sizes)
    with unittest.mock.patch.object(
        torch.nn.Module, "load_state_dict", partialmethod(torch.nn.Module.load_state_dict, assign=True)
    ):
        ours.load_hallo_weights(models, state)  # every key placed, every needed weight present (raises otherwise)
    left = []  # parameters Hallo's checkpoint does not have (EMO's speed branch: unused): materialised as zeros
    for model in (models.reference_net, models.backbone, models.identity_proj):
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_meta:
                left.append(name)
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                empty = torch.zeros(tensor.shape, dtype=hallo["dtype"], device=hallo["device"])
                if isinstance(tensor, torch.nn.Parameter):
                    setattr(module, leaf, torch.nn.Parameter(empty, requires_grad=False))
                else:
                    module._buffers[leaf] = empty
    for model in (models.reference_net, models.backbone, models.identity_proj):
        model.eval().requires_grad_(False)
        model.to(hallo["dtype"])  # the few parameters built here (not Hallo's): to Hallo's dtype, shared ones kept
    if hallo["dtype"] != torch.float32:
        models.bank_dtype = hallo["dtype"]  # as Hallo's bank under the shim (fp16: Hallo's own default)
    return models, left


def compiled_pipeline(hallo: dict) -> dict:
    """Ours with `pipe.compile()` (regional, fullgraph, the VAE decoder whole), on model objects of its own.

    `compile_repeated_blocks` and `decoder.compile()` work in place, so the compiled side gets its own modules: our
    classes loaded again from Hallo's state (the tensors assigned, shared: no memory) and a copy of the shared VAE
    (without the other sides' timers, which call the shared one).
    """
    import copy

    from emo_pipeline import hallo_conversion

    models, _ = load_ours(hallo)
    vae = copy.deepcopy(hallo["vae"])
    for method in ("encode", "decode"):
        vars(vae).pop(method, None)
    pipe = hallo_conversion.build_hallo_pipeline(models, vae)
    pipe.set_progress_bar_config(disable=True)
    pipe.compile()
    return {"models": models, "pipeline": pipe}


def fingerprint(net: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in net.state_dict().values() if p.is_floating_point()))


# --- inputs ---------------------------------------------------------------------------------------------------


def make_inputs(size: int, frames: int, layers: int, dim: int) -> dict:
    """Seeded stand-ins for Hallo's ImageProcessor / AudioProcessor outputs (layouts of inference.py)."""
    generator = torch.Generator().manual_seed(WEIGHT_SEED + 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    face = ((xx / 0.55) ** 2 + ((yy + 0.05) / 0.7) ** 2 < 1).float()
    image = torch.stack([0.8 * face - 0.4 + 0.3 * xx, 0.5 * face - 0.3 * yy - 0.2, 0.6 - 0.9 * face + 0.2 * xx * yy])
    image = (image + 0.15 * torch.randn(image.shape, generator=generator)).clamp(-1, 1)
    region = torch.zeros(size, size)
    region[round(0.15 * size) : round(0.9 * size), round(0.22 * size) : round(0.78 * size)] = 1.0

    def blob(cy: float, cx: float, ry: float, rx: float, res: int) -> torch.Tensor:
        g = torch.linspace(-1, 1, res) if res > 1 else torch.zeros(1)
        y, x = torch.meshgrid(g, g, indexing="ij")
        return torch.exp(-(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)).clamp(0, 1)

    masks = {}
    for level, res in enumerate((size // 8, size // 16, size // 32, size // 64)):
        face_blur, lip = blob(0.0, 0.0, 0.7, 0.5, res), blob(0.45, 0.0, 0.25, 0.35, res)
        masks[level] = ((1.0 - face_blur).reshape(1, -1), (face_blur - lip).clamp(0, 1).reshape(1, -1))
        masks[level] += (lip.reshape(1, -1),)
    return {
        "source_image": image[None],  # (1, 3, H, W) in [-1, 1]
        "face_region": region.expand(3, size, size)[None].clone(),  # (1, 3, H, W) in {0, 1}
        "face_emb": torch.randn(1, 512, generator=generator) * 20.0,  # insightface-like norm
        "region_masks": masks,  # {level: (full, face, lip)}, each (1, h*w)
        "audio_features": torch.randn(frames, layers, dim, generator=generator),  # per-frame wav2vec2 states
    }


# --- the runs -------------------------------------------------------------------------------------------------


def run_hallo(hallo: dict, inputs: dict, args: argparse.Namespace, clips: int, steps: int) -> torch.Tensor:
    """scripts/inference.py:263-343 (the clip loop) on the preprocessed inputs: returns (3, T, H, W) in [0, 1]."""
    pipeline, net = hallo["pipeline"], hallo["net"]
    f, n = args.frames_per_clip, args.motion_frames
    audio_emb = hallo["process_audio_emb"](inputs["audio_features"][: clips * f])  # inference.py:264 (all windows)
    audio_length = audio_emb.shape[0]
    source_image_pixels = inputs["source_image"]
    source_image_face_region = inputs["face_region"]
    source_image_face_emb = inputs["face_emb"]
    masks = {
        kind: [inputs["region_masks"][level][index].repeat(f, 1) for level in range(4)]
        for index, kind in enumerate(("full", "face", "lip"))
    }
    times = audio_emb.shape[0] // f
    tensor_result = []
    generator = torch.manual_seed(SEED)
    for t in range(times):
        if len(tensor_result) == 0:
            motion_zeros = source_image_pixels.repeat(n, 1, 1, 1)
            pixel_values_ref_img = torch.cat([source_image_pixels, motion_zeros], dim=0)
        else:
            motion_frames = tensor_result[-1][0].permute(1, 0, 2, 3)[0 - n :] * 2.0 - 1.0
            pixel_values_ref_img = torch.cat([source_image_pixels, motion_frames], dim=0)
        pixel_values_ref_img = pixel_values_ref_img.unsqueeze(0)
        audio_tensor = audio_emb[t * f : min((t + 1) * f, audio_emb.shape[0])].unsqueeze(0)
        audio_tensor = net.audioproj(audio_tensor.to(device=net.audioproj.device, dtype=net.audioproj.dtype))
        pipeline_output = pipeline(
            ref_image=pixel_values_ref_img,
            audio_tensor=audio_tensor,
            face_emb=source_image_face_emb,
            face_mask=source_image_face_region,
            pixel_values_full_mask=masks["full"],
            pixel_values_face_mask=masks["face"],
            pixel_values_lip_mask=masks["lip"],
            width=args.size,
            height=args.size,
            video_length=f,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            motion_scale=[1.0, 1.0, 1.0],
        )
        tensor_result.append(pipeline_output.videos)
    return torch.cat(tensor_result, dim=2).squeeze(0)[:, :audio_length]


def pipeline_supports_hallo() -> bool:
    """Whether EMOPipeline takes `hallo_conditioning=` and `mode=` (the lead's pipeline integration)."""
    from dataclasses import fields

    try:
        from emo_pipeline.families.hallo import HalloSettings  # Hallo's settings, documented with its family
    except ImportError:
        from emo_pipeline.pipeline_emo import GenerationSettings as HalloSettings  # before the family modules

    names = {field.name for field in fields(HalloSettings)}
    return {"hallo_conditioning", "mode"} <= names


def run_ours(
    mode: str, api: str, ours: dict, hallo: dict, inputs: dict, args: argparse.Namespace, clips: int, steps: int
) -> torch.Tensor:
    """One of our modes on the same inputs: returns (3, T, H, W) in [0, 1].

    api "pipeline": `EMOPipeline.__call__(None, None, hallo_conditioning=..., mode=...)` (all frames returned, as
    Hallo's script keeps them); "iter_clips": the same through `iter_clips`, each clip dropped once counted (what
    `write_video` does: streaming); "hallo_generate": `emo_pipeline.hallo_conversion.hallo_generate` (a wrapper over
    the same pipeline).
    """
    from emo_pipeline import hallo as emo_hallo
    from emo_pipeline import hallo_conversion

    f, n, frames = args.frames_per_clip, args.motion_frames, clips * args.frames_per_clip
    conditioning = emo_hallo.HalloConditioning(
        source_image=inputs["source_image"],
        face_embedding=inputs["face_emb"],
        face_region=inputs["face_region"],
        region_masks=inputs["region_masks"],
        audio_features=inputs["audio_features"][:frames],  # per frame, not windowed
        audio_length=frames,
    )
    options = {
        "mode": mode,
        "num_frames": f,
        "num_motion_frames": n,
        "num_inference_steps": steps,
        "guidance_scale": args.guidance_scale,
        "generator": torch.manual_seed(SEED),
    }
    if api == "hallo_generate":
        video = hallo_conversion.hallo_generate(
            ours["models"],
            hallo["vae"],
            emo_hallo.hallo_scheduler(),
            conditioning,
            **options,
        )
        return video[0]
    call = {
        "hallo_conditioning": conditioning,
        "mode": mode,
        "num_frames_per_clip": f,
        "num_motion_frames": n,
        "num_inference_steps": steps,
        "guidance_scale": args.guidance_scale,
        "generator": torch.manual_seed(SEED),
        "output_type": "pt",
        "watermark": False,
        "decode_chunk_size": args.decode_chunk_size,
        "height": args.size,
        "width": args.size,
    }
    if api == "iter_clips":
        count, last = 0, None
        for clip in ours["pipeline"].iter_clips(None, None, **call):
            count, last = count + len(clip), clip
        assert last is not None and torch.isfinite(last).all()
        return count  # the frames were dropped as they came (compared with Hallo's in the timed runs)
    output = ours["pipeline"](None, None, **call)
    return to_channels_frames(output.frames)


def to_channels_frames(video: torch.Tensor) -> torch.Tensor:
    """Our pipeline's (1, T, 3, H, W) / (T, 3, H, W) frames -> (3, T, H, W) as Hallo's."""
    video = torch.as_tensor(video).float()
    if video.ndim == 5:
        video = video[0]
    return video.permute(1, 0, 2, 3)


SECONDS_IN: dict[str, float] = {}  # time inside each network during the current run (install_timers)


def install_timers(hallo: dict, models) -> None:
    """Accumulate the time spent in the backbones, the ReferenceNets and the (shared) VAE's encode / decode."""

    def timed_module(module: torch.nn.Module, name: str) -> None:
        starts = []
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

        def done(*_):
            SECONDS_IN[name] = SECONDS_IN.get(name, 0.0) + time.perf_counter() - starts.pop()

        module.register_forward_hook(done)

    for module, name in (
        (hallo["net"].denoising_unet, "backbone"),
        (hallo["net"].reference_unet, "reference_net"),
        (models.backbone, "backbone"),
        (models.reference_net, "reference_net"),
    ):
        timed_module(module, name)
    vae = hallo["vae"]
    for method in ("encode", "decode"):
        original = getattr(vae, method)

        def timed(*a, _original=original, _name=f"vae_{method}", **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                SECONDS_IN[_name] = SECONDS_IN.get(_name, 0.0) + time.perf_counter() - start

        setattr(vae, method, timed)


def measured(label: str, fn, output_frames: int) -> tuple[dict, torch.Tensor | None]:
    """Time and memory of `fn()`, which returns the video (3, T, H, W) or, streaming, the number of frames."""
    SECONDS_IN.clear()
    load_before = os.getloadavg()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with LoopMemory() as memory, torch.no_grad():
        start = time.perf_counter()
        video = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    run = {
        "side": label,
        "output_frames": output_frames,
        "seconds_total": round(seconds, 2),
        "seconds_per_output_frame": round(seconds / output_frames, 4),
        "seconds_in": {k: round(v, 2) for k, v in sorted(SECONDS_IN.items())},
        **memory.report(),
        **({"gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20)} if torch.cuda.is_available() else {}),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if isinstance(video, int):
        assert video == output_frames, (label, video)
        return run, None
    assert video.shape[1] == output_frames, (label, tuple(video.shape))
    assert torch.isfinite(video).all(), label
    return run, video


def diff(video: torch.Tensor, reference: torch.Tensor, frames_per_clip: int) -> dict:
    difference = (video.cpu().double() - reference.cpu().double()).abs()  # (3, T, H, W)
    return {
        "max_abs_diff": round(float(difference.max()), 6),
        "mean_abs_diff": round(float(difference.mean()), 7),
        "max_abs_diff_per_clip": [round(float(d.max()), 6) for d in difference.split(frames_per_clip, dim=1)],
    }


def _summarise_timed(timed: list[dict]) -> dict:
    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    summary = {}
    for side in dict.fromkeys(r["side"] for r in timed):
        mine = [r for r in timed if r["side"] == side]
        summary[side] = {
            "seconds_per_output_frame": mean([r["seconds_per_output_frame"] for r in mine]),
            "seconds_per_output_frame_each": [r["seconds_per_output_frame"] for r in mine],
            "seconds_per_output_frame_min": min(r["seconds_per_output_frame"] for r in mine),
            "loop_peak_above_start_mb": max(r["loop_peak_above_start_mb"] for r in mine),
        }
        if side != "hallo":
            summary[side]["ratio_to_hallo"] = round(
                summary[side]["seconds_per_output_frame"] / summary["hallo"]["seconds_per_output_frame"], 3
            )
            summary[side]["ratio_to_hallo_of_minima"] = round(
                summary[side]["seconds_per_output_frame_min"] / summary["hallo"]["seconds_per_output_frame_min"], 3
            )
            summary[side]["max_abs_diff_to_hallo"] = max(r["max_abs_diff"] for r in mine)
            if "vs_float32_same_mode" in mine[0]:  # bf16 rounds: the precision's own error
                summary[side]["max_abs_diff_to_float32_same_mode"] = max(
                    r["vs_float32_same_mode"]["max_abs_diff"] for r in mine
                )
                summary[side]["mean_abs_diff_to_float32_same_mode"] = max(
                    r["vs_float32_same_mode"]["mean_abs_diff"] for r in mine
                )
            summary[side]["max_abs_diff_to_hallo_per_clip"] = [
                max(values) for values in zip(*(r["max_abs_diff_per_clip"] for r in mine))
            ]
    return summary


def summarise(runs: list[dict]) -> dict:
    summary = _summarise_timed([r for r in runs if r["phase"] == "timed"])
    half = [r for r in runs if r["phase"] == "timed_bf16"]
    if half:  # jsons written before --dtype: our bf16 against Hallo's fp32 (not like for like; superseded)
        summary["bf16_rounds_ours_bf16_vs_hallo_fp32_not_like_for_like"] = _summarise_timed(half)
    warmups = [r for r in runs if r["phase"] == "warmup"]
    for side, row in summary.items():  # cold start: the first run of each side (1 clip, 1 step; compiles)
        first = next((r for r in warmups if r["side"] == side), None)
        if first is not None:
            row["cold_start_first_clip_s"] = first["seconds_total"]
    floor = [r for r in runs if r["phase"] == "hallo_floor"]
    if floor:
        summary["hallo_vs_itself_1_thread"] = {
            "max_abs_diff": floor[0]["max_abs_diff"],
            "max_abs_diff_per_clip": floor[0]["max_abs_diff_per_clip"],
        }
    sweep = [r for r in runs if r["phase"] == "sweep"]
    if sweep:
        summary["sweep_loop_peak_above_start_mb"] = {
            side: {str(r["clips"]) + " clips": r["loop_peak_above_start_mb"] for r in sweep if r["side"] == side}
            for side in dict.fromkeys(r["side"] for r in sweep)
        }
    return summary


def print_table(result: dict) -> None:
    summary = result["summary"]
    print(f"\n{'side':<28} {'s/frame':>9} {'x Hallo':>8} {'min x Hallo':>12} {'loop peak MB':>13} {'max |diff|':>11}")
    rows = list(summary.items()) + [
        (f"{side} (old: bf16 vs Hallo fp32)", row)
        for side, row in summary.get("bf16_rounds_ours_bf16_vs_hallo_fp32_not_like_for_like", {}).items()
    ]
    for side, row in rows:
        if "seconds_per_output_frame" not in row:
            continue
        print(
            f"{side:<28} {row['seconds_per_output_frame']:>9.3f} {row.get('ratio_to_hallo', 1.0):>8.3f} "
            f"{row.get('ratio_to_hallo_of_minima', 1.0):>12.3f} {row['loop_peak_above_start_mb']:>13.1f} "
            f"{row.get('max_abs_diff_to_hallo', 0.0):>11.2e}"
        )
    if "hallo_vs_itself_1_thread" in summary:
        print(f"Hallo vs itself (1 thread): max |diff| {summary['hallo_vs_itself_1_thread']['max_abs_diff']:.2e}")
    for side, peaks in summary.get("sweep_loop_peak_above_start_mb", {}).items():
        print(f"sweep {side:<28} " + "  ".join(f"{k}: {mb:.1f} MB" for k, mb in peaks.items()))


def machine_info(device: str = "cpu") -> dict:
    gpu = {"gpu": torch.cuda.get_device_name()} if device.startswith("cuda") else {}
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        **gpu,
    }


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    if "--echomimic-src" in sys.argv:  # EchoMimic's loop against ours: benchmarks/peers_echomimic.py
        sys.path.insert(0, str(Path(__file__).parent))
        from peers_echomimic import main as echomimic_main

        return echomimic_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hallo-src", type=Path, help="a checkout of fudan-generative-vision/hallo")
    parser.add_argument("--resummarise", type=Path, help="recompute the summary of this json and print its table")
    parser.add_argument("--extra-path", type=Path, action="append", default=[], help="put on sys.path (einops)")
    parser.add_argument("--tiny", action="store_true", help="the parity goldens' tiny configuration (64 px)")
    parser.add_argument("--size", type=int, help="pixels (default 128; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--frames-per-clip", type=int, default=16)
    parser.add_argument("--motion-frames", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--modes",
        default="parity,fast",
        help="ours: comma-separated modes: parity, fast, compiled (parity mode after pipe.compile(): regional, "
        "fullgraph; its own model objects on the shared tensors and its own VAE copy; its warm-up is the cold start)",
    )
    parser.add_argument(
        "--api",
        choices=["auto", "pipeline", "hallo_generate"],
        default="auto",
        help="ours through EMOPipeline(hallo_conditioning=, mode=) or emo_pipeline.hallo_conversion.hallo_generate "
        "(auto: the "
        "pipeline where it takes hallo_conditioning)",
    )
    parser.add_argument(
        "--hallo-floor",
        action="store_true",
        help="one more Hallo run with 1 torch thread (not timed): how far Hallo's frames move on float noise alone",
    )
    parser.add_argument(
        "--audio-seconds",
        type=float,
        nargs="*",
        default=[1.28, 2.56],
        help="memory sweep: audio lengths (rounded up to whole clips; default 2 and 4 clips); none: no sweep",
    )
    parser.add_argument(
        "--decode-chunk-size", type=int, default=8, help="ours: frames per VAE decode call (the pipeline's default 8)"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="precision of BOTH sides: Hallo through its weight_dtype (networks and VAE cast, the reference bank in "
        "that dtype: the one shim, bank_dtype_shim), ours on the same cast tensors",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (gpu_check.py --hallo-src runs it there)")
    parser.add_argument("--sweep-steps", type=int, default=1)
    parser.add_argument("--sweep-modes", default="fast", help="our modes in the memory sweep (default: fast)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--work-dir", type=Path, help="where net.pth goes (default: a temporary folder, removed)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "peers_hallo_sd15_128.json")
    args = parser.parse_args()
    if args.resummarise:
        result = json.loads(args.resummarise.read_text())
        result["summary"] = summarise(result["runs"])
        write(result, args.resummarise)
        print_table(result)
        return 0
    if args.hallo_src is None:
        parser.error("--hallo-src is required")
    args.size = args.size or (64 if args.tiny else 128)
    args.hallo_src = args.hallo_src.resolve()
    if not (args.hallo_src / "hallo" / "models" / "unet_3d.py").is_file():
        raise SystemExit(f"--hallo-src {args.hallo_src} is not a checkout of fudan-generative-vision/hallo")
    for path in args.extra_path:
        sys.path.insert(0, str(path.resolve()))
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"parity", "fast", "compiled"}
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}: use parity, fast, compiled")
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.set_grad_enabled(False)

    goldens = load_goldens_module()
    goldens.install_shims()
    sys.path.insert(0, str(args.hallo_src))
    import diffusers

    from emo_pipeline import hallo_conversion

    api = args.api
    if api == "auto":
        api = "pipeline" if pipeline_supports_hallo() else "hallo_generate"
    if api == "pipeline" and not pipeline_supports_hallo():
        raise SystemExit("this EMOPipeline takes no hallo_conditioning=/mode=: use --api hallo_generate")

    commit = ""
    if (args.hallo_src / ".git").exists():
        import subprocess

        commit = subprocess.run(
            ["git", "-C", str(args.hallo_src), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    work_context = tempfile.TemporaryDirectory(prefix="bench-peers-") if args.work_dir is None else None
    work = Path(work_context.name) if work_context else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        hallo = build_hallo(args, goldens, work)
        models, left = load_ours(hallo)
        print(f"built both sides in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        if work_context:
            work_context.cleanup()  # net.pth is no longer needed: both sides hold the weights
    ours = {"models": models}
    if api == "pipeline":
        ours["pipeline"] = hallo_conversion.build_hallo_pipeline(models, hallo["vae"])
        ours["pipeline"].set_progress_bar_config(disable=True)
    install_timers(hallo, models)
    weights_before = fingerprint(hallo["net"])

    frames = args.clips * args.frames_per_clip
    sweep_clips = [max(1, -(-round(s * FPS) // args.frames_per_clip)) for s in args.audio_seconds]
    inputs = make_inputs(
        args.size, max([args.clips, *sweep_clips]) * args.frames_per_clip, hallo["audio_layers"], hallo["audio_dim"]
    )
    result = {
        "benchmark": "peers_hallo",
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "extra_path"},
            "api": api,
            "hallo_commit": commit or "unknown (not a git checkout)",
            "shape": "tiny (the parity goldens')" if args.tiny else "SD1.5 (UNet, sd-vae-ft-mse VAE, wav2vec2-base)",
            "unet_config": hallo["unet_config"],
            "unet_additional_kwargs": hallo["unet_additional_kwargs"],
            "vae_config": hallo["vae_config"],
            "scheduler_config": hallo["scheduler_config"],
            "weights": "every parameter random (randomise_ of make_hallo_goldens.py), seed 1234; shared by both",
            "our_parameters_not_in_checkpoint": left,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "hallo_precision_shims": hallo["shims"] or "none (fp32: Hallo as released, its bank rounded to fp16)",
            "memory_method": "VmHWM after a clear_refs reset minus VmRSS at the run's start (kernel high-water mark); "
            "sampled_*: psutil thread every 20 ms",
        },
        "machine": machine_info(args.device),
        "runs": [],
    }

    def record(run: dict) -> None:
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        if run["phase"] != "warmup":  # a stopped run keeps what it measured
            write({**result, "summary": summarise(result["runs"])}, args.output)

    prefix = "ours" if api == "pipeline" else "hallo_generate"
    sides = [("hallo", lambda c, s: run_hallo(hallo, inputs, args, c, s))]
    for m in modes:
        side = ours
        if m == "compiled":
            if api != "pipeline":
                raise SystemExit("--modes compiled needs --api pipeline")
            side = compiled_pipeline(hallo)
        base = "parity" if m == "compiled" else m
        sides.append((f"{prefix}-{m}", lambda c, s, b=base, o=side: run_ours(b, api, o, hallo, inputs, args, c, s)))
    sweep_api = "iter_clips"  # streaming (hallo_generate is the same loop, through the pipeline)
    sweep_sides = sides[:1] + [
        (f"{prefix}-{m} ({sweep_api})", lambda c, s, m=m: run_ours(m, sweep_api, ours, hallo, inputs, args, c, s))
        for m in args.sweep_modes.split(",")
        if m
    ]

    for label, fn in sides:  # warm-up: one clip, one step
        run, _ = measured(label, lambda fn=fn: fn(1, 1), args.frames_per_clip)
        record({**run, "phase": "warmup"})
    hallo_frames = None
    for repeat in range(args.repeats):
        reference = None
        for label, fn in sides:
            run, video = measured(label, lambda fn=fn: fn(args.clips, args.steps), frames)
            if reference is None:
                reference = video
                hallo_frames = video if hallo_frames is None else hallo_frames
            record({**run, "phase": "timed", "repeat": repeat, **diff(video, reference, args.frames_per_clip)})
    if args.hallo_floor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        run, video = measured("hallo", lambda: run_hallo(hallo, inputs, args, args.clips, args.steps), frames)
        torch.set_num_threads(threads)
        record({**run, "phase": "hallo_floor", "threads": 1, **diff(video, hallo_frames, args.frames_per_clip)})
    for seconds, clips in zip(args.audio_seconds, sweep_clips):
        for label, fn in sweep_sides:
            run, _ = measured(label, lambda fn=fn, c=clips: fn(c, args.sweep_steps), clips * args.frames_per_clip)
            record({**run, "phase": "sweep", "audio_seconds": seconds, "clips": clips, "steps": args.sweep_steps})
    result["weights_unchanged"] = fingerprint(hallo["net"]) == weights_before
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summarise(result["runs"])
    write(result, args.output)
    print_table(result)
    print(f"wrote {args.output}")
    return 0 if result["weights_unchanged"] else 1


if __name__ == "__main__":
    sys.exit(main())
