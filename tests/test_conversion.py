"""Conversion SD1.5 + wav2vec2 + AnimateDiff -> untrained EMOPipeline: weights, null context, provenance, errors,
the `emo-convert` CLI and `examples/convert_sd15.py`, on tiny models written to disk by the tests (no network)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import logging
import re
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
)
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from emo_pipeline import EMOInputError, EMOPipeline, build_emo_pipeline
from emo_pipeline.cli.convert import main as convert_main
from emo_pipeline.conversion import null_text_context
from emo_pipeline.hub import EMO_METADATA_FILE
from emo_pipeline.testing import (
    SD15_SCHEDULER_CONFIG,
    TINY_EMO_CONFIG,
    TINY_MOTION_ADAPTER_CONFIG,
    TINY_UNET_CONFIG,
    tiny_motion_adapter,
    tiny_unet2d,
    tiny_vae,
    tiny_wav2vec2,
    to_original_animatediff_state_dict,
)

REPO = Path(__file__).resolve().parents[1]

# TINY_EMO_CONFIG less what conversion derives itself (audio sizes from wav2vec2, motion heads from the adapter).
EMO_CONFIG = {
    **{k: v for k, v in TINY_EMO_CONFIG.items() if k != "motion_num_attention_heads"},
    "audio_projection_config": {
        k: v for k, v in TINY_EMO_CONFIG["audio_projection_config"].items() if k not in ("num_layers", "audio_dim")
    },
}
ADAPTER_HEADS = {"motion_num_attention_heads": TINY_MOTION_ADAPTER_CONFIG["motion_num_attention_heads"]}

# ----------------------------------------------------------------------------------- tiny sources on disk

# A byte-level BPE vocabulary just big enough for CLIP's tokenizer: the empty prompt is <bos> <eos> <pad>...
_VOCAB = ["l", "o", "w", "e", "r", "lo", "l</w>", "w</w>", "r</w>", "low</w>", "er</w>", "<unk>"]
_VOCAB += ["<|startoftext|>", "<|endoftext|>"]


def tiny_clip(folder: Path, seed: int = 4) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A tiny CLIP text encoder (width = the tiny UNet's cross_attention_dim) and a CLIPTokenizer from files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(_VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=TINY_UNET_CONFIG["cross_attention_dim"],
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(_VOCAB),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval(), tokenizer


# Inverse of diffusers' LDM -> diffusers conversion (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`),
# after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any block count.
_RESNET_TO_LDM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    per_block = unet.config.layers_per_block + 1  # LDM counts the down/up-sampler as a layer
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    state = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if key in top:
            new = top[key]
        elif parts[0] == "down_blocks" and parts[2] == "downsamplers":
            new = f"input_blocks.{1 + int(parts[1]) * per_block + per_block - 1}.0.op." + ".".join(parts[5:])
        elif parts[0] == "down_blocks":
            index = 1 + int(parts[1]) * per_block + int(parts[3])
            new = f"input_blocks.{index}.{0 if parts[2] == 'resnets' else 1}." + ".".join(parts[4:])
        elif parts[0] == "mid_block":
            new = f"middle_block.{2 * int(parts[2]) if parts[1] == 'resnets' else 1}." + ".".join(parts[3:])
        elif parts[0] == "up_blocks" and parts[2] == "upsamplers":
            position = 2 if hasattr(unet.up_blocks[int(parts[1])], "attentions") else 1
            index = int(parts[1]) * per_block + per_block - 1
            new = f"output_blocks.{index}.{position}.conv." + ".".join(parts[5:])
        elif parts[0] == "up_blocks":
            index = int(parts[1]) * per_block + int(parts[3])
            new = f"output_blocks.{index}.{0 if parts[2] == 'resnets' else 1}." + ".".join(parts[4:])
        else:
            raise KeyError(key)
        if ".resnets." in key:
            for diffusers_name, ldm_name in _RESNET_TO_LDM:
                new = new.replace(f".{diffusers_name}.", f".{ldm_name}.")
        state["model.diffusion_model." + new] = value
    return state


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    last = len(vae.config.block_out_channels) - 1
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attention = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    state = {}
    for key, value in vae.state_dict().items():
        new = top.get(key, key)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{last - int(m[1])}.block.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{last - int(m[1])}.upsample.", new
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for diffusers_name, ldm_name in attention:
                new = new.replace(f".{diffusers_name}.", f".{ldm_name}.")
            value = value[:, :, None, None] if value.ndim == 2 else value  # LDM's are 1x1 convs
        state["first_stage_model." + new.replace(".conv_shortcut.", ".nin_shortcut.")] = value
    return state


def write_single_file(sd: StableDiffusionPipeline, path: Path) -> None:
    """The tiny SD pipeline as an original-layout (LDM) single-file checkpoint, as SD1.5's .safetensors."""
    state = {**unet_to_ldm(sd.unet), **vae_to_ldm(sd.vae)}
    state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in sd.text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sources")
    text_encoder, tokenizer = tiny_clip(root / "clip-files")
    sd = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet2d(),
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(root / "sd15")
    write_single_file(sd, root / "sd15.safetensors")
    audio_encoder, feature_extractor = tiny_wav2vec2()
    audio_encoder.save_pretrained(root / "wav2vec2")
    feature_extractor.save_pretrained(root / "wav2vec2")
    adapter = tiny_motion_adapter()
    adapter.save_pretrained(root / "adapter")
    torch.save(to_original_animatediff_state_dict(adapter), root / "mm_tiny.ckpt")
    return SimpleNamespace(
        root=root,
        sd15=root / "sd15",
        single_file=root / "sd15.safetensors",
        wav2vec2=root / "wav2vec2",
        adapter=root / "adapter",
        adapter_ckpt=root / "mm_tiny.ckpt",
        sd=sd,
        motion_adapter=adapter,
        null_context=null_text_context(text_encoder, tokenizer),
    )


def assert_initialised_from(pipe: EMOPipeline, src: SimpleNamespace, with_adapter: bool) -> None:
    """Spatial weights = the SD UNet's, VAE = SD's, null context = SD's empty prompt, temporal = the adapter's."""
    sd_unet = src.sd.unet.state_dict()
    reference = pipe.reference_net.state_dict()
    shared = [k for k in reference if k in sd_unet]
    assert len(shared) == len(reference) - 1  # all but the null_context buffer
    assert all(torch.equal(reference[k], sd_unet[k]) for k in shared)
    torch.testing.assert_close(pipe.reference_net.null_context, src.null_context, rtol=0, atol=0)
    assert pipe.reference_net.null_context.abs().sum() > 0

    backbone = pipe.unet.state_dict()
    for key in (
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",  # audio cross-attention starts as SD's
        "mid_block.attentions.0.proj_in.weight",
        "up_blocks.1.resnets.2.conv1.weight",
        "conv_out.bias",
    ):
        assert torch.equal(backbone[key], sd_unet[key]), key
    vae = src.sd.vae.state_dict()
    assert all(torch.equal(v, vae[k]) for k, v in pipe.vae.state_dict().items())

    temporal = [k for k in backbone if "motion_modules." in k and ".speed_" not in k and "pos_embed" not in k]
    assert temporal
    if with_adapter:
        adapter = src.motion_adapter.state_dict()
        assert all(torch.equal(backbone[k], adapter[k]) for k in temporal)
    else:  # zero-output temporal layers: the untrained backbone is SD1.5 frame by frame
        assert all(
            backbone[k].abs().sum() == 0 for k in temporal if ".proj_out." in k and "transformer_blocks" not in k
        )


# ----------------------------------------------------------------------------------------------- the API


def test_build_save_load_generate(sources, tmp_path):
    pipe = build_emo_pipeline(sources.sd15, sources.wav2vec2, sources.adapter, emo_config=EMO_CONFIG)
    assert_initialised_from(pipe, sources, with_adapter=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.audio_proj.expected_feature_shape == (5, 2, 32)  # (2m+1, wav2vec2 layers, hidden size)
    assert not hasattr(pipe, "text_encoder") or pipe.text_encoder is None

    out = tmp_path / "emo"
    pipe.save_pretrained(out)
    weights = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    assert {p.parent.name for p in weights} == {"vae", "reference_net", "unet", "audio_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    metadata = json.loads((out / EMO_METADATA_FILE).read_text())
    assert metadata["base_model"] == str(sources.sd15.resolve())
    assert metadata["audio_encoder"] == str(sources.wav2vec2.resolve())
    assert metadata["motion_adapter"] == str(sources.adapter.resolve())
    assert metadata["converted_with"].startswith("emo-pipeline ")
    assert "Untrained" in (out / "README.md").read_text()

    loaded = EMOPipeline.from_pretrained(out)
    assert_initialised_from(loaded, sources, with_adapter=True)
    assert loaded.emo_metadata["base_model"] == metadata["base_model"]
    loaded.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    audio = (rng.standard_normal(4800) * 0.1).astype(np.float32)  # 0.3 s at 16 kHz
    frames = loaded(
        image,
        audio,
        height=64,
        width=64,
        num_inference_steps=2,
        num_frames_per_clip=4,
        num_motion_frames=2,
        face_box=(16, 16, 48, 48),
        watermark=False,
    ).frames
    assert frames.shape == (8, 64, 64, 3) and np.isfinite(frames).all()


def test_single_file_checkpoint_and_original_animatediff_ckpt(sources):
    pipe = build_emo_pipeline(
        sources.single_file,
        sources.wav2vec2,
        sources.adapter_ckpt,
        sd15_config=sources.sd15,
        emo_config=EMO_CONFIG,
        motion_adapter_config=ADAPTER_HEADS,
        scheduler="dpm++",
    )
    assert_initialised_from(pipe, sources, with_adapter=True)
    assert pipe.unet.config.motion_num_attention_heads == ADAPTER_HEADS["motion_num_attention_heads"]
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.emo_metadata["base_model"] == str(sources.single_file.resolve())


def test_single_file_offline_needs_sd15_config(sources):
    # Offline, diffusers can only use SD configs already in the cache (none here; the real SD1.5's would not fit
    # the tiny weights): the error says what to pass.
    with pytest.raises(EMOInputError, match="sd15_config"):
        build_emo_pipeline(sources.single_file, sources.wav2vec2, emo_config=EMO_CONFIG)


def test_without_text_encoder_the_null_context_stays_zero(sources, tmp_path, caplog):
    sd15 = tmp_path / "sd15-no-text"
    for part in ("unet", "vae", "scheduler"):
        shutil.copytree(sources.sd15 / part, sd15 / part)
    with caplog.at_level(logging.WARNING, logger="emo_pipeline.conversion"):
        pipe = build_emo_pipeline(
            sd15, sources.wav2vec2, emo_config={**EMO_CONFIG, **ADAPTER_HEADS}, scheduler="euler"
        )
    assert "null context stays zeros" in caplog.text
    assert pipe.reference_net.null_context.abs().sum() == 0
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    temporal_out = [m.proj_out.weight for m in pipe.unet.temporal_layers.values()]
    assert temporal_out and all(w.abs().sum() == 0 for w in temporal_out)
    assert pipe.emo_metadata["motion_adapter"] is None


def test_torch_dtype(sources):
    pipe = build_emo_pipeline(
        sources.sd15, sources.wav2vec2, torch_dtype=torch.float16, emo_config={**EMO_CONFIG, **ADAPTER_HEADS}
    )
    for model in (pipe.vae, pipe.reference_net, pipe.unet, pipe.audio_encoder):
        assert model.dtype == torch.float16
    assert pipe.reference_net.null_context.dtype == torch.float16
    torch.testing.assert_close(pipe.reference_net.null_context, sources.null_context.half())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_sd15", "sd15: .*nope does not exist"),
        ("not_sd", "sd15: .*wav2vec2 is not a diffusers Stable Diffusion folder"),
        ("not_wav2vec2", "wav2vec2: .*unet holds a None model"),
        ("wav2vec2_without_config", "wav2vec2: .*sd15 is not a transformers model folder"),
        ("missing_adapter", "motion_adapter: .*missing-adapter does not exist"),
        ("adapter_mismatch", "motion_adapter .*narrow-adapter.* does not fit"),
        ("bad_scheduler", "scheduler: unknown name 'pndm'"),
        ("audio_dims", "audio_dim=768 contradicts the wav2vec2 model"),
        ("heads_vs_adapter", "motion_num_attention_heads=4 \\(adapter: 2\\)"),
    ],
)
def test_bad_inputs_name_the_input(sources, tmp_path, case, message):
    kwargs = {"sd15": sources.sd15, "wav2vec2": sources.wav2vec2, "emo_config": EMO_CONFIG}
    if case == "missing_sd15":
        kwargs["sd15"] = tmp_path / "nope"
    elif case == "not_sd":
        kwargs["sd15"] = sources.wav2vec2
    elif case == "not_wav2vec2":
        kwargs["wav2vec2"] = sources.sd15 / "unet"
    elif case == "wav2vec2_without_config":
        kwargs["wav2vec2"] = sources.sd15
    elif case == "missing_adapter":
        kwargs["motion_adapter"] = str(tmp_path / "missing-adapter")
    elif case == "adapter_mismatch":
        narrow = {**TINY_MOTION_ADAPTER_CONFIG, "block_out_channels": (16, 32)}
        MotionAdapter(**narrow).save_pretrained(tmp_path / "narrow-adapter")
        kwargs["motion_adapter"] = tmp_path / "narrow-adapter"
    elif case == "bad_scheduler":
        kwargs["scheduler"] = "pndm"
    elif case == "audio_dims":
        kwargs["emo_config"] = {"audio_projection_config": {"audio_dim": 768}}
    elif case == "heads_vs_adapter":
        kwargs["motion_adapter"] = sources.adapter
        kwargs["emo_config"] = {**EMO_CONFIG, "motion_num_attention_heads": 4}
    with pytest.raises(EMOInputError, match=message):
        build_emo_pipeline(**kwargs)


# ----------------------------------------------------------------------------------------------- CLI, example


def test_cli_writes_the_folder_atomically(sources, tmp_path, capsys, monkeypatch):
    out = tmp_path / "converted"
    uploads = []

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(
        huggingface_hub,
        "upload_folder",
        lambda repo_id, folder_path, **kw: (
            uploads.append((repo_id, sorted(os.listdir(folder_path))))
            or SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")
        ),
    )
    argv = ["--sd15", str(sources.sd15), "--wav2vec2", str(sources.wav2vec2), "--output", str(out)]
    argv += ["--motion-adapter", str(sources.adapter), "--dtype", "fp16", "--scheduler", "euler"]
    assert convert_main([*argv, "--push-to-hub", "someone/emo-untrained"]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "untrained" in stdout and "someone/emo-untrained/commit" in stdout
    assert (
        json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "EulerDiscreteScheduler"
    )
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as weights:
        assert weights.get_tensor("conv_in.weight").dtype == torch.float16
    assert uploads == [("someone/emo-untrained", sorted(os.listdir(out)))]
    assert 'from_pretrained("someone/emo-untrained")' in (out / "README.md").read_text()
    assert not list(tmp_path.glob("converted.*"))  # no partial/old folders left

    # An existing non-empty folder is refused unless --overwrite.
    capsys.readouterr()
    assert convert_main(argv) == 2
    assert f"--output {out}" in capsys.readouterr().err
    assert convert_main([*argv, "--overwrite"]) == 0
    assert (out / "model_index.json").is_file() and not list(tmp_path.glob("converted.*"))


def test_cli_bad_input_exits_2_and_leaves_nothing(sources, tmp_path, capsys):
    missing = tmp_path / "no-such-sd15"
    out = tmp_path / "out"
    code = convert_main(["--sd15", str(missing), "--wav2vec2", str(sources.wav2vec2), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("emo-convert: error: ") and str(missing) in err
    assert not out.exists() and not list(tmp_path.glob("out.*"))
    assert convert_main(["--sd15", str(sources.sd15)]) == 2  # argparse usage error: missing --wav2vec2/--output


def test_example_script_converts_local_models(sources, tmp_path, monkeypatch, capsys):
    out = tmp_path / "example-out"
    argv = ["--sd15", str(sources.sd15), "--wav2vec2", str(sources.wav2vec2), "--motion-adapter"]
    argv += [str(sources.adapter), "--output", str(out)]
    monkeypatch.setattr(sys, "argv", [str(REPO / "examples" / "convert_sd15.py"), *argv])
    runpy.run_path(str(REPO / "examples" / "convert_sd15.py"), run_name="__main__")
    assert "saved an untrained EMO pipeline" in capsys.readouterr().out
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    metadata = json.loads((out / EMO_METADATA_FILE).read_text())
    assert metadata["motion_adapter"] == str(sources.adapter.resolve())
