"""ReadIndex bookkeeping at the leader (Raft thesis §6.4), by heartbeat rounds.

A read request records the commit index when it arrives.  It is served only once the leader has
confirmed that it was still the leader *after* the request arrived: a majority of the voters
(the leader itself included) must have answered a heartbeat sent after that moment.

Rules of this file:
- Every heartbeat broadcast of a leader is one *round*, numbered 1, 2, 3 ... within the
  leader's term; a round number is never reused (a new term starts a new ``ReadOnly``).  Every
  Heartbeat carries its round and every HeartbeatResponse echoes it.
- A request records the round of the first broadcast started after it arrived
  (``round + 1`` at arrival).  ``acked`` holds, per node, the highest round it acknowledged in
  this term; the leader acknowledges a round when it starts it.
- A request is confirmed once a majority of the voters acknowledged a round >= its own; the
  confirmed requests are released in arrival order.
- Requests are never matched by their context: two requests with equal context bytes (from two
  nodes, or one sent twice) are two requests, each answered.  A late answer to an earlier round
  proves nothing about a later request, whatever context either carries.
- At most ``max_pending`` requests wait; the caller refuses more (``full``).
"""

from __future__ import annotations

from collections import deque

from .quorum import committed_index


class ReadRequest:
    __slots__ = ("context", "frm", "index", "round")

    def __init__(self, frm: int, context: bytes, index: int, round_: int) -> None:
        self.frm = frm  # the node that asked (the leader itself for local reads)
        self.context = context
        self.index = index  # the leader's commit index when the request arrived
        self.round = round_  # the first heartbeat round started after it arrived


class ReadOnly:
    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.queue: deque[ReadRequest] = deque()  # in arrival order (rounds never decrease)
        self.round = 0  # the last round started (0: none yet in this term)
        self.acked: dict[int, int] = {}  # node -> highest round it acknowledged

    def full(self) -> bool:
        return len(self.queue) >= self.max_pending

    def add_request(self, index: int, frm: int, context: bytes) -> None:
        """Queue a request that arrived now, at commit ``index`` (the caller checked ``full``)."""
        self.queue.append(ReadRequest(frm, context, index, self.round + 1))

    def round_wanted(self) -> bool:
        """A queued request waits for a round that has not started yet."""
        return bool(self.queue) and self.queue[-1].round > self.round

    def start_round(self, leader: int) -> int:
        """Number the next heartbeat broadcast; the leader acknowledges it at once."""
        self.round += 1
        self.acked[leader] = self.round
        return self.round

    def recv_ack(self, node: int, round_: int) -> bool:
        """``node`` answered round ``round_``; True if that is news.  A round this leader never
        started (a forged or corrupted answer) is ignored."""
        if round_ <= 0 or round_ > self.round or round_ <= self.acked.get(node, 0):
            return False
        self.acked[node] = round_
        return True

    def release(self, voters: tuple[int, ...]) -> list[ReadRequest]:
        """Pop the requests a majority of ``voters`` has confirmed, in arrival order."""
        queue = self.queue
        if not queue:
            return []
        confirmed = committed_index(voters, self.acked)
        out: list[ReadRequest] = []
        while queue and queue[0].round <= confirmed:
            out.append(queue.popleft())
        return out
