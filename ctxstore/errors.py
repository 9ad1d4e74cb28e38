"""ctxstore's errors: one exception carrying a client-facing error code, and the one mapping
from the Raft layer's proposal failures to what a request may do next.

Rules of this file:
- ``ServiceError.code`` is a ``wire.protocol.ErrorCode``: what the client is told.
- A proposal that failed was either **not applied** (refused, or replaced by a new leader's
  entry: sending it again is safe), its outcome is **unknown** (it may have been applied: the
  client retries with its ``client_msg_id``, answered ``timeout``), or the node **cannot**
  take it now (``unavailable``, retryable).  ``proposal_outcome`` is the only place that
  decides which, for the router's own proposals and for those it makes for peers.
"""

from __future__ import annotations

import enum

from raft import NotLeader, ProposalDropped
from raft.errors import OutcomeUnknown
from wire.protocol import ErrorCode


class ServiceError(Exception):
    """A request that could not be carried out; ``code`` is the wire error code."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Outcome(enum.Enum):
    NOT_APPLIED = "not_applied"  # safe to send again (elsewhere)
    UNKNOWN = "unknown"  # may have been applied: "timeout"
    CANNOT = "cannot"  # the node cannot take it now: "unavailable"


def proposal_outcome(exc: BaseException) -> Outcome:
    """What a failed proposal means (raised by ``propose_then`` or given to its callback)."""
    if isinstance(exc, NotLeader | ProposalDropped):
        return Outcome.NOT_APPLIED
    if isinstance(exc, OutcomeUnknown):
        return Outcome.UNKNOWN
    return Outcome.CANNOT


OUTCOME_CODES: dict[Outcome, ErrorCode] = {
    Outcome.UNKNOWN: "timeout",
    Outcome.CANNOT: "unavailable",
}
"""The client's code of a failure that is not sent again."""


__all__ = ["OUTCOME_CODES", "Outcome", "ServiceError", "proposal_outcome"]
