"""Shared pytest fixtures."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest


def pytest_configure(config):
    # torchvision comes with the test extra (pytorch-fid); where its compiled ops cannot load, `import emo_pipeline`'s
    # guard (emo_pipeline/_torchvision.py) keeps it, and transformers, importable: installed before any test imports.
    import emo_pipeline  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------
# emo-preprocess: one small synthetic dataset, shared by tests/test_preprocess.py and tests/test_dataset.py
# ----------------------------------------------------------------------------------------------------------------

#: Settings of the shared synthetic dataset: small frames, 1-2 s clips, the tiny wav2vec2.
PREPROCESS_TEST_OPTIONS = {
    "size": 64,
    "min_seconds": 1.0,
    "max_seconds": 2.0,
    "min_face": 20.0,
}


@pytest.fixture(scope="session")
def preprocess_options() -> dict:
    """`PREPROCESS_TEST_OPTIONS` (a copy), for tests that preprocess more videos like the shared dataset."""
    return dict(PREPROCESS_TEST_OPTIONS)


@pytest.fixture(scope="session")
def tiny_audio_encoder_dir(tmp_path_factory) -> str:
    """The seeded tiny wav2vec2 of `emo_pipeline.testing`, saved as a folder (what --audio-encoder takes)."""
    from emo_pipeline.testing import tiny_wav2vec2

    path = tmp_path_factory.mktemp("tiny_wav2vec2")
    model, extractor = tiny_wav2vec2()
    model.save_pretrained(path)
    extractor.save_pretrained(path)
    return os.fspath(path)


@pytest.fixture(scope="session")
def synthetic_sources(tmp_path_factory):
    """A folder of source videos: `talk.mp4` (160x160, 25 fps, two 3 s shots joined by a hard cut, the head
    rolling at 0.3 then 0.8 rad/s, speech) and four bad ones: `corrupt.mp4` (the first 5% of a good file),
    `silent.mp4` (no audio stream), `noface.mp4` (noise) and `two_faces.mp4` (two heads side by side).
    Returns `(folder, SyntheticVideo of talk.mp4)`."""
    from emo_pipeline.data.synthetic import write_synthetic_video

    folder = tmp_path_factory.mktemp("sources")
    talk = write_synthetic_video(folder / "talk.mp4", shots=((3.0, 0.3), (3.0, 0.8)))
    data = (folder / "talk.mp4").read_bytes()
    (folder / "corrupt.mp4").write_bytes(data[: len(data) // 20])
    write_synthetic_video(folder / "silent.mp4", shots=((1.5, 0.3),), audio=False)
    write_synthetic_video(folder / "noface.mp4", shots=((1.5, 0.0),), faces=0)
    write_synthetic_video(folder / "two_faces.mp4", shots=((1.5, 0.3),), faces=2, size=(256, 128))
    return folder, talk


@pytest.fixture(scope="session")
def preprocessed_dataset(tmp_path_factory, synthetic_sources, tiny_audio_encoder_dir):
    """`synthetic_sources` through `preprocess_videos` with 2 spawn workers: `(dataset folder, summary)`."""
    from emo_pipeline.data.preprocess import preprocess_videos

    output = tmp_path_factory.mktemp("dataset")
    summary = preprocess_videos(
        synthetic_sources[0],
        output,
        audio_encoder=tiny_audio_encoder_dir,
        workers=2,
        progress=False,
        **PREPROCESS_TEST_OPTIONS,
    )
    return output, summary
