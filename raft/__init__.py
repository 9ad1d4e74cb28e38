"""A generic multi-group Raft: a pure core (this package's modules except wal, transport and
driver) and, around it, the I/O that makes it durable and networked.  See docs/raft.md.

The core and the driver are compiled with mypyc when the package is installed (setup.py); a
compiled module older than its source would silently run old code, so importing the package
refuses that (rebuild with ``make``, or install with ``CTXSTORE_PURE_PYTHON=1``)."""

from . import _build  # noqa: F401  (first: refuses a stale compiled module)
from .core import CampaignKind, Config, Raft, ReadState, Role, SoftState
from .errors import (
    Compacted,
    ConfigInvalid,
    GroupNotHosted,
    InvariantViolation,
    NodeStopped,
    NotLeader,
    OutcomeUnknown,
    ProposalDropped,
    RaftError,
    SnapshotOutOfDate,
    SnapshotTemporarilyUnavailable,
    Unavailable,
    WalFailed,
)
from .messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    Snapshot,
    SnapshotMeta,
)
from .rawnode import RawNode, Ready, Status
from .storage import MemoryStorage, Storage

__all__ = [
    "NONE",
    "CampaignKind",
    "Compacted",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Config",
    "ConfigInvalid",
    "Entry",
    "EntryType",
    "GroupNotHosted",
    "HardState",
    "InvariantViolation",
    "MemoryStorage",
    "Message",
    "NodeStopped",
    "NotLeader",
    "OutcomeUnknown",
    "ProposalDropped",
    "Raft",
    "RaftError",
    "RawNode",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotOutOfDate",
    "SnapshotTemporarilyUnavailable",
    "SoftState",
    "Status",
    "Storage",
    "Unavailable",
    "WalFailed",
]
