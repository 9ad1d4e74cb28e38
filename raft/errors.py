"""Errors of the Raft core.

Every error a caller may handle carries a stable ``code``.  ``InvariantViolation`` is different:
it means the core reached a state the algorithm forbids (a bug, a corrupted disk, a driver that
broke the Ready contract).  Nobody catches it, and it is raised explicitly rather than through
``assert`` so that ``python -O`` cannot strip it.
"""

from __future__ import annotations


class RaftError(Exception):
    """Base of the errors a caller may handle."""

    code = "raft_error"


class ProposalDropped(RaftError):
    """The proposal (or read, or conf change) was not accepted; it may be retried later."""

    code = "proposal_dropped"


class GroupNotHosted(ProposalDropped):
    """The group is not hosted on this node (never was, or it was removed from it: the node
    left the group's membership).  Nothing was proposed: ask a replica of the group."""

    code = "group_not_hosted"


class NotLeader(RaftError):
    """The request must go to the leader.  ``leader_hint`` is 0 when no leader is known."""

    code = "not_leader"

    def __init__(self, leader_hint: int) -> None:
        super().__init__(f"not the leader (leader hint: {leader_hint or 'unknown'})")
        self.leader_hint = leader_hint


class Compacted(RaftError):
    """The requested index lies before the first index still held in the log."""

    code = "compacted"


class Unavailable(RaftError):
    """The requested index lies after the last index of the log."""

    code = "unavailable"


class SnapshotOutOfDate(RaftError):
    """A snapshot older than the one already held was offered."""

    code = "snapshot_out_of_date"


class SnapshotTemporarilyUnavailable(RaftError):
    """Storage cannot produce a snapshot right now; the core retries later."""

    code = "snapshot_temporarily_unavailable"


class ConfigInvalid(RaftError):
    """A configuration value, or a requested membership change, is not allowed."""

    code = "config_invalid"


class OutcomeUnknown(RaftError):
    """A proposal may or may not be applied: this node stopped leading its group, a snapshot
    jumped over it, or it was not applied in time (it may still commit under another leader)."""

    code = "outcome_unknown"


class NodeStopped(RaftError):
    """The node's driver stopped (shut down, its WAL failed, or a bug stopped it) before the
    request finished."""

    code = "node_stopped"


class WalFailed(Exception):
    """A write or fsync of the WAL failed; nothing more is written (restart and recover)."""

    code = "wal_failed"


class InvariantViolation(Exception):
    """A state the algorithm forbids.  Never caught; never removed by ``-O``."""


def check(condition: bool, message: str) -> None:
    """Raise ``InvariantViolation`` unless ``condition`` holds (an assert that ``-O`` keeps).

    The message is built before the call: on hot paths write ``if not ...: raise
    InvariantViolation(f"...")`` so that an f-string is built only when the check fails."""
    if not condition:
        raise InvariantViolation(message)
