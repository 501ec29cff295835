"""Golden outputs of Hallo's own inference code, at a tiny random configuration (not run in CI).

Builds Hallo's networks (fudan-generative-vision/hallo, MIT; imported at run time from ``--hallo-src``, never
copied here) at a tiny SD-like configuration with EVERY parameter randomised, saves them in the released
``net.pth`` layout, loads them back exactly as Hallo's ``scripts/inference.py`` does (strict ``Net`` load), runs
Hallo's ``FaceAnimatePipeline`` with the clip loop of ``scripts/inference.py`` and records every intermediate our
converted ``EMOPipeline`` must reproduce. See ``docs/hallo_architecture.md`` for the spec and
``<output>/README.md`` (written by this script) for the tensor layouts.

``--variant hallo2`` runs Hallo2's clip loop instead (hallo2 ``scripts/inference_long.py``: same networks,
randomly masked motion-frame pixels); pass ``--hallo-src`` a Hallo2 checkout and ``--weights-dir`` the Hallo
goldens' folder so both share one ``net.pth``.

Usage (a separate venv with Hallo's pins, not the project's; docs/hallo_architecture.md section 10)::

    python3 -m venv /work/venvs/hallo && . /work/venvs/hallo/bin/activate
    pip install torch==2.13.0 && pip install diffusers==0.27.2 transformers==4.39.2 accelerate==0.28.0 \
        einops==0.8.0 omegaconf==2.3.0 numpy==1.26.4 pillow==10.3.0 safetensors "huggingface_hub<0.26"
    # sources: fudan-generative-vision/hallo at 8fd7c572 in /tmp/hallo-src, hallo2 at 58a9aa6c in /tmp/hallo2-src
    G=tests/goldens/make_hallo_goldens.py
    python $G --hallo-src /tmp/hallo-src --output tests/goldens/hallo
    python $G --hallo-src /tmp/hallo2-src --variant hallo2 --weights-dir tests/goldens/hallo \
        --output tests/goldens/hallo2
    python $G --hallo-src /tmp/hallo-src --weights-dir tests/goldens/hallo --output tests/goldens/hallo_motion_scale \
        --clips 1 --motion-scale 1.0 0.6 1.4 --denoiser-only

Each run also reruns itself single-threaded and records Hallo-against-itself differences (``float_noise_floor``).

Shims needed to run Hallo's code (pinned to torch 2.2.2 + xformers; the same script also runs on diffusers 0.42 /
transformers 5) on torch 2.13, all applied here at run time without editing Hallo's files:

1. ``hallo/models/motion_module.py`` does ``import xformers`` / ``import xformers.ops`` unconditionally (only
   ``set_use_memory_efficient_attention_xformers`` uses it, never called at inference). An empty stub module is
   put in ``sys.modules`` AFTER diffusers and transformers are imported (diffusers' ``find_spec("xformers")``
   check fails on a stub without ``__spec__``; importing it first leaves diffusers' "xformers unavailable").
2. (What diffusers 0.27.2 does itself; needed under 0.42.) ``ModelMixin.enable_gradient_checkpointing()`` in 0.42 calls
   ``self._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=...)``; Hallo's UNets override
   ``_set_gradient_checkpointing(self, module, value=False)`` with the 0.27 signature (TypeError). Replaced by
   what diffusers 0.27.2 did: ``model.apply(functools.partial(model._set_gradient_checkpointing, value=True))``.
   This matters: the released inference runs the denoiser in train mode with checkpointing on, and that code
   path is the one that feeds motion frames and skips two motion modules (docs/hallo_architecture.md, 2.4).
3. Hallo's ``scripts/inference.py`` cannot be imported without its audio/face preprocessing dependencies
   (audio-separator, librosa, insightface, mediapipe, moviepy); its ``Net`` class and ``process_audio_emb`` are
   taken from that file's source with ``ast`` and executed verbatim; the clip loop (inference.py:253-343) is
   re-stated below line by line. The face/audio preprocessing is replaced by synthetic inputs (saved).
No other change was needed: everything else imports and runs as released (deprecation warnings only).

Deviations from the released run, forced by the tiny configuration (all recorded in ``metadata.json``):
``FaceLocator(conditioning_embedding_channels=320)`` becomes ``block_out_channels[0]`` (32); the audio
projection sizes follow the tiny wav2vec2 (4 layers x 32 channels, intermediate 64, 32 tokens x 32); fp32 on CPU
instead of fp16 on CUDA; 3 denoising steps instead of 40; 128 x 128 pixels (16 x 16 latents, 4 UNet levels
at 16, 8, 4, 2: see SIZE); attention masks lifted to [0.2, 1].
``f = 16``, ``n = 2``, CFG 3.5, the scheduler and the generator (``torch.manual_seed(42)``) are
as released.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

SEED = 42  # scripts/inference.py:289: generator = torch.manual_seed(42)
WEIGHT_SEED = 1234  # the random weights and synthetic inputs
WEIGHT_GAIN = 0.7  # std of a weight = WEIGHT_GAIN / sqrt(fan_in); 0.7 keeps the clip chain's float-noise growth small
FRAMES = 16  # default.yaml data.n_sample_frames
MOTION_FRAMES = 2  # default.yaml data.n_motion_frames
STEPS = 3
CFG = 3.5  # default.yaml cfg_scale
CLIPS = 2
# Pixels. The VAE downsamples 8x as SD's does: latents 16 x 16, UNet levels 16, 8, 4, 2. NOT 64 pixels (latents
# 8 x 8): the deepest level would be 1 x 1, where each GroupNorm group of 64 channels / 32 groups normalises 2
# numbers to about +-1, an output that jumps with the sign of their difference; float noise of 1e-7 then flipped
# whole groups and Hallo2 disagreed with itself by 0.2 on frames between two thread counts (Hallo: 8e-3).
SIZE = 128
MOTION_SCALE = [1.0, 1.0, 1.0]  # [pose_weight, face_weight, lip_weight], default.yaml:42-44 (--motion-scale)
MIN_REGION_WEIGHT = 0.2  # every region mask >= this everywhere, at every level (each branch's weights matter)
HALLO2_MASK_RATE = 0.25  # hallo2 configs/inference/long.yaml: use_mask: true, mask_rate: 0.25

# A 4-level SD-like UNet: Hallo's UNet3DConditionModel hard-codes 4 levels (mask level = depth, up res
# 2 ** (3 - i)); channels are multiples of 32 because the motion module's GroupNorm has 32 groups.
TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [32, 32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,  # unused (widths are passed); kept as first generated so the weights folder is unchanged
}
# wav2vec2 stand-in: the tiny config of make_wav2vec_golden.py (4 layers, hidden 32).
AUDIO_PROJ_KWARGS = {
    "seq_len": 5,
    "blocks": 4,
    "channels": 32,
    "intermediate_dim": 64,
    "output_dim": 32,
    "context_tokens": 32,
}
FACE_EMB_DIM = 512  # insightface embedding


def install_shims() -> None:
    """Shim 1 of the module docstring: a stub ``xformers`` (imported, never used, by motion_module.py)."""
    import diffusers  # noqa: F401  (must see the real "xformers unavailable" first)
    import diffusers.models.attention_processor  # noqa: F401
    import transformers  # noqa: F401

    stub = types.ModuleType("xformers")
    stub.ops = types.ModuleType("xformers.ops")
    sys.modules.setdefault("xformers", stub)
    sys.modules.setdefault("xformers.ops", stub.ops)


def enable_gradient_checkpointing_027(model: torch.nn.Module) -> None:
    """Shim 2: diffusers 0.27.2's ``ModelMixin.enable_gradient_checkpointing`` (Hallo's override signature)."""
    model.apply(functools.partial(model._set_gradient_checkpointing, value=True))


def load_from_inference_script(hallo_src: Path, names: set[str], script_name: str = "inference.py") -> dict:
    """Shim 3: execute the named top-level defs of Hallo's scripts/inference.py verbatim, without its imports."""
    source = (hallo_src / "scripts" / script_name).read_text()
    tree = ast.parse(source)
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in names]
    missing = names - {node.name for node in body}
    if missing:
        raise SystemExit(f"scripts/{script_name} of {hallo_src} lacks {sorted(missing)}")
    namespace = {"torch": torch, "nn": torch.nn}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(hallo_src / "scripts" / script_name), "exec"), namespace)
    return namespace


def randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (zero-initialised ones too), so every path changes the output.

    Weights (ndim >= 2): normal with std 1/sqrt(fan_in) (keeps activations O(1) through the tiny nets);
    normalisation weights: 1 + 0.1 * normal; biases and other 1-d parameters: 0.1 * normal.
    Buffers (the motion modules' sinusoidal ``pe``) stay as built: they are constants in the released files.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(WEIGHT_GAIN * noise / fan_in**0.5)
            elif name.endswith("weight"):  # LayerNorm / GroupNorm scales
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def synthetic_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The inputs Hallo's ImageProcessor / AudioProcessor would produce, synthetic and seeded.

    Layouts follow image_processor.py:107-182 and audio_processor.py:106-129 (docs/hallo_architecture.md 6-7).
    """
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    face = ((xx / 0.55) ** 2 + ((yy + 0.05) / 0.7) ** 2 < 1).float()
    image = torch.stack([0.8 * face - 0.4 + 0.3 * xx, 0.5 * face - 0.3 * yy - 0.2, 0.6 - 0.9 * face + 0.2 * xx * yy])
    image = (image + 0.15 * torch.randn(image.shape, generator=generator)).clamp(-1, 1)  # (3, H, W) in [-1, 1]

    # face region for the FaceLocator: the hard (unblurred) expanded face box, RGB, in {0, 1}
    region = torch.zeros(SIZE, SIZE)
    region[10:58, 14:50] = 1.0
    face_region = region.expand(3, SIZE, SIZE).clone()

    # attention masks at H/8, H/16, H/32, H/64 (image_processor.py:156-180), each viewed (1, h*w), in [0, 1]:
    # soft blobs standing in for the blurred face / lip boxes; full = background = 1 - face_blur.
    def blob(cy: float, cx: float, ry: float, rx: float, res: int) -> torch.Tensor:
        g = torch.linspace(-1, 1, res) if res > 1 else torch.zeros(1)
        y, x = torch.meshgrid(g, g, indexing="ij")
        return torch.exp(-(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)).clamp(0, 1)

    inputs = {"source_image": image[None], "face_region": face_region, "face_emb": None}
    for level, res in enumerate((SIZE // 8, SIZE // 16, SIZE // 32, SIZE // 64)):
        face_blur = blob(0.0, 0.0, 0.7, 0.5, res)
        lip = blob(0.45, 0.0, 0.25, 0.35, res)
        # Hallo's masks are blurred boxes that vanish away from their region (the full mask is 0 inside the face,
        # the lip mask ~0 at a coarse level), which would leave a branch's weights untested at some level: each is
        # lifted to [MIN_REGION_WEIGHT, 1] so every region weighs >= 0.2 everywhere, with its own spatial shape.
        low = MIN_REGION_WEIGHT
        inputs[f"full_mask_{level}"] = (low + (1 - low) * (1.0 - face_blur)).reshape(1, -1)
        inputs[f"face_mask_{level}"] = (low + (1 - low) * (face_blur - lip).clamp(0, 1)).reshape(1, -1)
        inputs[f"lip_mask_{level}"] = (low + (1 - low) * lip).reshape(1, -1)
    inputs["face_emb"] = torch.randn(1, FACE_EMB_DIM, generator=generator) * 20.0  # insightface norms are ~20
    # wav2vec2 hidden states of every layer, per video frame: (T, layers, channels), T = CLIPS * FRAMES
    inputs["audio_emb"] = torch.randn(
        CLIPS * FRAMES, AUDIO_PROJ_KWARGS["blocks"], AUDIO_PROJ_KWARGS["channels"], generator=generator
    )
    return inputs


def write_readme(output: Path, metadata: dict) -> None:
    """Describe every file and tensor layout of the goldens."""
    f, n, s, c = FRAMES, MOTION_FRAMES, STEPS, CLIPS
    h = SIZE // 8
    hallo2 = metadata["variant"] == "hallo2"
    weights = metadata["weights_dir"]
    where = "this folder" if weights == "." else f"`{weights}` (shared with the Hallo goldens: same seed)"
    variant_note = (
        "\nHallo2 (`fudan-generative-vision/hallo2`): its networks and `FaceAnimatePipeline` are byte-identical to\n"
        "Hallo's; its `scripts/inference_long.py` differs in the clip loop: before each clip the motion-frame\n"
        f"pixels are multiplied by `torch.rand(H, W) > {HALLO2_MASK_RATE} | face_region` (`long.yaml: use_mask`),\n"
        "drawn from the shared generator before the clip's noise. The long-audio cut into 60 s wav2vec segments\n"
        "(`use_cut`) does not apply to these synthetic audio features.\n"
        if hallo2
        else ""
    )
    text = f"""# {"Hallo2" if hallo2 else "Hallo"} goldens (tiny, random weights)

Made by `tests/goldens/make_hallo_goldens.py --variant {metadata["variant"]}` from the authors' own code
(commit `{metadata["hallo_commit"]}`), on
torch {metadata["versions"]["torch"]}, diffusers {metadata["versions"]["diffusers"]}. Spec:
`docs/hallo_architecture.md`. All tensors float32 unless noted; safetensors except `net.pth`.

Settings: {SIZE}x{SIZE} pixels, latents 4x{h}x{h}, f = {f} frames per clip, n = {n} motion frames, {c} clips,
{s} DDIM steps (timesteps {metadata["timesteps"]}), CFG {CFG}, motion_scale {MOTION_SCALE}, generator
`torch.manual_seed({SEED})` shared by the clips (the initial noise is also saved, so parity does not need
the RNG). Weights: every parameter random (`randomise_` in the script), seed {WEIGHT_SEED}.
{variant_note}
## Model files (in {where})
* `net.pth` - `Net.state_dict()` exactly as scripts/inference.py loads it strictly (prefixes `reference_unet.`,
  `denoising_unet.`, `face_locator.`, `imageproj.`, `audioproj.`); a pickle of tensors only: load with
  `torch.load(path, map_location="cpu", weights_only=True)`.
  Floating tensors are stored as float16 (size); Hallo casts them into its float32 modules on load.
* no motion-module file: Hallo loads `mm_sd_v15_v2.ckpt` first (`from_pretrained_2d`) but the strict net.pth load
  overwrites every motion-module tensor (net.pth holds them under `denoising_unet.*.motion_modules.*`, in the
  AnimateDiff key layout after the prefix), so the generator makes a throwaway one and does not keep it.
* `unet/config.json` - the tiny SD-like UNet config (Hallo builds both UNets from it;
  `UNet3DConditionModel.from_pretrained_2d` swaps in the 3D block types).
* `vae/` - tiny `AutoencoderKL` (diffusers folder, 8x downsampling like SD's; every parameter random).
* `metadata.json` - every constructor argument, `unet_additional_kwargs`, scheduler config, sizes, shims, versions.

## `inputs.safetensors` (what the golden takes)
* `source_image` (1, 3, {SIZE}, {SIZE}) in [-1, 1] - the reference image after Hallo's pixel transform.
* `face_emb` (1, 512) - insightface-like identity embedding (raw, not normalised).
* `face_region` (3, {SIZE}, {SIZE}) in {{0, 1}} - FaceLocator input (same box in all 3 channels).
* `full_mask_L`, `face_mask_L`, `lip_mask_L` for L = 0..3: (1, r*r) with r = {SIZE // 8}, {SIZE // 16},
  {SIZE // 32}, {SIZE // 64}, in [0, 1] (row-major y, x); "full" = background/pose mask. Hallo repeats them to
  (f, r*r) per clip and to (2f, r*r) for CFG.
* `audio_emb` (T = {c * f}, 4, 32) - per-frame wav2vec2 hidden states of all layers (the tiny wav2vec2:
  4 layers, 32 channels); `audio_emb_windowed` (T, 5, 4, 32) after `process_audio_emb` (edge-clamped
  window i-2..i+2 over the whole sequence).
* `init_latents_clipK` (1, 4, f, {h}, {h}) - the initial noise of clip K (drawn from the shared generator).

## `outputs.safetensors`
* `timesteps` (steps,) int64.
* `id_tokens` (2, 4, 32) - `cat([image_proj(0), image_proj(face_emb)])`: row 0 uncond, row 1 cond.
* `face_locator_clipK` (2, 32, 1, {h}, {h}) - `cat([zeros, face_locator(region)])`, one frame (Hallo's is the same
  on all f frames).
* `audio_tokens_clipK` (1, f, 32, 32) - `audioproj(audio_emb_windowed[K*f:(K+1)*f][None])` (the cond row; uncond
  is zeros).
* `ref_pixels_clipK` (1 + n, 3, {SIZE}, {SIZE}) in [-1, 1] - `[source, motion frames]` fed to the VAE; clip 0's
  motion frames are the source image, clip K > 0's are clip K-1's last n decoded frames `* 2 - 1`{
        " (then masked)" if hallo2 else ""
    }.{
        chr(10)
        + "* `motion_pixel_mask_clipK` (n, "
        + str(SIZE)
        + ", "
        + str(SIZE)
        + ") uint8 {0, 1} - the Hallo2 pixel mask"
        " applied to the motion frames (same for the 3 channels)."
        if hallo2
        else ""
    }
* `ref_latents_clipK` (1 + n, 4, {h}, {h}) - `vae.encode(ref_pixels).latent_dist.mean * 0.18215`.
* `noise_pred_clipK_stepS` (2, 4, f, {h}, {h}) - the denoiser output (v-prediction) before guidance; row 0 =
  uncond branch, row 1 = cond branch (layout b c f h w).
* `latents_clipK_stepS` (1, 4, f, {h}, {h}) - latents after scheduler step S.
* `frames_clipK` (1, 3, f, {SIZE}, {SIZE}) in [0, 1] - decoded output of clip K (`(x / 2 + 0.5).clamp(0, 1)`).
* the final video (inference.py:341-343) is `cat([frames_clip0[0], frames_clip1[0]], dim=1)` (audio_length = T).

## How to compare (tolerances)
Hallo rounds the reference bank to float16, so float noise of ~1e-7 (thread count, op order) flips roundings and
grows through CFG, the DDIM steps and the clip chain. `metadata.json: float_noise_floor` is Hallo against
itself (default threads vs 1 thread), max |diff| per tensor. Compare teacher-forced: for clip K, step S feed the
golden `init_latents_clipK` / `latents_clipK_step(S-1)`, the golden reference bank of clip K rounded to float16
(as Hallo's reader rounds it) and the inputs above, and compare `noise_pred_clipK_stepS` and the scheduler's step
of it against `latents_clipK_stepS` (float32 noise only: within 1e-5); the unrounded bank is the ReferenceNet's
output on `ref_latents_clipK` (within 1e-5). A free-running run matches to about the floor (~1e-4 on frames).

## `reference_bank.safetensors`
`clipK/<module name>` (2 (1 + n), L, C) - the ReferenceNet's attn1 input (`norm1` output) of every
`BasicTransformerBlock`, rows `[src, mf_1..mf_n] x 2` (uncond copy first), as written (float32; the backbone
reads them rounded to float16). Module names are the ReferenceNet's, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0`; the backbone reads the same-named block.
"""
    (output / "README.md").write_text(text)


def publish_weights(made: Path, target: Path) -> Path:
    """Put the generated net.pth, vae/ and unet/ in ``target``, or check that the ones there are identical."""
    from safetensors.torch import load_file

    if not (target / "net.pth").exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(made / "net.pth", target / "net.pth")
        for folder in ("vae", "unet"):
            shutil.copytree(made / folder, target / folder, dirs_exist_ok=True)
        return target
    existing = torch.load(target / "net.pth", map_location="cpu", weights_only=True)
    new = torch.load(made / "net.pth", map_location="cpu", weights_only=True)
    vae_same = load_file(target / "vae" / "diffusion_pytorch_model.safetensors")
    vae_new = load_file(made / "vae" / "diffusion_pytorch_model.safetensors")
    same = existing.keys() == new.keys() and all(torch.equal(existing[k], new[k]) for k in new)
    same = same and vae_same.keys() == vae_new.keys() and all(torch.equal(vae_same[k], vae_new[k]) for k in vae_new)
    if not same:
        raise SystemExit(f"{target} holds different weights: delete them or choose another --weights-dir")
    return target


def measure_noise_floor(args: argparse.Namespace, outputs: dict[str, torch.Tensor], rerun: Path) -> dict:
    """Rerun Hallo's code single-threaded and report max |difference| per output tensor.

    Hallo rounds the reference bank to float16 (mutual_self_attention.py:453), so float noise of ~1e-7 flips
    fp16 roundings and grows through CFG, DDIM and the clip chain: this is the tolerance floor of a parity test
    (Hallo against itself). Compare each step teacher-forced (golden inputs of that step) for tight tolerances.
    """
    from safetensors.torch import load_file

    command = [sys.executable, __file__, "--hallo-src", str(args.hallo_src), "--output", str(rerun)]
    command += ["--hallo-commit", args.hallo_commit or "-", "--threads", "1", "--no-floor", "--variant", args.variant]
    command += ["--weights-dir", str(args.weights_dir or args.output), "--clips", str(args.clips)]
    command += ["--motion-scale", *(str(x) for x in args.motion_scale)]
    subprocess.run(command, check=True, capture_output=True)
    single = load_file(rerun / "outputs.safetensors")
    return {
        key: float((single[key].double() - value.double()).abs().max())
        for key, value in sorted(outputs.items())
        if value.is_floating_point()
    }


def main() -> None:
    global CLIPS, MOTION_SCALE  # set from the command line; every helper reads them
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hallo-src", type=Path, required=True, help="a checkout of fudan-generative-vision/hallo")
    parser.add_argument("--output", type=Path, default=Path("tests/goldens/hallo"))
    parser.add_argument("--hallo-commit", help="the commit of --hallo-src when it is not a git checkout")
    parser.add_argument(
        "--variant",
        choices=["hallo", "hallo2"],
        default="hallo",
        help="hallo: scripts/inference.py; hallo2: hallo2's scripts/inference_long.py (same networks, masked motion "
        "frames)",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        help="where net.pth, vae/ and unet/ go (default: --output); if they exist there they must be identical",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--clips", type=int, default=CLIPS, help=f"clips to generate (default {CLIPS})")
    parser.add_argument(
        "--motion-scale",
        type=float,
        nargs=3,
        default=MOTION_SCALE,
        metavar=("FULL", "FACE", "LIP"),
        help=f"Hallo's motion_scale (pose, face, lip weights; default {MOTION_SCALE}, as released)",
    )
    parser.add_argument(
        "--denoiser-only",
        action="store_true",
        help="keep no pixels (frames_*, ref_pixels_*) in outputs.safetensors: for runs only teacher-forced tests read",
    )
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the second, single-thread run that measures the noise floor"
    )
    args = parser.parse_args()
    CLIPS, MOTION_SCALE = args.clips, list(args.motion_scale)
    if args.threads:
        torch.set_num_threads(args.threads)
    hallo_src = args.hallo_src.resolve()
    output = args.output
    output.mkdir(parents=True, exist_ok=True)

    install_shims()
    sys.path.insert(0, str(hallo_src))
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler
    from hallo.animate.face_animate import FaceAnimatePipeline
    from hallo.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
    from hallo.models.audio_proj import AudioProjModel
    from hallo.models.face_locator import FaceLocator
    from hallo.models.image_proj import ImageProjModel
    from hallo.models.mutual_self_attention import torch_dfs
    from hallo.models.unet_2d_condition import UNet2DConditionModel
    from hallo.models.unet_3d import UNet3DConditionModel
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    script_name = "inference.py" if args.variant == "hallo" else "inference_long.py"
    script = load_from_inference_script(hallo_src, {"Net", "process_audio_emb"}, script_name)
    Net, process_audio_emb = script["Net"], script["process_audio_emb"]

    config_name = "default.yaml" if args.variant == "hallo" else "long.yaml"  # hallo2 ships long.yaml only
    config = OmegaConf.load(hallo_src / "configs" / "inference" / config_name)
    if args.variant == "hallo2":
        assert config.use_mask and config.mask_rate == HALLO2_MASK_RATE, "long.yaml changed: check the mask step"
    unet_additional_kwargs = OmegaConf.to_container(config.unet_additional_kwargs)
    unet_additional_kwargs["audio_attention_dim"] = AUDIO_PROJ_KWARGS["output_dim"]  # 768 released
    sched_kwargs = OmegaConf.to_container(config.noise_scheduler_kwargs)
    if config.enable_zero_snr:  # inference.py:186-191
        sched_kwargs.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")

    commit = (
        args.hallo_commit
        or subprocess.run(
            ["git", "-C", str(hallo_src), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    if not commit:
        raise SystemExit(f"{hallo_src} is not a git checkout: pass --hallo-commit")

    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    work = Path(tempfile.mkdtemp(prefix="hallo-golden-"))
    try:
        # --- the files Hallo's inference reads: SD-like base (config + weights), motion module, VAE, net.pth ---
        base = work / "base"
        (base / "unet").mkdir(parents=True)
        (base / "unet" / "config.json").write_text(json.dumps(TINY_UNET_CONFIG, indent=2))
        seed_unet = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
        randomise_(seed_unet, generator)
        save_file(seed_unet.state_dict(), base / "unet" / "diffusion_pytorch_model.safetensors")
        mm_path = work / "mm_sd_v15_v2.ckpt"  # AnimateDiff's released format (a pickle of tensors)
        mm_placeholder = UNet3DConditionModel.from_pretrained_2d(
            base,
            work / "absent.ckpt",
            subfolder="unet",
            unet_additional_kwargs=unet_additional_kwargs,
            use_landmark=False,
        )
        randomise_(mm_placeholder, generator)
        torch.save({k: v for k, v in mm_placeholder.state_dict().items() if "motion_modules" in k}, mm_path)

        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        randomise_(vae, generator)
        vae.save_pretrained(work / "weights" / "vae")

        # the released net.pth: Net(...) of the same classes, every parameter random
        def build_modules():
            reference_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")  # inference.py:196
            denoising_unet = UNet3DConditionModel.from_pretrained_2d(  # inference.py:198-205
                base, mm_path, subfolder="unet", unet_additional_kwargs=unet_additional_kwargs, use_landmark=False
            )
            face_locator = FaceLocator(conditioning_embedding_channels=TINY_UNET_CONFIG["block_out_channels"][0])
            image_proj = ImageProjModel(
                cross_attention_dim=denoising_unet.config.cross_attention_dim,
                clip_embeddings_dim=FACE_EMB_DIM,
                clip_extra_context_tokens=4,
            )
            audio_proj = AudioProjModel(**AUDIO_PROJ_KWARGS)
            return reference_unet, denoising_unet, face_locator, image_proj, audio_proj

        net = Net(*build_modules())
        randomise_(net, generator)
        # stored as float16 to keep the file small (the model computes in float32 after the strict load, so the
        # goldens see exactly these fp16-representable values)
        net_state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in net.state_dict().items()}
        torch.save(net_state, work / "weights" / "net.pth")
        (work / "weights" / "unet").mkdir()
        (work / "weights" / "unet" / "config.json").write_text(json.dumps(TINY_UNET_CONFIG, indent=2) + "\n")
        del net, mm_placeholder, seed_unet
        weights = publish_weights(work / "weights", args.weights_dir or output)

        # --- inference.py step 4: build, freeze, checkpointing, strict load of net.pth ---
        val_noise_scheduler = DDIMScheduler(**sched_kwargs)
        vae = AutoencoderKL.from_pretrained(weights / "vae")
        reference_unet, denoising_unet, face_locator, image_proj, audio_proj = build_modules()
        for module in (vae, image_proj, reference_unet, denoising_unet, face_locator, audio_proj):
            module.requires_grad_(False)
        enable_gradient_checkpointing_027(reference_unet)  # inference.py:233 (shim 2)
        enable_gradient_checkpointing_027(denoising_unet)  # inference.py:234 (shim 2)
        net = Net(reference_unet, denoising_unet, face_locator, image_proj, audio_proj)
        released = torch.load(weights / "net.pth", map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(released)
        assert len(missing) == 0 and len(unexpected) == 0, "Fail to load correct checkpoint."  # inference.py:250

        # the released code path (docs 2.4): denoiser in train mode with checkpointing, ReferenceNet in eval
        assert denoising_unet.training and not reference_unet.training
        assert all(b.gradient_checkpointing for b in [*denoising_unet.down_blocks, *denoising_unet.up_blocks])
        # reference-bank pairing (mutual_self_attention.py:433-453) pairs same-named blocks
        writers = sorted(
            [m for m in torch_dfs(reference_unet) if isinstance(m, BasicTransformerBlock)],
            key=lambda x: -x.norm1.normalized_shape[0],
        )
        readers = sorted(
            [m for m in torch_dfs(denoising_unet) if isinstance(m, TemporalBasicTransformerBlock)],
            key=lambda x: -x.norm1.normalized_shape[0],
        )
        ref_names = {m: n for n, m in reference_unet.named_modules()}
        den_names = {m: n for n, m in denoising_unet.named_modules()}
        assert [ref_names[w] for w in writers] == [den_names[r] for r in readers], "bank pairing is not by name"

        pipeline = FaceAnimatePipeline(  # inference.py:254-262
            vae=vae,
            reference_unet=net.reference_unet,
            denoising_unet=net.denoising_unet,
            face_locator=net.face_locator,
            scheduler=val_noise_scheduler,
            image_proj=net.imageproj,
        )
        pipeline.to(device="cpu", dtype=torch.float32)
        pipeline.set_progress_bar_config(disable=True)

        # --- inputs ---
        inputs = synthetic_inputs(torch.Generator().manual_seed(WEIGHT_SEED + 1))
        audio_emb = process_audio_emb(inputs["audio_emb"])  # inference.py:264
        inputs["audio_emb_windowed"] = audio_emb
        source_image_pixels = inputs["source_image"]  # already unsqueezed (inference.py:266)
        source_image_face_region = inputs["face_region"][None]  # inference.py:267
        source_image_face_emb = inputs["face_emb"].reshape(1, -1)  # inference.py:268
        clip_length = FRAMES
        masks = {
            kind: [inputs[f"{kind}_mask_{level}"].repeat(clip_length, 1) for level in range(4)]  # :271-282
            for kind in ("full", "face", "lip")
        }

        # --- recording hooks (they only read) ---
        outputs: dict[str, torch.Tensor] = {}
        bank: dict[str, torch.Tensor] = {}
        state = {"clip": 0, "step": 0}
        pipeline_prepare_latents = pipeline.prepare_latents

        def prepare_latents_recorded(*a, **k):
            latents = pipeline_prepare_latents(*a, **k)
            inputs[f"init_latents_clip{state['clip']}"] = latents.clone()
            return latents

        pipeline.prepare_latents = prepare_latents_recorded

        def on_denoiser(_module, _args, kwargs, output_):
            k, s = state["clip"], state["step"]
            outputs[f"noise_pred_clip{k}_step{s}"] = output_[0].detach().clone()
            # the same map on every frame (Hallo repeats it over f): one frame is kept, (2, C, 1, h, w)
            face_features = kwargs["mask_cond_fea"]
            assert torch.equal(face_features, face_features[:, :, :1].expand_as(face_features))
            outputs[f"face_locator_clip{k}"] = face_features[:, :, :1].detach().clone()
            outputs["id_tokens"] = kwargs["encoder_hidden_states"].detach().clone()

        def on_reference(_module, _args, _output):
            for name, module in reference_unet.named_modules():
                if isinstance(module, BasicTransformerBlock):
                    assert len(module.bank) == 1
                    bank[f"clip{state['clip']}/{name}"] = module.bank[0].detach().clone()

        def on_vae_encode(_module, args, output_):
            outputs[f"ref_pixels_clip{state['clip']}"] = args[0].detach().clone()
            outputs[f"ref_latents_clip{state['clip']}"] = output_.latent_dist.mean.detach().clone() * 0.18215

        def on_step(step_index, _t, latents):
            outputs[f"latents_clip{state['clip']}_step{step_index}"] = latents.detach().clone()
            state["step"] = step_index + 1

        hooks = [
            denoising_unet.register_forward_hook(on_denoiser, with_kwargs=True),
            reference_unet.register_forward_hook(on_reference),
        ]
        vae_encode = vae.encode

        def encode_recorded(x, *a, **k):
            result = vae_encode(x, *a, **k)
            on_vae_encode(None, (x,), result)
            return result

        vae.encode = encode_recorded

        # --- the clip loop, inference.py:285-343 ---
        times = audio_emb.shape[0] // clip_length
        assert times == CLIPS
        tensor_result = []
        generator = torch.manual_seed(SEED)
        for t in range(times):
            state.update(clip=t, step=0)
            if len(tensor_result) == 0:
                motion_zeros = source_image_pixels.repeat(MOTION_FRAMES, 1, 1, 1)
                motion_zeros = motion_zeros.to(dtype=source_image_pixels.dtype, device=source_image_pixels.device)
                pixel_values_ref_img = torch.cat([source_image_pixels, motion_zeros], dim=0)
            else:
                motion_frames = tensor_result[-1][0]
                motion_frames = motion_frames.permute(1, 0, 2, 3)
                motion_frames = motion_frames[0 - MOTION_FRAMES :]
                motion_frames = motion_frames * 2.0 - 1.0
                motion_frames = motion_frames.to(dtype=source_image_pixels.dtype, device=source_image_pixels.device)
                pixel_values_ref_img = torch.cat([source_image_pixels, motion_frames], dim=0)
            pixel_values_ref_img = pixel_values_ref_img.unsqueeze(0)

            if args.variant == "hallo2":  # hallo2 scripts/inference_long.py:404-418, long.yaml use_mask/mask_rate
                pixel_motion_values = pixel_values_ref_img[:, 1:]
                b, f, c, h, w = pixel_motion_values.shape
                rand_mask = torch.rand(h, w)  # the global generator, i.e. `generator`, before the clip's noise
                mask = rand_mask > HALLO2_MASK_RATE
                mask = mask.unsqueeze(0).unsqueeze(0).unsqueeze(0)
                mask = mask.expand(b, f, c, h, w)
                face_mask = source_image_face_region.repeat(f, 1, 1, 1).unsqueeze(0)
                assert face_mask.shape == mask.shape
                mask = mask | face_mask.bool()
                pixel_motion_values = pixel_motion_values * mask
                pixel_values_ref_img[:, 1:] = pixel_motion_values
                outputs[f"motion_pixel_mask_clip{t}"] = mask[0, :, 0].to(torch.uint8).clone()  # (n, H, W)

            audio_tensor = audio_emb[t * clip_length : min((t + 1) * clip_length, audio_emb.shape[0])]
            audio_tensor = audio_tensor.unsqueeze(0)
            audio_tensor = audio_tensor.to(device=net.audioproj.device, dtype=net.audioproj.dtype)
            audio_tensor = net.audioproj(audio_tensor)
            outputs[f"audio_tokens_clip{t}"] = audio_tensor.detach().clone()

            pipeline_output = pipeline(
                ref_image=pixel_values_ref_img,
                audio_tensor=audio_tensor,
                face_emb=source_image_face_emb,
                face_mask=source_image_face_region,
                pixel_values_full_mask=masks["full"],
                pixel_values_face_mask=masks["face"],
                pixel_values_lip_mask=masks["lip"],
                width=SIZE,
                height=SIZE,
                video_length=clip_length,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                generator=generator,
                motion_scale=MOTION_SCALE,
                callback=on_step,
            )
            tensor_result.append(pipeline_output.videos)
            outputs[f"frames_clip{t}"] = pipeline_output.videos.clone()
        audio_length = audio_emb.shape[0]
        video = torch.cat(tensor_result, dim=2).squeeze(0)[:, :audio_length]  # inference.py:341-343
        assert torch.equal(video, torch.cat([outputs[f"frames_clip{k}"][0] for k in range(CLIPS)], dim=1))
        outputs["timesteps"] = val_noise_scheduler.timesteps.clone()
        for hook in hooks:
            hook.remove()

        for name in ("audio_tokens_clip0", f"noise_pred_clip{CLIPS - 1}_step2", f"frames_clip{CLIPS - 1}"):
            assert name in outputs, name
        save_file({k: v.contiguous() for k, v in inputs.items()}, output / "inputs.safetensors")
        if args.denoiser_only:  # what the teacher-forced tests read: no pixels (a few MB less)
            outputs = {k: v for k, v in outputs.items() if not k.startswith(("frames_", "ref_pixels_"))}
        save_file({k: v.contiguous() for k, v in outputs.items()}, output / "outputs.safetensors")
        save_file({k: v.contiguous() for k, v in bank.items()}, output / "reference_bank.safetensors")

        metadata = {
            "variant": args.variant,
            "weights_dir": str(Path(os.path.relpath(weights, output))),
            "hallo_repo": f"https://github.com/fudan-generative-vision/{args.variant}",
            "hallo_commit": commit,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "seed": SEED,
            "weight_seed": WEIGHT_SEED,
            "size": SIZE,
            "num_frames_per_clip": FRAMES,
            "num_motion_frames": MOTION_FRAMES,
            "num_clips": CLIPS,
            "num_inference_steps": STEPS,
            "guidance_scale": CFG,
            "motion_scale": MOTION_SCALE,
            "denoiser_only": args.denoiser_only,
            "audio_length": audio_length,
            "weight_dtype": "fp32",
            "timesteps": outputs["timesteps"].tolist(),
            "unet_config": TINY_UNET_CONFIG,
            "unet_additional_kwargs": unet_additional_kwargs,
            "use_landmark": False,
            "vae_config": TINY_VAE_CONFIG,
            "scheduler_config": dict(val_noise_scheduler.config),
            "face_locator_kwargs": {"conditioning_embedding_channels": TINY_UNET_CONFIG["block_out_channels"][0]},
            "image_proj_kwargs": {
                "cross_attention_dim": TINY_UNET_CONFIG["cross_attention_dim"],
                "clip_embeddings_dim": FACE_EMB_DIM,
                "clip_extra_context_tokens": 4,
            },
            "audio_proj_kwargs": AUDIO_PROJ_KWARGS,
            "vae_scaling": 0.18215,
            "shims": [
                "stub xformers module in sys.modules (motion_module.py imports it, never used)",
                "enable_gradient_checkpointing as diffusers 0.27.2: model.apply(partial(_set_gradient_checkpointing,"
                " value=True))",
                "Net and process_audio_emb executed from scripts/inference.py source via ast; clip loop re-stated",
            ],
            "deviations_from_release": [
                "tiny config (unet_config, vae_config, audio_proj_kwargs, audio_attention_dim)",
                "FaceLocator conditioning_embedding_channels = block_out_channels[0] instead of 320",
                "fp32 on CPU instead of fp16 on CUDA",
                f"{STEPS} steps instead of 40",
                "synthetic inputs instead of insightface/mediapipe/wav2vec2 preprocessing",
            ],
        }
        if not args.no_floor:
            metadata["float_noise_floor"] = measure_noise_floor(args, outputs, work / "single_thread")
        (output / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        write_readme(output, metadata)
        assert load_file(output / "outputs.safetensors").keys() == outputs.keys()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in sorted(output.rglob("*")):
        if path.is_file():
            print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
