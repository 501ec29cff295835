"""C2PA content credentials: a signed manifest in every mp4 we write, when a signing certificate is configured.

    pip install 'emo-pipeline[c2pa]'
    export EMO_C2PA_CERT=signer-chain.pem EMO_C2PA_KEY=signer-key.pem     # or --c2pa-cert/--c2pa-key
    emo-animate --image portrait.png --audio speech.wav --output out.mp4   # out.mp4 carries signed credentials
    emo-watermark verify out.mp4                                           # manifest + watermark in one report

The manifest (C2PA 2.x, written by `c2pa-python`) claims:

* a `c2pa.created` action with `digitalSourceType` trainedAlgorithmicMedia (IPTC), the software agent
  (emo-pipeline and its version) and the model (family, source, licence: the model card's);
* the inputs as ingredients (`inputTo`): the portrait and the audio track by title, format and SHA-256 (the
  `org.emo_pipeline.inputs` assertion). Neither is embedded: ingredient thumbnails are switched off.

What a deployer provides: a PEM certificate chain (the signing certificate first, then its intermediates; an
end-entity certificate with the digitalSignature key usage and an extended key usage C2PA accepts, e.g.
emailProtection or documentSigning) and its PEM private key (EC P-256/384/521, RSA or Ed25519). The key never
leaves the process. Validators show a signature as *trusted* only if the chain ends in a root they trust (the
C2PA trust list, or `emo-watermark verify --trust-anchors ROOTS.pem`); otherwise it is *valid* (intact, signed by
the certificate shown). A timestamp authority (`--c2pa-tsa-url` / `EMO_C2PA_TSA_URL`, an RFC 3161 URL) keeps a
signature valid after the certificate expires; without one (offline) nothing is contacted, and the signature's
validity is tied to the certificate's.

Without a certificate and key nothing is signed: the video still carries the invisible watermark and the
AI-generated tag, and one notice per process says so.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_pipeline.errors import EMOInputError

__all__ = [
    "C2PASigner",
    "ContentCredentials",
    "add_c2pa_arguments",
    "c2pa_signer_from_args",
    "ingredient",
    "load_c2pa_signer",
    "manifest_definition",
    "read_content_credentials",
    "resolve_c2pa_signer",
    "sign_mp4",
]

logger = logging.getLogger(__name__)

ENV_CERT, ENV_KEY, ENV_TSA = "EMO_C2PA_CERT", "EMO_C2PA_KEY", "EMO_C2PA_TSA_URL"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
INPUTS_ASSERTION = "org.emo_pipeline.inputs"
NO_SIGNER_NOTICE = (
    "no C2PA signing certificate configured (--c2pa-cert/--c2pa-key or EMO_C2PA_CERT/EMO_C2PA_KEY): videos carry "
    "the invisible watermark and the AI-generated tag but no signed content credentials"
)
_notice_given = False


def _c2pa() -> Any:
    try:
        import c2pa
    except ImportError as error:
        raise EMOInputError(
            "C2PA signing needs c2pa-python: pip install 'emo-pipeline[c2pa]' (or drop --c2pa-cert/--c2pa-key and "
            f"{ENV_CERT}/{ENV_KEY})"
        ) from error
    return c2pa


# ----------------------------------------------------------------------------------------------------------------
# The signer
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class C2PASigner:
    """A checked certificate chain and private key (PEM bytes; picklable, so batch processes can share it).

    Build it with `load_c2pa_signer` (files) or `resolve_c2pa_signer` (arguments, then the environment)."""

    cert_chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    alg: str
    subject: str
    issuer: str
    not_after: datetime.datetime
    tsa_url: str | None = None

    def native(self) -> Any:
        """A fresh `c2pa.Signer` (the native object is used once per signature)."""
        c2pa = _c2pa()
        info = c2pa.C2paSignerInfo(self.alg, self.cert_chain_pem, self.key_pem, self.tsa_url)
        return c2pa.Signer.from_info(info)


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise EMOInputError(f"C2PA {what} {str(path)!r} could not be read ({error.strerror or error})") from error


def _algorithm(key: Any, key_path: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in curves:
            return curves[key.curve.name]
        raise EMOInputError(f"C2PA key {key_path!r}: EC curve {key.curve.name} is not allowed (P-256, P-384, P-521)")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise EMOInputError(f"C2PA key {key_path!r}: {type(key).__name__} keys cannot sign C2PA (use EC, RSA or Ed25519)")


def load_c2pa_signer(
    cert: str | os.PathLike,
    key: str | os.PathLike,
    tsa_url: str | None = None,
    *,
    now: datetime.datetime | None = None,
) -> C2PASigner:
    """Read and check a PEM certificate chain and PEM private key for C2PA signing.

    Raises EMOInputError naming the file: unreadable, not PEM certificates / not a private key (or an encrypted
    one), a certificate that does not match the key, a certificate expired or not yet valid, one C2PA rejects.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = os.fspath(cert), os.fspath(key)
    chain_pem, key_pem = _read(cert_path, "certificate"), _read(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as error:
        raise EMOInputError(
            f"C2PA certificate {cert_path!r} is not a PEM certificate chain (-----BEGIN CERTIFICATE-----): give the "
            "signing certificate, then its intermediates"
        ) from error
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as error:
        raise EMOInputError(f"C2PA key {key_path!r} is encrypted: give an unencrypted PEM private key") from error
    except (ValueError, Exception) as error:
        raise EMOInputError(f"C2PA key {key_path!r} is not a PEM private key (-----BEGIN PRIVATE KEY-----)") from error
    alg = _algorithm(private_key, key_path)
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, public) != private_key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise EMOInputError(
            f"C2PA certificate {cert_path!r} does not match the key {key_path!r}: the first certificate of the chain "
            "must be the one issued for this key"
        )
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        raise EMOInputError(f"C2PA certificate {cert_path!r} expired on {leaf.not_valid_after_utc:%Y-%m-%d}: renew it")
    if leaf.not_valid_before_utc > now:
        raise EMOInputError(
            f"C2PA certificate {cert_path!r} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    signer = C2PASigner(
        cert_chain_pem=chain_pem,
        key_pem=key_pem,
        alg=alg,
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        not_after=leaf.not_valid_after_utc,
        tsa_url=tsa_url or None,
    )
    c2pa = _c2pa()
    try:
        signer.native().close()
    except c2pa.C2paError as error:
        raise EMOInputError(f"C2PA certificate {cert_path!r} / key {key_path!r} rejected by c2pa: {error}") from error
    return signer


def resolve_c2pa_signer(
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
    tsa_url: str | None = None,
    *,
    environ: dict[str, str] | None = None,
    notice: bool = True,
) -> C2PASigner | None:
    """The signer from `cert`/`key`, else from $EMO_C2PA_CERT/$EMO_C2PA_KEY (and $EMO_C2PA_TSA_URL), else None.

    One of the pair without the other is an EMOInputError. With neither, logs `NO_SIGNER_NOTICE` once per process
    (unless `notice` is False) and returns None."""
    global _notice_given
    environ = os.environ if environ is None else environ
    where = "--c2pa-cert/--c2pa-key"
    if cert is None and key is None:
        cert, key = environ.get(ENV_CERT) or None, environ.get(ENV_KEY) or None
        tsa_url = tsa_url or environ.get(ENV_TSA) or None
        where = f"{ENV_CERT}/{ENV_KEY}"
    if cert is None and key is None:
        if notice and not _notice_given:
            logger.warning(NO_SIGNER_NOTICE)
            _notice_given = True
        return None
    if cert is None or key is None:
        raise EMOInputError(f"C2PA signing needs both a certificate and a key ({where}); only one was given")
    return load_c2pa_signer(cert, key, tsa_url)


def add_c2pa_arguments(parser: Any) -> None:
    """`--c2pa-cert`, `--c2pa-key`, `--c2pa-tsa-url` (defaults: the EMO_C2PA_* environment variables)."""
    group = parser.add_argument_group("content credentials (C2PA; pip install 'emo-pipeline[c2pa]')")
    group.add_argument("--c2pa-cert", metavar="PEM", help=f"signing certificate chain (default: ${ENV_CERT})")
    group.add_argument("--c2pa-key", metavar="PEM", help=f"its private key (default: ${ENV_KEY})")
    group.add_argument(
        "--c2pa-tsa-url", metavar="URL", help=f"RFC 3161 timestamp authority (default: ${ENV_TSA}; none offline)"
    )


def c2pa_signer_from_args(args: Any, notice: bool = True) -> C2PASigner | None:
    """`resolve_c2pa_signer` from parsed `add_c2pa_arguments` options."""
    return resolve_c2pa_signer(args.c2pa_cert, args.c2pa_key, args.c2pa_tsa_url, notice=notice)


# ----------------------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------------------


def _format_of(name: str, default: str) -> str:
    import mimetypes

    kind = mimetypes.guess_type(name)[0]
    return kind or default


def ingredient(source: Any, role: str, title: str | None = None) -> dict[str, str]:
    """An input's title, format and SHA-256: of the file's bytes for a path, else of the array's raw bytes
    (a PIL image: its RGB pixels; audio samples: their float32 bytes). Nothing of the content itself is kept."""
    import numpy as np

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        default = "image/png" if role == "portrait" else "audio/wav"
        return {"role": role, "title": title or path.name, "format": _format_of(path.name, default), "sha256": digest}
    if hasattr(source, "convert"):  # PIL image
        source = np.asarray(source.convert("RGB"))
    if hasattr(source, "detach"):  # torch tensor
        source = source.detach().cpu().numpy()
    array = np.ascontiguousarray(np.asarray(source, dtype=np.float32 if role == "audio" else None))
    kind = "application/x-raw-pixels" if role == "portrait" else "application/x-raw-float32-samples"
    return {
        "role": role,
        "title": title or role,
        "format": kind,
        "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
    }


def model_claim(metadata: dict | None) -> dict[str, str]:
    """The model as the manifest names it: family, source and licence from a pipeline's `emo_metadata` (the
    same values its model card shows)."""
    from emo_pipeline.hub import DEFAULT_LICENSE

    metadata = metadata or {}
    source = metadata.get("source") or metadata.get("base_model") or "unknown"
    return {
        "family": str(metadata.get("family") or "emo"),
        "source": str(source),
        "license": str(metadata.get("license") or DEFAULT_LICENSE),
    }


def manifest_definition(
    title: str, *, model: dict[str, str] | None = None, ingredients: list[dict[str, str]] | tuple = ()
) -> dict[str, Any]:
    """The C2PA manifest definition for one generated mp4 (see the module docstring for what it claims)."""
    from emo_pipeline import __version__

    agent = {"name": "emo-pipeline", "version": __version__}
    action: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
        "description": "AI-generated talking-head video (EMO method) from one portrait and an audio track",
    }
    if model:
        action["parameters"] = {"model": dict(model)}
    assertions: list[dict[str, Any]] = [{"label": "c2pa.actions.v2", "data": {"actions": [action]}}]
    if ingredients:
        assertions.append({"label": INPUTS_ASSERTION, "data": {item["role"]: dict(item) for item in ingredients}})
    return {
        "claim_generator_info": [agent],
        "title": title,
        "format": "video/mp4",
        "ingredients": [
            {"title": item["title"], "format": item["format"], "relationship": "inputTo"} for item in ingredients
        ],
        "assertions": assertions,
    }


def sign_mp4(source: str | os.PathLike, dest: str | os.PathLike, signer: C2PASigner, manifest: dict) -> None:
    """Write `source` with a signed C2PA manifest to `dest` (a new file; `source` is left as it is)."""
    c2pa = _c2pa()
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})  # never embed the inputs
    native = signer.native()
    try:
        with c2pa.Builder(manifest, context=context) as builder:
            builder.sign_file(os.fspath(source), os.fspath(dest), native)
    except c2pa.C2paError as error:
        raise EMOInputError(f"C2PA signing of {os.fspath(dest)!r} failed: {error}") from error
    finally:
        native.close()


# ----------------------------------------------------------------------------------------------------------------
# Reading back
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ContentCredentials:
    """What `read_content_credentials` found.

    Attributes:
        state: "absent" (no manifest), "invalid" (a manifest that fails validation: tampered content, a broken
            signature), "valid" (intact and signed; the signer is not in the trust anchors given) or "trusted"
            (valid, and the chain ends in a given trust anchor).
        signer: the signing certificate's common name and issuer (None when absent).
        claims: the active manifest's title, generator, actions and inputs.
        failures: validation failure codes (e.g. "assertion.bmffHash.mismatch").
    """

    state: str
    signer: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def read_content_credentials(
    path: str | os.PathLike, trust_anchors: str | os.PathLike | None = None
) -> ContentCredentials:
    """Read and validate the C2PA manifest of a file. `trust_anchors`: PEM root certificates to trust."""
    c2pa = _c2pa()
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise EMOInputError(f"video {name!r} does not exist")
    settings: dict[str, Any] = {}
    if trust_anchors is not None:
        anchors = _read(trust_anchors, "trust anchors").decode("ascii", "replace")
        settings = {"verify": {"verify_trust": True}, "trust": {"trust_anchors": anchors}}
    try:
        context = c2pa.Context.from_dict(settings)
        with c2pa.Reader(name, context=context) as reader:
            state = (reader.get_validation_state() or "Invalid").lower()
            results = reader.get_validation_results() or {}
            manifest = reader.get_active_manifest() or {}
    except c2pa.C2paError as error:
        if "ManifestNotFound" in type(error).__name__ or "ManifestNotFound" in str(error):
            return ContentCredentials("absent")
        if "NotSupported" in type(error).__name__ or "NotSupported" in str(error):
            return ContentCredentials("absent", failures=[f"this file format cannot carry C2PA credentials ({error})"])
        return ContentCredentials("invalid", failures=[str(error)])
    failures = [
        item.get("code", "?")
        for item in (results.get("activeManifest") or {}).get("failure", [])
        if trust_anchors is not None or item.get("code") != "signingCredential.untrusted"
    ]
    if state not in ("valid", "trusted", "invalid"):
        state = "invalid"
    info = manifest.get("signature_info") or {}
    signer = info.get("common_name") or None
    if signer and info.get("issuer"):
        signer += f" (issued by {info['issuer']})"
    claims: dict[str, Any] = {"title": manifest.get("title"), "generator": manifest.get("claim_generator_info")}
    for assertion in manifest.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            claims["actions"] = assertion["data"].get("actions", [])
        elif assertion.get("label") == INPUTS_ASSERTION:
            claims["inputs"] = assertion["data"]
    return ContentCredentials(state, signer, claims, failures)
