"""A throw-away C2PA signing PKI for tests: a root CA and an end-entity signing certificate (cryptography).

C2PA accepts an end-entity certificate (basicConstraints CA:FALSE) with the digitalSignature key usage and an
extended key usage from its list (here emailProtection), issued by a CA; a self-signed leaf is refused."""

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


@dataclass
class TestPKI:
    root: Path  # the CA certificate (a trust anchor)
    cert: Path  # signing certificate + CA (the chain to configure)
    key: Path  # the signing key
    other_key: Path  # a valid key that belongs to no certificate here
    expired_cert: Path  # a chain for `key` whose signing certificate has expired


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EMO Test"),
        ]
    )


def _usage(signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not signing,
        crl_sign=not signing,
        encipher_only=False,
        decipher_only=False,
    )


def make_test_pki(folder: Path) -> TestPKI:
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("EMO Test Root CA"))
        .issuer_name(_name("EMO Test Root CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + 30 * day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(signing=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())

    def leaf(not_before, not_after):
        return (
            x509.CertificateBuilder()
            .subject_name(_name("EMO Test Signer"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(signing=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    def private(k):
        return k.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    pki = TestPKI(*(folder / name for name in ("root.pem", "chain.pem", "key.pem", "other-key.pem", "expired.pem")))
    pki.root.write_bytes(ca.public_bytes(PEM))
    pki.cert.write_bytes(leaf(now - day, now + 30 * day).public_bytes(PEM) + ca.public_bytes(PEM))
    pki.expired_cert.write_bytes(leaf(now - 30 * day, now - day).public_bytes(PEM) + ca.public_bytes(PEM))
    pki.key.write_bytes(private(key))
    pki.other_key.write_bytes(private(ec.generate_private_key(ec.SECP256R1())))
    return pki
