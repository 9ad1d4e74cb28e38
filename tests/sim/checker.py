"""Safety checkers for the simulation, kept apart from the code under test.

The simulator reports what it observes (a Ready taken, an entry persisted, an entry applied, a
role seen in a scan, a read answered); the checker keeps its own global history and raises
``Violation`` the moment a Raft guarantee (design.md §7, items 1-2) is broken:

- election safety: at most one leader per (group, term);
- log matching: entries with the same (group, index, term) carry the same data and follow the
  same previous term; a full pairwise comparison of logs runs periodically too;
- committed entries never change, and every leader elected after an entry was committed
  holds it (leader completeness);
- the commit index of a node never decreases while it runs;
- a node grants at most one vote per term, across crashes (§5.2);
- every replica applies the same data at the same index, each index once and in order;
- a proposal is applied at one index only;
- a ReadIndex answer is at least the commit index known anywhere when the read was asked:
  linearizable reads see every write committed (so possibly acknowledged to a client) before
  they began.  Reads are told apart by the asking node and its context; contexts repeat
  across nodes, as the driver's do, and the core must not confuse them.
"""

from __future__ import annotations

import hashlib

from raft import Compacted, Entry, RawNode, Role, Storage, Unavailable
from raft.messages import VoteResponse


class Violation(AssertionError):
    """A broken safety property, with what was observed."""


def chain(prev: bytes, data: bytes) -> bytes:
    """The application's state: a hash chain over applied entries."""
    return hashlib.blake2b(prev + data, digest_size=8).digest()


GENESIS = b"\0" * 8


class Checker:
    def __init__(self) -> None:
        self.leaders: dict[tuple[int, int], int] = {}  # (group, term) -> node
        self.entries: dict[tuple[int, int, int], tuple[bytes, int]] = {}  # (g, i, t) -> data, prev
        self.committed: dict[tuple[int, int], tuple[int, bytes, int]] = {}  # (g,i) -> t, data, term
        self.max_committed: dict[int, int] = {}  # group -> highest index seen committed
        self.max_commit_index: dict[int, int] = {}  # group -> highest commit index a scan saw
        self.applied_data: dict[tuple[int, int], bytes] = {}  # (g, i) -> data
        self.state_at: dict[tuple[int, int], bytes] = {}  # (g, i) -> app hash after applying i
        self.applied_where: dict[bytes, tuple[int, int]] = {}  # proposal data -> (g, i)
        self.commit_seen: dict[tuple[int, int], int] = {}  # (node, g) -> commit, per incarnation
        # (node, context) -> (group, committed at ask)
        self.reads: dict[tuple[int, bytes], tuple[int, int]] = {}
        self.reads_answered = 0
        self.votes: dict[tuple[int, int, int], int] = {}  # (group, voter, term) -> candidate

    @staticmethod
    def fail(what: str) -> None:
        raise Violation(what)

    # -- incarnations ------------------------------------------------------------------------
    def on_restart(self, node: int) -> None:
        for key in [k for k in self.commit_seen if k[0] == node]:
            del self.commit_seen[key]

    # -- scans (after every simulation round) ------------------------------------------------
    def scan(self, node: int, group: int, rn: RawNode) -> None:
        r = rn.raft
        commit = r.log.committed
        key = (node, group)
        if commit < self.commit_seen.get(key, 0):
            self.fail(f"g{group} n{node}: commit went back {self.commit_seen[key]} -> {commit}")
        self.commit_seen[key] = commit
        if commit > self.max_commit_index.get(group, 0):
            self.max_commit_index[group] = commit
        if r.role is Role.LEADER:
            holder = self.leaders.get((group, r.term))
            if holder is None:
                self.leaders[(group, r.term)] = node
                self._check_leader_completeness(node, group, rn)
            elif holder != node:
                self.fail(f"g{group}: two leaders in term {r.term}: n{holder} and n{node}")

    def _check_leader_completeness(self, node: int, group: int, rn: RawNode) -> None:
        log = rn.raft.log
        first, last = log.first_index(), log.last_index()
        for (g, index), (term, _data, commit_term) in self.committed.items():
            if g != group or commit_term >= rn.raft.term:
                continue  # only entries committed in an earlier term must be present
            if index < first:
                continue  # covered by the leader's snapshot
            if index > last:
                self.fail(
                    f"g{group}: leader n{node} of term {rn.raft.term} lacks committed index "
                    f"{index} (its last index is {last})"
                )
            if log.term(index) != term:
                self.fail(
                    f"g{group}: leader n{node} of term {rn.raft.term} holds term "
                    f"{log.term(index)} at committed index {index} (committed term {term})"
                )

    # -- messages ---------------------------------------------------------------------------
    def on_send(self, group: int, m: object) -> None:
        """§5.2: a node grants at most one vote per term, even across crashes."""
        if isinstance(m, VoteResponse) and not m.reject and not m.pre_vote:
            cand = self.votes.setdefault((group, m.frm, m.term), m.to)
            if cand != m.to:
                self.fail(f"g{group}: n{m.frm} voted for n{cand} and n{m.to} in term {m.term}")

    # -- persisted entries: log matching -----------------------------------------------------
    def on_persist(self, node: int, group: int, disk: Storage, entries: list[Entry]) -> None:
        """``entries`` just reached ``disk``: judge them with the terms on disk, not in memory
        (a newer leader may already have replaced them in memory while the write was running)."""
        for e in entries:
            try:
                prev = disk.term(e.index - 1)
            except (Compacted, Unavailable):
                continue  # behind the disk's snapshot
            key = (group, e.index, e.term)
            seen = self.entries.setdefault(key, (e.data, prev))
            if seen != (e.data, prev):
                self.fail(
                    f"g{group} n{node}: log matching broken at index {e.index} term {e.term}: "
                    f"{seen} vs {(e.data, prev)}"
                )

    @staticmethod
    def compare_logs(group: int, logs: dict[int, dict[int, int]]) -> None:
        """Pairwise: if two logs agree on the term at i, they agree on every index below i."""
        ids = sorted(logs)
        for a_pos, a in enumerate(ids):
            for b in ids[a_pos + 1 :]:
                la, lb = logs[a], logs[b]
                common = sorted(set(la) & set(lb))
                agree_up_to = 0
                for i in reversed(common):
                    if la[i] == lb[i]:
                        agree_up_to = i
                        break
                for i in common:
                    if i > agree_up_to:
                        break
                    if la[i] != lb[i]:
                        Checker.fail(
                            f"g{group}: logs of n{a} and n{b} agree at {agree_up_to} "
                            f"but differ at {i} ({la[i]} vs {lb[i]})"
                        )

    # -- commits and applies -----------------------------------------------------------------
    def on_committed(self, node: int, group: int, term_now: int, entries: list[Entry]) -> None:
        for e in entries:
            key = (group, e.index)
            seen = self.committed.get(key)
            if seen is None:
                self.committed[key] = (e.term, e.data, term_now)
                if e.index > self.max_committed.get(group, 0):
                    self.max_committed[group] = e.index
            elif seen[:2] != (e.term, e.data):
                self.fail(
                    f"g{group} n{node}: committed index {e.index} changed: "
                    f"term {seen[0]} -> {e.term}"
                )
            elif term_now < seen[2]:
                self.committed[key] = (seen[0], seen[1], term_now)

    def on_apply(
        self, node: int, group: int, index: int, data: bytes, state: bytes, proposal: bool
    ) -> None:
        key = (group, index)
        seen = self.applied_data.setdefault(key, data)
        if seen != data:
            self.fail(f"g{group} n{node}: applied {data!r} at {index}, others applied {seen!r}")
        st = self.state_at.setdefault(key, state)
        if st != state:
            self.fail(f"g{group} n{node}: state after {index} differs from other replicas")
        if proposal:
            where = self.applied_where.setdefault(data, key)
            if where != key:
                self.fail(f"proposal {data!r} applied at g{group} i{index} and at {where}")

    def on_restore(self, node: int, group: int, index: int, state: bytes) -> None:
        if index == 0:
            return
        st = self.state_at.setdefault((group, index), state)
        if st != state:
            self.fail(f"g{group} n{node}: snapshot state at {index} differs from replicas")

    # -- reads -------------------------------------------------------------------------------
    def known_committed(self, group: int) -> int:
        """The highest index known committed anywhere: applied anywhere (as far as a client
        may have been told), or a commit index any live node holds (scanned every round)."""
        return max(self.max_committed.get(group, 0), self.max_commit_index.get(group, 0))

    def on_read_asked(self, node: int, group: int, context: bytes) -> None:
        self.reads[(node, context)] = (group, self.known_committed(group))

    def on_read_dropped(self, node: int, context: bytes) -> None:
        del self.reads[(node, context)]

    def on_read_answered(self, node: int, group: int, context: bytes, index: int) -> None:
        # A duplicated request may be answered twice; every answer must be fresh enough.
        asked = self.reads.get((node, context))
        if asked is None:
            self.fail(f"g{group} n{node}: read state for unknown context {context!r}")
            return
        self.reads_answered += 1
        if asked[0] != group or index < asked[1]:
            self.fail(
                f"g{group} n{node}: read {context.hex()} answered at index {index}, older than "
                f"commit {asked[1]} known when it was asked (stale read)"
            )
