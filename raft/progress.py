"""What the leader knows about each follower, and the flow control that paces replication.

A follower's Progress is in one of three states (Raft thesis §4.2.1 / etcd raft design):

  state     | sends                                    | leaves when
  ----------+------------------------------------------+------------------------------------------
  PROBE     | one AppendEntries, then waits for an     | an answer shows a match -> REPLICATE;
            | answer (or a heartbeat answer)           | the log it needs is compacted -> SNAPSHOT
  REPLICATE | pipelined, while the inflight window     | a rejection -> PROBE
            | has room (messages and bytes)            |
  SNAPSHOT  | nothing until the snapshot is acked,     | acked, reported or timed out -> PROBE
            | reported failed, or times out            |
"""

from __future__ import annotations

import enum
from collections import deque

from .errors import InvariantViolation, check


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """A sliding window of AppendEntries sent but not yet acknowledged: (last index, bytes)."""

    def __init__(self, max_msgs: int, max_bytes: int) -> None:
        check(max_msgs > 0 and max_bytes > 0, "inflight limits must be positive")
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self.window: deque[tuple[int, int]] = deque()
        self.bytes = 0

    def add(self, index: int, size: int) -> None:
        # Per append sent: inline checks (``check`` is an interpreted call from compiled code).
        if self.full():
            raise InvariantViolation("inflights: add to a full window")
        if self.window and index <= self.window[-1][0]:
            raise InvariantViolation("inflights: index must grow")
        self.window.append((index, size))
        self.bytes += size

    def free_le(self, index: int) -> None:
        """Acknowledge everything up to and including ``index``."""
        while self.window and self.window[0][0] <= index:
            self.bytes -= self.window.popleft()[1]

    def free_first_one(self) -> None:
        if self.window:
            self.bytes -= self.window.popleft()[1]

    def full(self) -> bool:
        return len(self.window) >= self.max_msgs or self.bytes >= self.max_bytes

    def count(self) -> int:
        return len(self.window)

    def reset(self) -> None:
        self.window.clear()
        self.bytes = 0


class Progress:
    def __init__(self, next_index: int, max_inflight_msgs: int, max_inflight_bytes: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot_elapsed = 0
        self.recent_active = False
        self.inflights = Inflights(max_inflight_msgs, max_inflight_bytes)
        self.is_learner = False
        # Since the leader's last heartbeat round: an append went to this follower
        # (``contacted``), it acknowledged one (``acked``; ``acked_before``: in the round
        # before).  ``sent_commit``: the highest commit index the leader has sent it.  A busy
        # follower needs no heartbeat and no empty append (raft/core.py).
        self.contacted = False
        self.acked = False
        self.acked_before = False
        self.sent_commit = 0

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.value}, match={self.match}, next={self.next}, "
            f"inflight={self.inflights.count()}, learner={self.is_learner})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot_elapsed = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to ``index``; True if it raised ``match``."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the append whose prev_index was ``rejected``; True if ``next`` moved."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale rejection
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale: not the probe we are waiting for
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def sent_entries(self, last_index: int | None, size: int) -> None:
        """Record an AppendEntries whose last entry is ``last_index`` (None: no entries)."""
        if self.state is ProgressState.REPLICATE:
            if last_index is not None:
                self.next = last_index + 1
                self.inflights.add(last_index, size)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True
        else:
            check(False, f"sending entries in state {self.state}")

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True
