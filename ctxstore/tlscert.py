"""A self-signed certificate for a local HTTP/3 listener (``ctxstore serve --h3``, docs/web.md §8).

Browsers accept a self-signed certificate for WebTransport when the page gives its SHA-256 hash
(``new WebTransport(url, {serverCertificateHashes: [{algorithm: "sha-256", value}]})``), and only
if it is an ECDSA certificate valid for at most 14 days: this module makes such a certificate
(P-256, valid from an hour ago for ``VALID_DAYS``) for the given host names and addresses, with
``cryptography``, and writes it and its key as PEM files.  Not for production: a real deployment
uses a certificate from a CA.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS: Final = 13  # browsers refuse serverCertificateHashes for more than 14 days
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class LocalCertificate:
    cert_path: str
    key_path: str
    sha256: str  # hex, of the DER certificate (what serverCertificateHashes takes)
    not_after: datetime.datetime


def certificate_hash(cert_pem: bytes) -> str:
    """The SHA-256 of a PEM certificate's DER form, in hex."""
    return der_sha256(x509.load_pem_x509_certificate(cert_pem))


def der_sha256(cert: x509.Certificate) -> str:
    """The SHA-256 of a certificate's DER form, in hex (what serverCertificateHashes takes)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def generate(directory: str, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> LocalCertificate:
    """Write ``directory/h3-cert.pem`` and ``directory/h3-key.pem`` (the key readable by its
    owner only): a new self-signed certificate for ``hosts``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    common_name = hosts[0] if hosts else "ctxstore"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_after = now + datetime.timedelta(days=VALID_DAYS)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, "h3-cert.pem")
    key_path = os.path.join(directory, "h3-key.pem")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return LocalCertificate(cert_path, key_path, certificate_hash(cert_pem), not_after)


__all__ = [
    "DEFAULT_HOSTS",
    "VALID_DAYS",
    "LocalCertificate",
    "certificate_hash",
    "der_sha256",
    "generate",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m ctxstore.tlscert DIR [HOST ...]``: write a certificate, print where and its
    hash as one JSON line (``make run-h3``)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m ctxstore.tlscert DIR [HOST ...]", file=sys.stderr)
        return 2
    cert = generate(args[0], tuple(args[1:]) or DEFAULT_HOSTS)
    print(json.dumps({"cert": cert.cert_path, "key": cert.key_path, "cert_sha256": cert.sha256,
                      "not_after": cert.not_after.isoformat()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
