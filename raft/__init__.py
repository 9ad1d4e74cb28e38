"""A generic multi-group Raft: a pure core (this package's modules except wal, transport and
driver) and, around it, the I/O that makes it durable and networked.  See docs/raft.md."""

from .core import CampaignKind, Config, Raft, ReadState, Role, SoftState
from .errors import (
    Compacted,
    ConfigInvalid,
    InvariantViolation,
    NotLeader,
    ProposalDropped,
    RaftError,
    SnapshotOutOfDate,
    SnapshotTemporarilyUnavailable,
    Unavailable,
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
    "HardState",
    "InvariantViolation",
    "MemoryStorage",
    "Message",
    "NotLeader",
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
]
