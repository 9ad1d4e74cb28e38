"""Errors of the wire package.

Every error a caller may handle carries a stable ``code``, one of ``protocol.ErrorCode``:

- ``LocalProtocolError``: this side tried something the protocol forbids (a frame over the
  limit, a message the state does not allow, an unencodable value).  Nothing was sent.  The
  remote kind is not an exception: a peer that breaks the protocol becomes a ``ProtocolError``
  *event* of the sans-IO connection (``wire.framing``), never a crash.
- ``ClientError``: what the Python client raises for a failed call, whether the server answered
  with an ``Error`` or the call failed locally (connection lost, timeout).  ``retryable`` says
  whether sending the same request again may succeed (for an append: with the same
  ``client_msg_id``).
"""

from __future__ import annotations

from typing import Any

from .protocol import RETRYABLE, Error, ErrorCode


class WireError(Exception):
    """Base of the errors a caller may handle."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


class LocalProtocolError(WireError):
    """This side broke the protocol; nothing was sent and the connection is unchanged."""


class ClientError(WireError):
    """A failed call of ``wire.client.Client``."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.retryable = code in RETRYABLE if retryable is None else retryable
        self.details: dict[str, Any] = {} if details is None else details

    @classmethod
    def from_error(cls, error: Error) -> ClientError:
        return cls(error.code, error.message, error.retryable, error.details)

    def __repr__(self) -> str:
        return (
            f"ClientError({self.code!r}, {self.message!r}, retryable={self.retryable}, "
            f"details={self.details!r})"
        )


__all__ = ["ClientError", "LocalProtocolError", "WireError"]
