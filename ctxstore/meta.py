"""The meta group's state machine: the cluster view, replicated (design §5.6).  Pure.

``MetaMachine`` holds the view of one meta group (``placement.META_GROUP``) and applies its
committed entries: a normal entry is a meta command (ctxstore/membership.py), answered with
``MetaOk`` or ``MetaRejected``; bytes that are no meta command are refused as ``bad_request``
(a replica never crashes on a bad entry, and every replica refuses it alike); membership
changes and empty entries answer None.  ``Machines`` puts it beside the conversation state
behind the one ``StateMachine`` a node's driver takes: the meta group's entries go to the
meta machine, every other group's to the data state machine.

The first view of a cluster is bootstrapped, not proposed: every founding node starts the
meta group with the same view (``bootstrap_view``), as it starts each group with the same
voters.  Observers (``on_view``) hear of each new view once it is applied.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from raft.messages import Entry, EntryType
from raft.pipeline import StateMachine

from .membership import (
    ClusterView,
    MetaRejected,
    apply_meta,
    decode_meta,
    decode_view,
    encode_view,
)
from .placement import META_GROUP


class MetaMachine:
    def __init__(self, initial: ClusterView) -> None:
        self.initial = initial
        self.view = initial
        self.on_view: Callable[[ClusterView], None] | None = None

    def apply(self, entries: list[Entry]) -> list[object]:
        out: list[object] = []
        before = self.view
        for e in entries:
            if e.type is not EntryType.NORMAL or not e.data:
                out.append(None)
                continue
            try:
                cmd = decode_meta(e.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                out.append(MetaRejected("bad_request", f"entry {e.index}: {exc}"))
                continue
            self.view, result = apply_meta(self.view, cmd)
            out.append(result)
        if self.view is not before and self.on_view is not None:
            self.on_view(self.view)
        return out

    def snapshot(self) -> bytes:
        return encode_view(self.view)

    def restore(self, data: bytes) -> None:
        """A snapshot's view (``b""``: the bootstrapped one)."""
        self.view = decode_view(data) if data else self.initial
        if self.on_view is not None:
            self.on_view(self.view)


class Machines:
    """The node's one state machine: the meta group's entries to ``meta``, others to
    ``data``."""

    def __init__(self, meta: MetaMachine, data: StateMachine, meta_group: int = META_GROUP):
        self.meta = meta
        self.data = data
        self.meta_group = meta_group

    def apply(self, group: int, entries: list[Entry]) -> list[object]:
        if group == self.meta_group:
            return self.meta.apply(entries)
        return self.data.apply(group, entries)

    def snapshot(self, group: int) -> bytes:
        if group == self.meta_group:
            return self.meta.snapshot()
        return self.data.snapshot(group)

    def restore(self, group: int, data: bytes) -> None:
        if group == self.meta_group:
            self.meta.restore(data)
        else:
            self.data.restore(group, data)


__all__ = ["Machines", "MetaMachine"]
