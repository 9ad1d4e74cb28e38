"""ReadIndex bookkeeping at the leader (Raft thesis §6.4).

A read request records the commit index at the time it arrives; the leader then confirms it is
still the leader by a round of heartbeats carrying the request's context.  Once a majority has
answered for a context, that request and every earlier one are released at their recorded index.
"""

from __future__ import annotations

from collections import deque

from .quorum import majority


class ReadRequest:
    __slots__ = ("acks", "context", "frm", "index")

    def __init__(self, frm: int, context: bytes, index: int) -> None:
        self.frm = frm  # the node that asked (the leader itself for local reads)
        self.context = context
        self.index = index
        self.acks: set[int] = set()


class ReadOnly:
    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending: dict[bytes, ReadRequest] = {}
        self.queue: deque[bytes] = deque()

    def full(self) -> bool:
        return len(self.queue) >= self.max_pending

    def add_request(self, index: int, frm: int, context: bytes) -> bool:
        """Queue a request; False if its context is already pending (the caller must not resend)."""
        if context in self.pending:
            return False
        self.pending[context] = ReadRequest(frm, context, index)
        self.queue.append(context)
        return True

    def recv_ack(self, node: int, context: bytes) -> set[int] | None:
        req = self.pending.get(context)
        if req is None:
            return None
        req.acks.add(node)
        return req.acks

    def advance(self, context: bytes) -> list[ReadRequest]:
        """Release the request with ``context`` and every request queued before it."""
        if context not in self.pending:
            return []
        out: list[ReadRequest] = []
        while self.queue:
            ctx = self.queue.popleft()
            out.append(self.pending.pop(ctx))
            if ctx == context:
                break
        return out

    def last_pending_context(self) -> bytes | None:
        return self.queue[-1] if self.queue else None

    def has_quorum(self, acks: set[int], voters: tuple[int, ...]) -> bool:
        return sum(1 for v in voters if v in acks) >= majority(len(voters))
