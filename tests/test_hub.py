"""Model card (README.md with Hub metadata, parsed back by huggingface_hub) and Hub upload, with no network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from emo_pipeline import EMOPipeline
from emo_pipeline.hub import (
    DEFAULT_LICENSE,
    EMO_METADATA_FILE,
    PIPELINE_TAG,
    TAGS,
    build_model_card,
    push_pipeline_to_hub,
    read_metadata,
    write_model_card,
)
from emo_pipeline.testing import tiny_emo_pipeline

HUB_METADATA = {
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "audio_encoder": "facebook/wav2vec2-base-960h",
    "motion_adapter": "guoyww/animatediff-motion-adapter-v1-5-2",
    "converted_with": "emo-pipeline 0.1.0",
}
TRAINING = {
    "stages": [
        {"stage": 1, "steps": 30000, "dataset": "talking-heads-v1", "trained_groups": ["reference_net", "spatial"]},
        {"stage": 2, "steps": 10000, "dataset": "talking-heads-v1", "trained_groups": ["temporal", "audio"]},
        {"stage": 3, "steps": 5000, "dataset": "talking-heads-v1", "trained_groups": ["speed"], "lr": 1e-5},
    ],
    "dataset": {"name": "talking-heads-v1", "hours": 250, "consent": "collected with the speakers' consent"},
}
SECTIONS = [
    "## Method",
    "## Usage",
    "## Training data and stages",
    "## Limitations",
    "## Misuse, consent and disclosure",
    "## License",
    "## Citation",
]


def python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_card_metadata_and_sections_parse_back(tmp_path):
    write_model_card(tmp_path, HUB_METADATA, repo_id="someone/emo-untrained")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == PIPELINE_TAG == "image-to-video"
    assert card.data.tags == TAGS
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == DEFAULT_LICENSE
    for section in SECTIONS:
        assert section in card.text, section
    assert "arxiv.org/abs/2402.17485" in card.text and "@article{tian2024emo" in card.text
    assert "Untrained: converted from [stable-diffusion-v1-5/stable-diffusion-v1-5]" in card.text
    assert "facebook/wav2vec2-base-960h" in card.text and "guoyww/animatediff-motion-adapter-v1-5-2" in card.text
    for words in ("consent", "watermark", "AI-generated", "impersonate", "fraud", "disclose"):
        assert words in card.text, words
    assert "emo-animate --image portrait.png --audio speech.wav --output out.mp4 --model someone/emo-untrained" in (
        card.text
    )
    code = python_block(card.text)
    assert 'EMOPipeline.from_pretrained("someone/emo-untrained")' in code
    compile(code, "usage", "exec")


def test_local_base_model_is_not_hub_metadata_and_license_override():
    metadata = {**HUB_METADATA, "base_model": "/data/models/sd15", "license": "other"}
    card = build_model_card(metadata)
    assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
    assert card.data.license == "other"
    assert "/data/models" not in card.text and "a local copy (`sd15`)" in card.text


def test_training_metadata_is_rendered(tmp_path):
    card = build_model_card({**HUB_METADATA, "training": TRAINING}, repo_id="someone/emo")
    text = card.text
    assert "Untrained" not in text
    assert "| 1 | 30000 | talking-heads-v1 | reference_net, spatial |" in text
    assert "| 2 | 10000 | talking-heads-v1 | temporal, audio |" in text
    assert "| 3 | 5000 | talking-heads-v1 | speed | lr: 1e-05 |" in text
    assert "- hours: 250" in text and "- consent: collected with the speakers' consent" in text
    card.save(tmp_path / "README.md")
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "diffusers"


def test_write_model_card_reads_the_folder_metadata(tmp_path):
    (tmp_path / EMO_METADATA_FILE).write_text(json.dumps({**HUB_METADATA, "training": TRAINING}))
    path = write_model_card(tmp_path)
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == HUB_METADATA["base_model"] and "| 3 | 5000 |" in card.text
    # portable: the card names the folder, not this machine's path to it (the folder may be moved or uploaded)
    assert f'from_pretrained("path/to/{tmp_path.name}")' in card.text and str(tmp_path.parent) not in card.text


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    pipe = tiny_emo_pipeline()
    pipe.emo_metadata = dict(HUB_METADATA)
    folder = tmp_path_factory.mktemp("saved") / "emo"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_usage_code_in_a_saved_folder_runs(saved_pipeline, monkeypatch, tmp_path):
    _, folder = saved_pipeline
    card = ModelCard.load(folder / "README.md")
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "to").symlink_to(folder.parent)  # the card loads "path/to/<folder name>"
    monkeypatch.chdir(tmp_path)
    assert card.data.base_model == HUB_METADATA["base_model"]
    calls = []
    monkeypatch.setattr(EMOPipeline, "write_video", lambda self, *args, **kw: calls.append((self, args)))
    exec(python_block(card.text), {})  # noqa: S102 - the card's own example, on the tiny saved pipeline
    ((pipe, args),) = calls
    assert isinstance(pipe, EMOPipeline) and args == ("out.mp4", "portrait.png", "speech.wav")


def test_push_pipeline_to_hub_without_network(saved_pipeline, monkeypatch):
    pipe, _ = saved_pipeline
    seen = {}

    def create_repo(repo_id, *, private=None, token=None, exist_ok=False, **kwargs):
        seen["create"] = {"repo_id": repo_id, "private": private, "token": token, "exist_ok": exist_ok}
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(*, repo_id, folder_path, token=None, commit_message=None, **kwargs):
        folder = Path(folder_path)
        seen["upload"] = {
            "repo_id": repo_id,
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "readme": (folder / "README.md").read_text(),
            "metadata": json.loads((folder / EMO_METADATA_FILE).read_text()),
            "commit_message": commit_message,
        }
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    url = push_pipeline_to_hub(pipe, "someone/emo-tiny", private=True, token="hf_test", commit_message="tiny")
    assert url == "https://huggingface.co/someone/emo-tiny/commit/0123abc"
    assert seen["create"] == {"repo_id": "someone/emo-tiny", "private": True, "token": "hf_test", "exist_ok": True}
    upload = seen["upload"]
    assert upload["repo_id"] == "someone/emo-tiny" and upload["commit_message"] == "tiny"
    weights = [f for f in upload["files"] if f.endswith((".safetensors", ".bin", ".ckpt", ".pt"))]
    assert len(weights) == 4 and all(f.endswith(".safetensors") for f in weights)
    assert "README.md" in upload["files"] and "model_index.json" in upload["files"]
    assert upload["metadata"]["base_model"] == HUB_METADATA["base_model"]
    assert 'EMOPipeline.from_pretrained("someone/emo-tiny")' in upload["readme"]
    assert "library_name: diffusers" in upload["readme"]


# --- reading emo_metadata.json: only a missing file means "no metadata" ----------------------------------------


def hub_response(status: int):
    import httpx2  # huggingface_hub's HTTP client

    url = f"https://huggingface.co/someone/emo/resolve/main/{EMO_METADATA_FILE}"
    return httpx2.Response(status, request=httpx2.Request("HEAD", url))


def raising(error: Exception):
    def hf_hub_download(*args, **kwargs):
        raise error

    return hf_hub_download


def connection_lost() -> Exception:
    """What hf_hub_download raises when the Hub cannot be reached and the cache has no copy."""
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise httpx2.ConnectError("[Errno -2] Name or service not known")
        except httpx2.ConnectError as cause:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from cause
    except LocalEntryNotFoundError as error:
        return error


def test_read_metadata_from_a_hub_repo_passes_the_loader_options(tmp_path, monkeypatch):
    (tmp_path / EMO_METADATA_FILE).write_text(json.dumps(HUB_METADATA))
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / EMO_METADATA_FILE)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert read_metadata("someone/emo", revision="v1", token="hf_x", cache_dir="/c") == HUB_METADATA
    assert calls == [
        (
            "someone/emo",
            EMO_METADATA_FILE,
            {"revision": "v1", "cache_dir": "/c", "token": "hf_x", "local_files_only": False},
        )
    ]


def test_read_metadata_missing_file_or_offline_without_cache_is_empty(tmp_path, monkeypatch):
    from huggingface_hub.errors import RemoteEntryNotFoundError

    assert read_metadata(tmp_path) == {}  # a folder without the file
    # Offline (HF_HUB_OFFLINE=1 in these tests) with an empty cache: the real hf_hub_download, no network.
    assert read_metadata("someone/emo", cache_dir=tmp_path / "cache") == {}
    assert read_metadata("someone/emo", cache_dir=tmp_path / "cache", local_files_only=True) == {}
    # Online, the repo exists but has no such file.
    missing = RemoteEntryNotFoundError("404 Client Error: Entry Not Found", response=hub_response(404))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(missing))
    assert read_metadata("someone/emo") == {}


@pytest.mark.parametrize("kind", ["unauthorized", "gated", "network", "disk"])
def test_read_metadata_auth_and_network_errors_are_raised_with_the_file_named(monkeypatch, kind):
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    error = {
        "unauthorized": HfHubHTTPError("401 Client Error: Unauthorized", response=hub_response(401)),
        "gated": GatedRepoError("403 Client Error: access to someone/emo is restricted", response=hub_response(403)),
        "network": connection_lost(),
        "disk": OSError(28, "No space left on device"),
    }[kind]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(error))
    with pytest.raises(type(error)) as raised:
        read_metadata("someone/emo")
    assert raised.value is error
    if sys.version_info >= (3, 11):  # exception notes
        assert f"could not read {EMO_METADATA_FILE} of 'someone/emo'" in "\n".join(raised.value.__notes__)


def test_from_pretrained_raises_a_metadata_auth_error_instead_of_dropping_provenance(saved_pipeline, monkeypatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HfHubHTTPError

    pipe, _ = saved_pipeline
    loaded = []
    # The weights "load" (diffusers' loader is not what is tested here); then the metadata request is refused.
    monkeypatch.setattr(
        DiffusionPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(k) or pipe)
    )
    denied = HfHubHTTPError("401 Client Error: Unauthorized", response=hub_response(401))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(denied))
    with pytest.raises(HfHubHTTPError, match="401"):
        EMOPipeline.from_pretrained("someone/emo", token="hf_bad", revision="v1")
    assert loaded == [{"token": "hf_bad", "revision": "v1"}]
