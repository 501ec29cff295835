"""C2PA content credentials: signed on write when a certificate is configured, read and validated back with
c2pa-python, invalid after tampering, and `emo-watermark verify` reporting both provenance signals."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import logging
import wave

import numpy as np
import pytest

pytest.importorskip("c2pa", reason="pip install -e '.[test]' installs c2pa-python")

from c2pa_certs import make_test_pki  # noqa: E402

from emo_pipeline import provenance  # noqa: E402
from emo_pipeline.cli import animate  # noqa: E402
from emo_pipeline.cli.watermark import main as watermark_main  # noqa: E402
from emo_pipeline.errors import EMOInputError  # noqa: E402
from emo_pipeline.media import VideoWriter  # noqa: E402
from emo_pipeline.provenance import (  # noqa: E402
    TRAINED_ALGORITHMIC_MEDIA,
    load_c2pa_signer,
    read_content_credentials,
    resolve_c2pa_signer,
)
from emo_pipeline.testing import demo_assets  # noqa: E402
from emo_pipeline.watermark import embed_watermark  # noqa: E402

PORTRAIT, SPEECH = demo_assets()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def signer(pki):
    return load_c2pa_signer(pki.cert, pki.key)


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "short.wav"
    with wave.open(str(SPEECH)) as source, wave.open(str(path), "wb") as target:
        target.setparams(source.getparams())
        target.writeframes(source.readframes(int(source.getframerate() * 0.4)))
    return path


@pytest.fixture(scope="module")
def signed_cli_video(pki, short_speech, tmp_path_factory):
    """emo-animate with the tiny demo model and --c2pa-cert/--c2pa-key: a signed, watermarked mp4."""
    out = tmp_path_factory.mktemp("cli") / "signed.mp4"
    args = ["--image", str(PORTRAIT), "--audio", str(short_speech), "--output", str(out), "--no-progress"]
    assert animate.main([*args, "--c2pa-cert", str(pki.cert), "--c2pa-key", str(pki.key)]) == 0
    return out


def frames(count=10, size=64):
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, size=(1, size, size, 3), dtype=np.uint8)
    return np.repeat(base, count, axis=0)


def tamper_one_frame(path, out):
    """Flip bytes inside one coded video frame (the mdat payload), as an editor changing a frame in place would."""
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat") + 4
    for offset in range(200, 216):
        data[start + offset] ^= 0x5A
    out.write_bytes(bytes(data))
    return out


def test_the_cli_signs_a_manifest_that_validates_and_claims_what_was_made(signed_cli_video, pki, short_speech):
    credentials = read_content_credentials(signed_cli_video)
    assert credentials.state == "valid" and not credentials.failures
    assert credentials.signer.startswith("EMO Test Signer")
    (action,) = credentials.claims["actions"]
    assert action["action"] == "c2pa.created" and action["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert action["softwareAgent"]["name"] == "emo-pipeline" and action["softwareAgent"]["version"]
    assert action["parameters"]["model"] == {"family": "emo", "source": "unknown", "license": "creativeml-openrail-m"}
    inputs = credentials.claims["inputs"]
    assert inputs["portrait"]["sha256"] == hashlib.sha256(PORTRAIT.read_bytes()).hexdigest()
    assert inputs["audio"]["sha256"] == hashlib.sha256(short_speech.read_bytes()).hexdigest()
    # The inputs are referenced, never embedded: no thumbnail of the portrait in the file.
    assert b"c2pa.thumbnail" not in signed_cli_video.read_bytes()
    assert read_content_credentials(signed_cli_video, trust_anchors=pki.root).state == "trusted"
    assert not list(signed_cli_video.parent.glob(".*"))  # no temporary file left beside it


def test_one_changed_frame_fails_validation(signed_cli_video, tmp_path, capsys):
    tampered = tamper_one_frame(signed_cli_video, tmp_path / "tampered.mp4")
    credentials = read_content_credentials(tampered)
    assert credentials.state == "invalid" and "assertion.bmffHash.mismatch" in credentials.failures
    assert watermark_main(["verify", str(tampered)]) == 3
    assert "content credentials: invalid" in capsys.readouterr().out


def test_verify_reports_both_signals_with_documented_exit_codes(signed_cli_video, tmp_path, capsys):
    assert watermark_main(["verify", str(signed_cli_video), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "both" and report["credentials"]["state"] == "valid"
    assert report["watermark"]["found"] and report["watermark"]["bit_accuracy"] >= 0.85

    plain = tmp_path / "plain.mp4"  # a watermarked but unsigned video: watermark only
    with VideoWriter(plain, fps=25) as writer:
        writer.write(embed_watermark(frames(size=128)))
    assert watermark_main(["verify", str(plain)]) == 4
    text = capsys.readouterr().out
    assert "content credentials: absent" in text and "watermark: found" in text

    bare = tmp_path / "bare.mp4"  # neither signal
    with VideoWriter(bare, fps=25) as writer:
        writer.write(frames(size=128))
    assert watermark_main(["verify", str(bare)]) == 1
    assert watermark_main(["verify", str(tmp_path / "missing.mp4")]) == 2


def test_signed_but_unwatermarked_is_credentials_only(signer, tmp_path):
    video = tmp_path / "nowm.mp4"
    with VideoWriter(video, fps=25, c2pa_signer=signer) as writer:
        writer.write(frames())
    assert watermark_main(["verify", str(video)]) == 5


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("mismatch", "does not match the key"),
        ("expired", "expired on"),
        ("key_not_a_key", "is not a PEM private key"),
        ("cert_not_a_cert", "is not a PEM certificate chain"),
        ("missing", "could not be read"),
    ],
)
def test_bad_signing_credentials_are_named_and_nothing_is_written(pki, tmp_path, case, message, short_speech):
    notes = tmp_path / "notes.pem"
    notes.write_text("hello\n")
    cert, key = {
        "mismatch": (pki.cert, pki.other_key),
        "expired": (pki.expired_cert, pki.key),
        "key_not_a_key": (pki.cert, notes),
        "cert_not_a_cert": (notes, pki.key),
        "missing": (pki.cert, tmp_path / "nope.pem"),
    }[case]
    with pytest.raises(EMOInputError, match=message) as error:
        load_c2pa_signer(cert, key)
    assert os.fspath(cert if case in ("expired", "cert_not_a_cert") else key) in str(error.value)
    out = tmp_path / "out.mp4"
    argv = ["--image", str(PORTRAIT), "--audio", str(short_speech), "--output", str(out), "--no-progress"]
    if case == "mismatch":  # the CLI: exit 2 before any model loads, no file
        assert animate.main([*argv, "--c2pa-cert", str(cert), "--c2pa-key", str(key)]) == 2
        assert sorted(tmp_path.iterdir()) == [notes]


def test_a_failed_signature_leaves_no_file(signer, tmp_path, monkeypatch):
    def broken(source, dest, signer, manifest):
        open(dest, "wb").write(b"half")  # noqa: SIM115 - a partly written signed copy
        raise EMOInputError("C2PA signing failed: simulated")

    monkeypatch.setattr(provenance, "sign_mp4", broken)
    with pytest.raises(EMOInputError, match="simulated"):
        with VideoWriter(tmp_path / "out.mp4", fps=25, c2pa_signer=signer) as writer:
            writer.write(frames())
    assert list(tmp_path.iterdir()) == []


def test_environment_variables_configure_signing_and_no_key_gives_one_notice(pki, caplog, monkeypatch):
    monkeypatch.setattr(provenance, "_notice_given", False)
    environ = {"EMO_C2PA_CERT": str(pki.cert), "EMO_C2PA_KEY": str(pki.key)}
    assert "CN=EMO Test Signer" in resolve_c2pa_signer(environ=environ).subject
    with pytest.raises(EMOInputError, match="both a certificate and a key"):
        resolve_c2pa_signer(environ={"EMO_C2PA_CERT": str(pki.cert)})
    with caplog.at_level(logging.WARNING, logger="emo_pipeline.provenance"):
        assert resolve_c2pa_signer(environ={}) is None
        assert resolve_c2pa_signer(environ={}) is None
    assert [r.getMessage() for r in caplog.records] == [provenance.NO_SIGNER_NOTICE]


def test_the_app_signs_its_videos_naming_the_uploads(signer, short_speech, tmp_path):
    from emo_pipeline.app import PipelineHolder, generate

    (tmp_path / "jobs").mkdir()
    kept = tmp_path / "kept.mp4"
    for latest, final, _, _ in generate(
        PipelineHolder(None),
        tmp_path / "jobs",
        str(PORTRAIT),
        str(short_speech),
        "",
        1,
        3.5,
        0,
        64,
        0,
        "euler",
        c2pa_signer=signer,
    ):
        if final is not None:  # the page copies it now; the job folder goes when the generator ends
            kept.write_bytes(open(final, "rb").read())  # noqa: SIM115
        else:  # each clip's preview, offered by the page's player, is signed too
            assert read_content_credentials(latest).state == "valid"
    credentials = read_content_credentials(kept)
    assert credentials.state == "valid"
    assert {item["title"] for item in credentials.claims["inputs"].values()} == {"portrait.png", "short.wav"}


def test_verify_a_format_that_cannot_carry_credentials_still_reports_the_watermark(tmp_path, capsys):
    import av

    video = tmp_path / "clip.mkv"  # Matroska: no C2PA embedding defined for it here
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 128
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for pixels in embed_watermark(frames(size=128)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    assert watermark_main(["verify", str(video)]) == 4
    text = capsys.readouterr().out
    assert "content credentials: absent" in text and "cannot carry C2PA" in text and "watermark: found" in text
