"""Hugging Face Hub integration: the model card (README.md) of a saved EMOPipeline folder and uploading it.

The card carries Hub metadata (`library_name: diffusers`, pipeline tag, tags, base model, licence) and sections for
the method (EMO, arXiv 2402.17485), usage, training data and stages (from the training metadata in
`emo_metadata.json` when present), limitations, misuse and consent, and citation. Nothing here touches the network
except `push_pipeline_to_hub` / `push_folder_to_hub` and `read_metadata` given a Hub repo id.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError

__all__ = [
    "DEFAULT_LICENSE",
    "EMO_METADATA_FILE",
    "PIPELINE_TAG",
    "TAGS",
    "build_model_card",
    "push_folder_to_hub",
    "push_pipeline_to_hub",
    "read_metadata",
    "write_model_card",
]

EMO_METADATA_FILE = "emo_metadata.json"

# The Hub task for "one image (+ audio) in, a video out".
PIPELINE_TAG = "image-to-video"
TAGS = ["emo", "talking-head", "audio-driven", "portrait-animation", "diffusers", "emo-pipeline"]
# Stable Diffusion 1.5's licence, which weights derived from it inherit (the Hub's id for CreativeML OpenRAIL-M).
DEFAULT_LICENSE = "creativeml-openrail-m"

PAPER_URL = "https://arxiv.org/abs/2402.17485"
CITATION = """@article{tian2024emo,
  title   = {EMO: Emote Portrait Alive - Generating Expressive Portrait Videos with Audio2Video Diffusion Model
             under Weak Conditions},
  author  = {Tian, Linrui and Wang, Qi and Zhang, Bang and Bo, Liefeng},
  journal = {arXiv preprint arXiv:2402.17485},
  year    = {2024}
}"""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_metadata(
    folder_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> dict:
    """The `emo_metadata.json` of a saved pipeline (a local folder, else a Hub repo id), or `{}` when it has none.

    "Has none" means only: the folder or the repo lacks the file, or the Hub may not be asked (`HF_HUB_OFFLINE=1` or
    `local_files_only=True`) and the cache holds no copy. Any other failure (authentication, a gated or missing
    repo, a missing revision, the network) propagates with a note naming the file and the repo: provenance is not
    silently dropped because a request failed.
    """
    folder = Path(folder_or_repo_id)
    if folder.is_dir():
        path = folder / EMO_METADATA_FILE
        return json.loads(path.read_text()) if path.is_file() else {}
    repo_id = str(folder_or_repo_id)
    try:
        file = huggingface_hub.hf_hub_download(
            repo_id,
            EMO_METADATA_FILE,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    except RemoteEntryNotFoundError:  # the repo has no metadata file
        return {}
    except LocalEntryNotFoundError as error:
        # Also raised when a request failed for lack of a network (cause: a connection error): not "no file".
        if local_files_only or isinstance(error.__cause__, OfflineModeIsEnabled):
            return {}
        _note_metadata_error(error, repo_id)
        raise
    except Exception as error:
        _note_metadata_error(error, repo_id)
        raise
    return json.loads(Path(file).read_text())


def _note_metadata_error(error: Exception, repo_id: str) -> None:
    """Say which file of which repo failed, keeping the Hub's error type (callers may catch `HfHubHTTPError`)."""
    if hasattr(error, "add_note"):  # Python >= 3.11; on 3.10 the error propagates as it is
        error.add_note(f"emo-pipeline: could not read {EMO_METADATA_FILE} of {repo_id!r} from the Hub")


def _hub_id(value: Any) -> str | None:
    """`value` if it reads as a Hub repo id (`owner/name`), None for a local path or anything else.

    Conversion records local sources as absolute paths, so `owner/name` is unambiguous here.
    """
    if not isinstance(value, str) or not _HUB_ID.match(value) or value.startswith("."):
        return None
    return value


def _source(value: Any) -> str:
    """How a source appears in the card text: a Hub link, or the last path component of a local source."""
    if not value:
        return "none"
    if hub_id := _hub_id(value):
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    return f"a local copy (`{Path(str(value)).name}`)"


HALLO_LICENSE_NOTE = (
    "The weights are converted from {family}'s release ({source}). {family}'s code is MIT-licensed; the weights' "
    "terms of use are the upstream project's (read its README and licence before any use, commercial use in "
    "particular). They build on Stable Diffusion 1.5 (CreativeML OpenRAIL-M, with its use restrictions) and "
    "wav2vec2; the insightface face-analysis models {family} uses for the identity embedding are released for non-"
    "commercial research only, and Hallo2's CodeFormer super-resolution (not part of this pipeline) is under a non-"
    "commercial licence. emo-pipeline's own code is Apache-2.0. Not in this folder (nothing of the converting "
    "machine is stored): the insightface models (InsightFace, non-commercial research only) are given when "
    "generating with `face_analysis_dir=` / `--face-analysis-dir` (or the embedding with `face_embedding=`), and "
    "vocal separation is opt-in with `vocal_separation=` / `--vocal-separation MODEL` (an audio-separator model)."
)


def _is_hallo(metadata: dict) -> bool:
    return metadata.get("family") in ("hallo", "hallo2")


def _training_section(metadata: dict) -> str:
    if _is_hallo(metadata):
        family = "Hallo2" if metadata["family"] == "hallo2" else "Hallo"
        return (
            "## Training data and stages\n\n"
            f"Trained by {family}'s authors ({metadata.get('source')}) on their talking-head data; converted "
            f"unchanged with `{metadata.get('converted_with', 'emo-convert --hallo')}` (every tensor of net.pth "
            "placed, outputs equal to their code's: tests/test_hallo_parity.py)."
        )
    training = metadata.get("training")
    lines = ["## Training data and stages", ""]
    if not training:
        base = _source(metadata.get("base_model"))
        lines += [
            f"**Untrained: converted from {base}** with `emo-convert` (emo-pipeline's `build_emo_pipeline`). The "
            "ReferenceNet and the backbone's spatial layers hold Stable Diffusion 1.5 weights, the temporal layers "
            f"AnimateDiff weights ({_source(metadata.get('motion_adapter'))}) or a zero-output initialisation, the "
            f"audio encoder is wav2vec2 ({_source(metadata.get('audio_encoder'))}); the audio projection, face "
            "locator and speed layers are newly initialised. These weights do not animate portraits yet: they are "
            "the starting point of the three EMO training stages (`training/train.py`, `configs/train/`).",
        ]
        return "\n".join(lines)
    stages = training.get("stages") or []
    if stages:
        lines += [
            "| Stage | Steps | Dataset | Trained parameter groups | Other |",
            "|---|---|---|---|---|",
        ]
        for stage in stages:
            known = ("stage", "steps", "dataset", "trained_groups")
            groups = stage.get("trained_groups") or []
            other = "; ".join(f"{k}: {_cell(v)}" for k, v in stage.items() if k not in known)
            lines.append(
                f"| {_cell(stage.get('stage', '?'))} | {_cell(stage.get('steps', '?'))} | "
                f"{_cell(stage.get('dataset', ''))} | {_cell(', '.join(map(str, groups)))} | {other} |"
            )
        lines.append("")
    dataset = training.get("dataset")
    if dataset:
        lines += ["**Dataset**", ""]
        if isinstance(dataset, dict):
            lines += [f"- {key}: {_cell(value)}" for key, value in dataset.items()]
        else:
            lines.append(f"- {_cell(dataset)}")
        lines.append("")
    rest = {k: v for k, v in training.items() if k not in ("stages", "dataset")}
    if rest:
        lines += ["**Other training settings**", ""] + [f"- {k}: {_cell(v)}" for k, v in rest.items()] + [""]
    lines.append(
        "Stages follow the EMO paper: 1 images (ReferenceNet, backbone spatial layers, face locator), 2 video "
        "(temporal and audio layers), 3 speed layers."
    )
    return "\n".join(lines).rstrip()


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def build_model_card(metadata: dict | None = None, repo_id: str | None = None) -> ModelCard:
    """A `huggingface_hub.ModelCard` for an EMOPipeline folder.

    `metadata` is the pipeline's `emo_metadata` (`base_model`, `audio_encoder`, `motion_adapter`, `converted_with`,
    optional `license` and `training` = {"stages": [{"stage", "steps", "dataset", "trained_groups"}, ...],
    "dataset": {...}}). `repo_id` (or a local path) is what the usage example loads.
    """
    metadata = dict(metadata or {})
    license_id = metadata.get("license") or DEFAULT_LICENSE
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        license=license_id,
        base_model=_hub_id(metadata.get("base_model")),
    )
    if _is_hallo(metadata):
        family = "Hallo2" if metadata["family"] == "hallo2" else "Hallo"
        licence_text = HALLO_LICENSE_NOTE.format(family=family, source=metadata.get("source"))
    else:
        licence_text = (
            "The weights inherit the licence of the base model (Stable Diffusion 1.5: CreativeML OpenRAIL-M, with its "
            "use restrictions) and of the audio encoder and motion module they were built from."
        )
    name = repo_id or "path/to/emo-pipeline"
    title = repo_id.split("/")[-1] if repo_id else "EMO pipeline"
    provenance = "\n".join(
        f"- {label}: {_source(metadata.get(key))}"
        for key, label in (
            ("base_model", "Base model (ReferenceNet, backbone, VAE)"),
            ("audio_encoder", "Audio encoder"),
            ("motion_adapter", "Motion module (temporal layers)"),
        )
    )
    if metadata.get("converted_with"):
        provenance += f"\n- Converted with: {metadata['converted_with']}"
    if _is_hallo(metadata):
        provenance = (
            f"- Weights: {metadata['family']}'s released `net.pth` ({metadata.get('source')}): ReferenceNet, backbone "
            "(audio modules, identity cross-attention, motion modules), face locator, audio and identity projections\n"
            + provenance
        )
    body = f"""
# {title}

An audio-driven portrait video model: one portrait image and one speech or singing track in, a talking-head video
out. It implements **EMO: Emote Portrait Alive** ([Tian et al. 2024, arXiv 2402.17485]({PAPER_URL})) as a
[diffusers](https://github.com/huggingface/diffusers) pipeline with
[emo-pipeline](https://github.com/emo-pipeline/emo-pipeline).

## Method

Stable Diffusion 1.5 weights initialise a **ReferenceNet**, which encodes the portrait (and the last frames of the
previous clip, the motion frames), and the **backbone** denoiser, whose self-attention also attends to the
ReferenceNet's features. wav2vec2 features of the audio drive the backbone through audio cross-attention;
AnimateDiff-style temporal layers keep the frames coherent; a face locator and head-speed layers give weak control
over where the face is and how fast the head moves. Video is generated clip by clip in the latent space of the SD
VAE, each clip continuing the previous one.

{provenance}

## Usage

```python
from emo_pipeline import EMOPipeline

pipe = EMOPipeline.from_pretrained("{name}")
pipe.write_video("out.mp4", "portrait.png", "speech.wav")
```

or from the command line:

```bash
emo-animate --image portrait.png --audio speech.wav --output out.mp4 --model {name}
```

The video is 512x512 at 25 fps by default and as long as the audio; a GPU is strongly recommended.

{_training_section(metadata)}

## Limitations

- Quality depends on training; untrained (converted from SD1.5) weights produce noise, not faces.
- One frontal-ish face per portrait; profiles, occlusions, several faces and non-human faces are out of scope.
- The head and expressions follow the audio, but identity can drift over long videos, and hands, teeth and
  accessories are often wrong. Speech in languages or voices far from the training data transfers less well.
- Generation is slow (a diffusion model run per 12-frame clip, 40 denoising steps by default).
- Biases of Stable Diffusion 1.5, wav2vec2 and the training videos carry over.

## Misuse, consent and disclosure

This model makes a real person appear to say or sing something they did not. Use it only with the **consent of
the person in the portrait** (and of the speaker, if the voice is someone else's), and **disclose** that the video
is AI-generated wherever you publish it. Do not use it to impersonate anyone, to deceive, for fraud or
harassment, for non-consensual intimate content, or for political disinformation.

emo-pipeline marks its output by default: every frame carries an **invisible watermark** (check a file with
`emo-watermark detect video.mp4`) and the mp4 carries an **AI-generated metadata tag**. Do not remove them.

## License

{licence_text} Card licence: `{license_id}`.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_model_card(folder: str | os.PathLike, metadata: dict | None = None, repo_id: str | None = None) -> Path:
    """Write `folder/README.md`; metadata defaults to the folder's `emo_metadata.json`. Returns the README path.

    Without `repo_id` the usage example loads `path/to/<folder name>`: a card names no path of the machine that
    wrote it (the folder may be moved or uploaded), nor the `.partial-<pid>` name of a folder still being written.
    """
    folder = Path(folder)
    if not folder.is_dir():
        from emo_pipeline.errors import EMOInputError

        raise EMOInputError(f"model card: {folder} is not a folder")
    if metadata is None:
        metadata = read_metadata(folder)
    name = re.sub(r"\.partial-\d+$", "", folder.name)
    card = build_model_card(metadata, repo_id=repo_id or f"path/to/{name}")
    path = folder / "README.md"
    card.save(path)
    return path


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a saved EMOPipeline folder (its model card rewritten to load `repo_id`); returns the commit url."""
    repo = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True)
    repo_id = getattr(repo, "repo_id", None) or repo_id  # with the namespace the Hub resolved
    write_model_card(folder, repo_id=repo_id)
    commit = huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message or "Upload EMOPipeline",
    )
    return str(getattr(commit, "commit_url", commit))


def push_pipeline_to_hub(
    pipeline: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    **save_kwargs: Any,
) -> str:
    """Save `pipeline` (safetensors, `emo_metadata.json`, model card) to a temporary folder and upload it to
    `repo_id` (created if needed). Returns the commit url. `save_kwargs` go to `pipeline.save_pretrained`."""
    with tempfile.TemporaryDirectory(prefix="emo-push-") as tmp:
        pipeline.save_pretrained(tmp, **save_kwargs)
        metadata_file = Path(tmp) / EMO_METADATA_FILE
        if not metadata_file.is_file() and getattr(pipeline, "emo_metadata", None):
            metadata_file.write_text(json.dumps(pipeline.emo_metadata, indent=2, sort_keys=True) + "\n")
        return push_folder_to_hub(tmp, repo_id, private=private, token=token, commit_message=commit_message)
