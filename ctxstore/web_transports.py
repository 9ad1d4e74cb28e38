"""``GET /v1/transports``: how a browser may reach this node (docs/web.md §8.5).

The browser client (``ctxstore.js``) asks it before it connects, so that it uses WebTransport
where the node serves it without being told, and the WebSocket otherwise:

    {"websocket": {"path": "/v1/ws", "subprotocols": ["ctxstore.v1.json", ...]},
     "webtransport": {"port": 7600, "path": "/v1/wt", "protocols": [...],
                      "cert_sha256": ["c34d..."]}}

``webtransport`` is null without an HTTP/3 listener (``--h3``).  It names a port, never a host:
a client connects to the host it asked.  ``cert_sha256`` holds the SHA-256 of the certificate
the listener serves (its leaf, as aioquic loaded it: never another) only when a browser would
accept it as ``serverCertificateHashes`` (an ECDSA key, valid for at most 14 days, now within
its validity); otherwise it is empty and the browser checks the certificate the usual way (a
CA's).  Nothing here is secret (the port is in every ``Alt-Svc``, the certificate in every
handshake, and any page may open ``/v1/ws``), so any origin may read it
(``Access-Control-Allow-Origin: *``).
"""

from __future__ import annotations

import datetime
from typing import Final

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from wire.web_codec import SUBPROTOCOLS

from .tlscert import der_sha256
from .web import PATH as WS_PATH

PATH: Final = b"/v1/transports"
HASHABLE_DAYS_MAX: Final = 14  # what browsers accept for serverCertificateHashes


class WebSocketTransport(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    subprotocols: list[str]


class WebTransportTransport(msgspec.Struct, forbid_unknown_fields=True):
    """The HTTP/3 listener's WebTransport endpoint: ``https://<the host asked>:<port><path>``."""

    port: int
    path: str
    protocols: list[str]
    cert_sha256: list[str]  # hex; empty: the certificate is checked the usual way (a CA's)


class Transports(msgspec.Struct, forbid_unknown_fields=True):
    """How this node may be reached from a browser (``GET /v1/transports``)."""

    websocket: WebSocketTransport
    webtransport: WebTransportTransport | None


class WebTransportAdvert:
    """What the HTTP port says of its node's HTTP/3 listener (``web_h3.attach_h3`` sets it)."""

    def __init__(self, port: int, path: str, certificate: x509.Certificate) -> None:
        self.port = port
        self.path = path
        self.sha256: str | None = None
        self.not_before = certificate.not_valid_before_utc
        self.not_after = certificate.not_valid_after_utc
        if hashable(certificate):
            self.sha256 = der_sha256(certificate)

    def describe(self, now: datetime.datetime | None = None) -> WebTransportTransport:
        now = now or datetime.datetime.now(datetime.UTC)
        valid = self.sha256 is not None and self.not_before <= now <= self.not_after
        hashes = [self.sha256] if valid and self.sha256 is not None else []
        return WebTransportTransport(self.port, self.path, list(SUBPROTOCOLS), hashes)


def hashable(certificate: x509.Certificate) -> bool:
    """Whether a browser takes this certificate by its hash (``serverCertificateHashes``): an
    ECDSA key, and a validity of at most 14 days (W3C WebTransport; Chromium's rules)."""
    span = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    is_ec = isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    return is_ec and span <= datetime.timedelta(days=HASHABLE_DAYS_MAX)


def transports(webtransport: WebTransportAdvert | None) -> Transports:
    ws = WebSocketTransport(WS_PATH.decode(), list(SUBPROTOCOLS))
    return Transports(ws, None if webtransport is None else webtransport.describe())


__all__ = [
    "PATH",
    "Transports",
    "WebSocketTransport",
    "WebTransportAdvert",
    "WebTransportTransport",
    "hashable",
    "transports",
]
