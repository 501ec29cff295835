"""Golden outputs of EchoMimic's own inference code, at a tiny random configuration (not run in CI).

Builds EchoMimic's networks (antgroup/echomimic, Apache-2.0; imported at run time from ``--echomimic-src``, never
copied here) at a tiny SD-like size with EVERY parameter random (zero-initialised ones too), runs its own
``Audio2VideoPipeline`` (audio variant, CFG 2.5) and its acc pipeline (CFG 1.0) on a synthetic portrait and a
synthetic track, and its own whisper fork (``Audio2Feature``) on a tiny random whisper encoder. Records every
intermediate our EchoMimic family must reproduce. See ``docs/echomimic_architecture.md``.

Usage (a separate venv, not the project's)::

    python3 -m venv /work/venvs/echomimic && . /work/venvs/echomimic/bin/activate
    pip install /path/to/torch-2.13.0*.whl
    pip install "diffusers==0.24.0" "huggingface_hub<0.26" "transformers==4.46.3" "numpy<2" einops==0.4.1 \
        omegaconf==2.3.0 opencv-python-headless ffmpeg-python==0.2.0 safetensors pillow tqdm accelerate
    git clone https://github.com/antgroup/echomimic /tmp/echomimic   # snapshot a53e970
    python tests/goldens/make_echomimic_goldens.py --echomimic-src /tmp/echomimic --output tests/goldens/echomimic

Shims (applied at run time; EchoMimic's files are not edited):

1. ``ReferenceAttentionControl.register_reference_hooks`` has the default ``device=torch.device("cuda")`` and moves
   its guidance row mask there (mutual_self_attention.py:58-89, 158-166); a CPU-only torch cannot. The default is
   replaced by ``cpu`` in the function's ``__defaults__``.
2. EchoMimic's pins (torch<=2.2.2, torchvision, facenet_pytorch, moviepy) do not install beside torch 2.13; the
   generator imports only ``src.models``, ``src.pipelines`` and ``src.models.whisper`` (which need none of them).
   The face detector (MTCNN) is not run: the face box is given, and the crop/mask code of
   ``infer_audio2vid.py:196-223`` is restated below line by line (it is inline in ``main()``; ``crop_and_pad`` and
   ``select_face`` are EchoMimic's own functions, executed verbatim from their files' source with ``ast``, as
   their modules import facenet_pytorch / moviepy / torchvision, which do not install or import beside torch 2.13).
3. ``Audio2Feature.audio2feat`` is passed the waveform (a float32 array at 16 kHz) instead of a path: its
   ``transcribe`` accepts arrays (transcribe.py: ``log_mel_spectrogram(audio)``), so no ffmpeg binary is needed.
Everything else runs as released (diffusers 0.24.0, transformers 4.46.3 on torch 2.13.0, CPU, fp32).

Deviations forced by the tiny size (recorded in metadata.json): a 4-level UNet with channels (32, 32, 64, 64),
1 layer per block, 96 x 96 pixels (12 x 12 latents: the 2 x 2 bottom level keeps 8 values per GroupNorm group); the
face locator's output width is 32 (``block_out_channels[0]``) instead of 320, its other channels (16, 32, 96, 256)
are the release's; the whisper encoder has 1 block instead of 4 (width 384, 80 mels, 1500 positions as whisper-tiny,
so 2 x 10 = 20 tokens per frame instead of 50); 5 DDIM steps instead of 30 (acc: 6, as released); fp32 on CPU.
Weights are drawn from one seed in a recorded order and rounded to fp16 values (run in fp32); the tests regenerate them
(``tests/goldens/echomimic_weights.py``), so only the motion modules' sinusoid tables are committed as weights.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from echomimic_weights import checksum, random_state_dict  # noqa: E402

SEED = 420  # infer_audio2vid.py: --seed 420, generator = torch.manual_seed(seed)
WEIGHT_SEED = 1234
SIZE = 96
FPS = 24  # infer_audio2vid.py --fps
CONTEXT_FRAMES = 12  # --context_frames
CONTEXT_OVERLAP = 3  # --context_overlap
AUDIO_SECONDS = 1.3
FRAME_STRIDE = 8
RUNS = {"audio": {"steps": 5, "cfg": 2.5, "acc": False}, "acc": {"steps": 6, "cfg": 1.0, "acc": True}}

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
    "sample_size": SIZE // 8,
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
    "sample_size": SIZE,
}
# whisper-tiny's encoder dims (n_mels 80, 1500 positions, width 384, 6 heads) with 1 block instead of 4; the decoder
# (unused by EchoMimic) shrunk to the minimum the class accepts.
TINY_WHISPER_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 1,
    "n_vocab": 8,
    "n_text_ctx": 4,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 1,
}
FACE_LOCATOR_CHANNELS = (16, 32, 96, 256)  # infer_audio2vid.py:150
# A portrait larger than the output with a face box off-centre, so the crop's clamping and squaring both act.
PORTRAIT_HW = (150, 128)
FACE_BOX = (30.4, 41.6, 90.2, 112.7)  # x0, y0, x1, y1 in portrait pixels (MTCNN's xyxy)


def randomise_all(models: dict[str, torch.nn.Module]) -> tuple[list, dict]:
    """Every parameter (and whisper's positional table) random from one seed, in `weight_spec` order.

    Returns the spec `[[name, shape], ...]` and the kept buffers (motion-module `pe` tables, as built).
    """
    spec, buffers = [], {}
    for prefix, model in models.items():
        params = dict(model.named_parameters())
        for name, tensor in model.state_dict().items():
            if name in params or name == "positional_embedding":
                spec.append([prefix + name, list(tensor.shape)])
            else:
                buffers[prefix + name] = tensor.clone()
    state = random_state_dict(spec, WEIGHT_SEED)
    for prefix, model in models.items():
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(own, strict=False)
        assert not unexpected and all(prefix + k in buffers for k in missing), (unexpected, missing)
    return spec, buffers


def synthetic_portrait(generator: torch.Generator) -> np.ndarray:
    """A BGR uint8 portrait (as cv2.imread gives) with a bright ellipse where the face box is."""
    h, w = PORTRAIT_HW
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    cx = (FACE_BOX[0] + FACE_BOX[2]) / w - 1
    cy = (FACE_BOX[1] + FACE_BOX[3]) / h - 1
    face = (((xx - cx) / 0.45) ** 2 + ((yy - cy) / 0.5) ** 2 < 1).astype(np.float32)
    image = np.stack([0.3 + 0.5 * face + 0.2 * xx, 0.4 * face - 0.2 * yy + 0.3, 0.7 - 0.5 * face + 0.1 * xx * yy], -1)
    noise = torch.rand((h, w, 3), generator=generator).numpy() * 0.2
    return (np.clip(image + noise, 0, 1) * 255).astype(np.uint8)


def synthetic_audio(generator: torch.Generator) -> np.ndarray:
    t = np.arange(int(AUDIO_SECONDS * 16000)) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    tone += 0.2 * np.sin(2 * np.pi * 1300 * t) * (t > 0.6)
    return (tone + 0.05 * torch.randn(t.shape, generator=generator).numpy()).astype(np.float32)


def load_function(src: Path, relative: str, name: str):
    """A top-level function of EchoMimic's file, executed verbatim without the file's imports (shim 2:
    infer_audio2vid.py imports facenet_pytorch/moviepy, src/utils/util.py imports torchvision, which does not
    import beside torch 2.13)."""
    tree = ast.parse((src / relative).read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace: dict = {"np": np}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(src / relative), "exec"), namespace)
    return namespace[name]


def face_crop_and_mask(src: Path, face_img: np.ndarray, box, probs, crop_and_pad, size: int = SIZE):
    """infer_audio2vid.py:196-223 restated line by line (inline in main(); args at their defaults)."""
    import cv2

    facemusk_dilation_ratio, facecrop_dilation_ratio, W, H = 0.1, 0.5, size, size
    select_bbox = load_function(src, "infer_audio2vid.py", "select_face")(np.array([box]), np.array(probs))
    face_mask = np.zeros((face_img.shape[0], face_img.shape[1])).astype("uint8")
    if select_bbox is None:
        face_mask[:, :] = 255
        return face_img, face_mask, None
    xyxy = select_bbox[:4]
    xyxy = np.round(xyxy).astype("int")
    rb, re, cb, ce = xyxy[1], xyxy[3], xyxy[0], xyxy[2]
    r_pad = int((re - rb) * facemusk_dilation_ratio)
    c_pad = int((ce - cb) * facemusk_dilation_ratio)
    face_mask[rb - r_pad : re + r_pad, cb - c_pad : ce + c_pad] = 255
    r_pad_crop = int((re - rb) * facecrop_dilation_ratio)
    c_pad_crop = int((ce - cb) * facecrop_dilation_ratio)
    crop_rect = [
        max(0, cb - c_pad_crop),
        max(0, rb - r_pad_crop),
        min(ce + c_pad_crop, face_img.shape[1]),
        min(re + r_pad_crop, face_img.shape[0]),
    ]
    face_img, _ = crop_and_pad(face_img, crop_rect)
    face_mask, _ = crop_and_pad(face_mask, crop_rect)
    face_img = cv2.resize(face_img, (W, H))
    face_mask = cv2.resize(face_mask, (W, H))
    return face_img, face_mask, crop_rect


class Recorder:
    """Wraps the denoiser's forward and the scheduler's step: every input and output, in call order."""

    def __init__(self):
        self.calls: list[dict] = []
        self.steps: list[dict] = []

    def wrap_unet(self, unet):
        forward = unet.forward

        def recorded(sample, timestep, encoder_hidden_states=None, audio_cond_fea=None, face_musk_fea=None, **kw):
            out = forward(
                sample,
                timestep,
                encoder_hidden_states,
                audio_cond_fea=audio_cond_fea,
                face_musk_fea=face_musk_fea,
                **kw,
            )
            self.calls.append(
                {
                    "sample": sample.clone(),
                    "timestep": torch.as_tensor(timestep).clone(),
                    "audio": audio_cond_fea.clone(),
                    "pred": out[0].clone(),
                }
            )
            return out

        unet.forward = recorded

    def wrap_scheduler(self, scheduler):
        step = scheduler.step

        def recorded(model_output, timestep, sample, **kw):
            out = step(model_output, timestep, sample, **kw)
            self.steps.append(
                {"model_output": model_output.clone(), "sample": sample.clone(), "prev": out.prev_sample.clone()}
            )
            return out

        scheduler.step = recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echomimic-src", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    src = args.echomimic_src.resolve()
    sys.path.insert(0, str(src))
    torch.set_num_threads(1)

    import src.models.mutual_self_attention as msa
    from diffusers import AutoencoderKL, DDIMScheduler
    from omegaconf import OmegaConf
    from PIL import Image
    from safetensors.torch import save_file
    from src.models.face_locator import FaceLocator
    from src.models.unet_2d_condition import UNet2DConditionModel
    from src.models.unet_3d_echo import EchoUNet3DConditionModel
    from src.models.whisper.audio2feature import Audio2Feature
    from src.models.whisper.whisper.model import ModelDimensions, Whisper
    from src.pipelines.context import get_context_scheduler
    from src.pipelines.pipeline_echo_mimic import Audio2VideoPipeline
    from src.pipelines.pipeline_echo_mimic_acc import Audio2VideoPipeline as AccPipeline

    crop_and_pad = load_function(src, "src/utils/util.py", "crop_and_pad")

    # shim 1: the guidance row mask on the CPU
    hooks = msa.ReferenceAttentionControl.register_reference_hooks
    hooks.__defaults__ = tuple(torch.device("cpu") if isinstance(d, torch.device) else d for d in hooks.__defaults__)

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    infer_config = OmegaConf.load(src / "configs/inference/inference_v2.yaml")

    # ---- networks (infer_audio2vid.py:108-150), in the release's classes, every parameter random
    base = out / "tmp_base" / "unet"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(TINY_UNET_CONFIG))
    save_file(
        UNet2DConditionModel.from_config(TINY_UNET_CONFIG).state_dict(),
        str(base / "diffusion_pytorch_model.safetensors"),
    )
    reference_unet = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
    denoising_unet = EchoUNet3DConditionModel.from_pretrained_2d(
        str(base.parent),
        "",
        subfolder="unet",
        unet_additional_kwargs=OmegaConf.to_container(infer_config.unet_additional_kwargs),
    )
    face_locator = FaceLocator(
        TINY_UNET_CONFIG["block_out_channels"][0], conditioning_channels=1, block_out_channels=FACE_LOCATOR_CHANNELS
    )
    vae = AutoencoderKL.from_config(TINY_VAE_CONFIG)
    whisper = Whisper(ModelDimensions(**TINY_WHISPER_DIMS))
    models = {
        "reference_unet.": reference_unet,
        "denoising_unet.": denoising_unet,
        "face_locator.": face_locator,
        "vae.": vae,
        "whisper.encoder.": whisper.encoder,
    }
    spec, buffers = randomise_all(models)
    for model in (reference_unet, denoising_unet, face_locator, vae, whisper):
        model.eval()
    state = {prefix + k: v for prefix, m in models.items() for k, v in m.state_dict().items()}
    save_file(
        {k: v.contiguous() for k, v in buffers.items() if k.startswith("denoising_unet.")},
        str(out / "buffers.safetensors"),
    )
    (out / "unet_config.json").write_text(json.dumps(TINY_UNET_CONFIG, indent=1))
    (out / "vae_config.json").write_text(json.dumps(TINY_VAE_CONFIG, indent=1))

    # ---- front end: face crop + mask (infer_audio2vid.py:196-223), whisper features (audio2feature.py)
    portrait = synthetic_portrait(gen)
    audio = synthetic_audio(gen)
    face_img, face_mask, crop_rect = face_crop_and_mask(src, portrait, list(FACE_BOX), [0.99], crop_and_pad)
    audio_guider = Audio2Feature.__new__(Audio2Feature)
    audio_guider.whisper_model_type, audio_guider.model = "tiny", whisper
    whisper_feature = audio_guider.audio2feat(audio)  # shim 3: the waveform instead of a path
    whisper_chunks = audio_guider.feature2chunks(feature_array=whisper_feature, fps=FPS)
    # a 40 s track too: features of two 30 s segments (the mel is padded per segment, normalised over the track)
    long_audio = np.concatenate([audio] * 31)[: 40 * 16000]
    long_feature = audio_guider.audio2feat(long_audio)

    tensors = {
        "portrait_bgr": torch.from_numpy(portrait),
        "face_img_bgr": torch.from_numpy(np.ascontiguousarray(face_img)),
        "face_mask": torch.from_numpy(np.ascontiguousarray(face_mask)),
        "audio": torch.from_numpy(audio),
        "whisper_feature": torch.from_numpy(whisper_feature).float(),
        "whisper_chunks": torch.from_numpy(whisper_chunks).float(),
        "long_whisper_feature": torch.from_numpy(long_feature[::97]).float(),  # every 97th step (size)
    }
    metadata = {
        "echomimic_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True
        ).stdout.strip()
        or "a53e970 (snapshot, no .git)",
        "seed": SEED,
        "fps": FPS,
        "size": SIZE,
        "context_frames": CONTEXT_FRAMES,
        "context_overlap": CONTEXT_OVERLAP,
        "face_box": FACE_BOX,
        "crop_rect": [int(v) for v in crop_rect],
        "whisper_dims": TINY_WHISPER_DIMS,
        "face_locator_channels": FACE_LOCATOR_CHANNELS,
        "long_audio_seconds": 40,
        "long_whisper_feature_shape": list(long_feature.shape),
        "long_whisper_stride": 97,
        "frame_stride": FRAME_STRIDE,
        "sched_kwargs": OmegaConf.to_container(infer_config.noise_scheduler_kwargs),
        "runs": {},
        "weight_seed": WEIGHT_SEED,
        "weight_spec": spec,
        "checksums": {prefix: checksum(state, prefix) for prefix in models},
        "unused_buffers": sorted(k for k in buffers if not k.startswith("denoising_unet.")),
    }

    # ---- the pipelines (infer_audio2vid.py:152-244 / infer_audio2vid_acc.py), fp32 on CPU
    ref_image_pil = Image.fromarray(face_img[:, :, [2, 1, 0]])
    face_mask_tensor = torch.Tensor(face_mask).unsqueeze(0).unsqueeze(0).unsqueeze(0) / 255.0
    for run, settings in RUNS.items():
        scheduler = DDIMScheduler(**OmegaConf.to_container(infer_config.noise_scheduler_kwargs))
        cls = AccPipeline if settings["acc"] else Audio2VideoPipeline
        pipe = cls(
            vae=vae,
            reference_unet=reference_unet,
            denoising_unet=denoising_unet,
            audio_guider=audio_guider,
            face_locator=face_locator,
            scheduler=scheduler,
        )
        recorder = Recorder()
        recorder.wrap_unet(denoising_unet)
        recorder.wrap_scheduler(scheduler)
        video = pipe(
            ref_image_pil,
            audio,
            face_mask_tensor,
            SIZE,
            SIZE,
            1200,
            settings["steps"],
            settings["cfg"],
            generator=torch.manual_seed(SEED),
            audio_sample_rate=16000,
            context_frames=CONTEXT_FRAMES,
            fps=FPS,
            context_overlap=CONTEXT_OVERLAP,
        ).videos
        del denoising_unet.forward  # drop the wrapper (instance attribute)
        frames = video.shape[2]
        # the windows of every step: EchoMimic's own context scheduler, shifted as pipeline_echo_mimic.py:491-495
        queue = list(
            get_context_scheduler("uniform")(0, settings["steps"], frames, CONTEXT_FRAMES, 1, CONTEXT_OVERLAP)
        )
        windows = [[[(c + step * 2) % frames for c in ctx] for ctx in queue] for step in range(settings["steps"])]
        # every 8th frame (F/8, 3, H, W) in [0, 1]: the VAE decodes frame by frame; all final latents are kept
        tensors[f"{run}/frames"] = video[0].permute(1, 0, 2, 3)[::FRAME_STRIDE].contiguous()
        tensors[f"{run}/timesteps"] = scheduler.timesteps.clone()
        for i, call in enumerate(recorder.calls):
            step, window = divmod(i, len(queue))
            # the windows restated above are the ones the loop ran (its input = the step's latents there)
            assert torch.equal(call["sample"][:1], recorder.steps[step]["sample"][:, :, windows[step][window]])
            tensors[f"{run}/call{i}/pred"] = call["pred"].contiguous()  # (rows, 4, 12, h, w): [uncond, cond]
        for i, step in enumerate(recorder.steps):
            tensors[f"{run}/step{i}/model_output"] = step["model_output"].contiguous()
            if i == 0:  # later steps' inputs are the previous steps' outputs
                tensors[f"{run}/step{i}/sample"] = step["sample"].contiguous()
            else:
                assert torch.equal(step["sample"], recorder.steps[i - 1]["prev"])
            tensors[f"{run}/step{i}/prev"] = step["prev"].contiguous()
        metadata["runs"][run] = {**settings, "frames": frames, "windows": windows, "calls": len(recorder.calls)}
        print(run, "frames", tuple(video.shape), "calls", len(recorder.calls), flush=True)

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "outputs.safetensors"))
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1))
    import shutil

    shutil.rmtree(out / "tmp_base")
    print("wrote", out)


if __name__ == "__main__":
    main()
