"""Many Raft groups on one node (design §3.2): one clock, work-driven Readies, quiescence.

``MultiRaft`` is pure like the core: the driver (raft/driver.py) or the simulator calls
``tick``, ``step``, ``propose``..., ``peer_up``/``peer_down``, and collects ``ready()``.

- **One clock.**  ``tick()`` ticks every *awake* group; quiescent groups cost nothing.
- **Work-driven Readies.**  A group is *dirty* once it was ticked, stepped, proposed to or
  advanced; ``ready()`` looks only at dirty groups.  A dirty group whose Ready is outstanding
  (its write in progress) hands out its read traffic instead (``RawNode.read_traffic``), which
  ``read_traffic()`` returns after that ``ready()``.
- **Quiescence.**  A leader quiesces a group after ``quiesce_after_ticks`` consecutive ticks in
  which it was idle (everything committed and applied, nothing pending) and every follower on
  a live peer had its whole log, with a quorum of voters (itself included) live and caught up.
  It then sends each live follower a ``Heartbeat(quiesce=True)`` and stops ticking the group.
  A follower that receives it from its leader, holding exactly the leader's log, stops ticking
  too.  Any other message, proposal, read or transfer wakes the group (its timers start over,
  see ``Raft.wake``); so do the answers a quiescent leader may still receive, unless they are
  plain heartbeat answers of its term.
- **Commit notices.**  A follower learns a new commit index from the group's next append or
  heartbeat (``commit_broadcast`` is off in the product: an empty append per commit costs two
  messages per follower).  So that it applies, and pushes to the clients it holds, what its
  leader committed without waiting for them, ``ready()`` also gathers from each dirty group
  this node leads the commit indexes its followers are owed (``Raft.owed_commits``);
  ``take_commit_notices()`` hands them out per follower as flat ``group, term, commit``
  triples, which the transport carries in the next batch to that peer (one list for every
  group, not one message each), and ``commit_notices(frm, ...)`` feeds a follower's side
  (``Raft.commit_notice``).
- **Liveness per peer, not per group.**  The transport reports a peer connection up or down.
  ``peer_down(p)`` wakes every group that may need an election or a check-quorum because of it
  (p led it, no leader is known, or this node leads it); ``peer_up(p)`` wakes the groups this
  node leads that include p, so p hears from their leaders at once.  Peers start down.
- **No election storm.**  A fresh or restarted node does not wait a random timeout for groups
  without a leader: the group's *preferred* node (voters sorted, ``voters[group % n]``)
  campaigns first, the groups spread over ``stagger_ticks`` ticks; this also spreads
  leadership evenly.  A group whose campaigns keep failing draws its election timeout from a
  growing range, [et, (1 + 2^k)·et) after k failures, capped at ``backoff_factor_max``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from .core import Config, Raft, Role
from .errors import check
from .messages import NONE, ConfChange, Heartbeat, HeartbeatResponse, Message
from .quorum import majority
from .rawnode import RawNode, ReadTraffic, Ready, Status
from .storage import Storage


@dataclass(frozen=True)
class HostConfig:
    """The node-level settings; ``group`` is the template of every group's ``Config`` (its
    ``id`` is the node id; its ``seed`` is mixed with the group number)."""

    group: Config
    quiesce: bool = True
    quiesce_after_ticks: int = 3
    stagger_ticks: int = 5
    backoff_factor_max: int = 8

    def validate(self) -> None:
        self.group.validate()
        check(self.quiesce_after_ticks > 0, "quiesce_after_ticks must be positive")
        check(self.stagger_ticks > 0, "stagger_ticks must be positive")
        check(self.backoff_factor_max >= 1, "backoff_factor_max must be at least 1")


@dataclass
class HostStats:
    ticks: int = 0
    quiesced: int = 0  # times a group went quiescent (either role)
    woken: int = 0
    campaigns: int = 0  # elections started by the election timer
    early_campaigns: int = 0  # preferred-leader first campaigns
    unknown_group_messages: int = 0


class _Group:
    __slots__ = ("campaign_at", "failures", "id", "idle_ticks", "node", "placed", "quiescent")

    def __init__(self, group: int, node: RawNode) -> None:
        self.id = group
        self.node = node
        self.quiescent = False
        self.idle_ticks = 0
        self.failures = 0  # campaigns started by the timer since a leader was last known
        self.placed = False  # the preferred node was determined (once the membership is known)
        self.campaign_at: int | None = None  # tick of the preferred node's first campaign


class MultiRaft:
    def __init__(self, config: HostConfig) -> None:
        config.validate()
        self.config = config
        self.id = config.group.id
        self.stats = HostStats()
        self.now = 0  # ticks since start
        self._groups: dict[int, _Group] = {}
        self._awake: dict[int, _Group] = {}  # insertion-ordered, for a deterministic tick order
        self._dirty: dict[int, _Group] = {}
        self._read_traffic: list[tuple[int, ReadTraffic]] = []  # of the last ready()
        self._notices: dict[int, list[int]] = {}  # commit notices per follower, of ready()
        # Whether a follower here applies a group's notified commit at once (None: every
        # group); otherwise the commit waits in the log for the group's next append, heartbeat
        # or tick (ctxstore: the groups whose sessions this node pushes to subscribers).
        self.prompt: Callable[[int], bool] | None = None
        self._live: set[int] = set()
        self._rng = random.Random(f"multi:{config.group.seed}:{self.id}")

    # -- membership of groups ------------------------------------------------------------------
    def add_group(self, group: int, storage: Storage, applied: int = 0) -> RawNode:
        """Host ``group`` on this node; ``applied`` is what the application already applied."""
        check(group not in self._groups, f"group {group} added twice")
        cfg = replace(
            self.config.group,
            seed=self.config.group.seed * 1_000_003 + group,
            quiesce=self.config.quiesce,
        )
        node = RawNode(replace(cfg, applied=applied), storage)
        g = _Group(group, node)
        self._groups[group] = g
        self._awake[group] = g
        self._dirty[group] = g
        return node

    def remove_group(self, group: int) -> RawNode:
        """Stop hosting ``group`` (this node left it): its RawNode is dropped with whatever it
        had to do; messages for it are counted (``unknown_group_messages``) and dropped, as for
        any group not hosted.  Returns the dropped node (for its last state)."""
        g = self._groups.pop(group)
        self._awake.pop(group, None)
        self._dirty.pop(group, None)
        if self._read_traffic:
            self._read_traffic = [(k, t) for k, t in self._read_traffic if k != group]
        return g.node

    def node(self, group: int) -> RawNode:
        return self._groups[group].node

    def groups(self) -> Iterator[int]:
        return iter(self._groups)

    def __contains__(self, group: int) -> bool:
        return group in self._groups

    def is_quiescent(self, group: int) -> bool:
        return self._groups[group].quiescent

    def awake_count(self) -> int:
        return len(self._awake)

    def live_peers(self) -> frozenset[int]:
        return frozenset(self._live)

    def leader(self, group: int) -> int:
        return self._groups[group].node.raft.lead

    def status(self, group: int) -> Status:
        return self._groups[group].node.status()

    # -- inputs --------------------------------------------------------------------------------
    def tick(self) -> None:
        self.now += 1
        self.stats.ticks += 1
        for g in list(self._awake.values()):
            self._tick_group(g)

    def _tick_group(self, g: _Group) -> None:
        r = g.node.raft
        if r.role is Role.LEADER and self.config.quiesce and self._maybe_quiesce(g):
            return
        g.node.tick()
        self._dirty[g.id] = g
        if r.role is Role.LEADER:
            g.failures = 0
            g.campaign_at = None
            return
        if r.lead != NONE:
            g.failures = 0
            g.campaign_at = None
            g.placed = True
            return
        if not g.placed and r.voters:
            # Known once the bootstrap membership is applied (first Ready after start).
            g.placed = True
            voters = sorted(r.voters)
            if len(voters) > 1 and voters[g.id % len(voters)] == self.id:
                g.campaign_at = self.now + (g.id // len(voters)) % self.config.stagger_ticks
        if r.election_elapsed == 0 and r.role is not Role.FOLLOWER:
            # The election timer just fired a campaign (pre-vote or vote): back off.
            self.stats.campaigns += 1
            g.failures += 1
            et = self.config.group.election_ticks
            factor = min(1 << (g.failures - 1), self.config.backoff_factor_max)
            g.node.set_election_timeout(et + self._rng.randrange(et * factor))
            g.campaign_at = None
        elif g.campaign_at is not None and self.now >= g.campaign_at:
            g.campaign_at = None
            if r.role is Role.FOLLOWER:
                self.stats.early_campaigns += 1
                g.node.campaign()

    def _maybe_quiesce(self, g: _Group) -> bool:
        """Before a leader's tick: quiesce ``g`` if it has been idle long enough."""
        node = g.node
        r = node.raft
        if not r.idle_leader() or node.has_ready() or node.outstanding:
            g.idle_ticks = 0
            return False
        last = r.log.last_index()
        live_caught_up = []
        voters_ok = 1 if r.id in r.voters else 0
        for f, pr in r.prs.items():
            if f == r.id or f not in self._live:
                continue  # a dead peer is caught up when it returns (peer_up wakes us)
            if pr.match != last:
                g.idle_ticks = 0
                return False
            live_caught_up.append(f)
            if f in r.voters:
                voters_ok += 1
        if voters_ok < majority(len(r.voters)):
            g.idle_ticks = 0
            return False
        g.idle_ticks += 1
        if g.idle_ticks < self.config.quiesce_after_ticks:
            return False
        node.quiesce(live_caught_up)
        self._dirty[g.id] = g
        self._quiesce(g)
        return True

    def _quiesce(self, g: _Group) -> None:
        g.quiescent = True
        g.idle_ticks = 0
        self._awake.pop(g.id, None)
        self.stats.quiesced += 1

    def _wake(self, g: _Group) -> None:
        if g.quiescent:
            g.quiescent = False
            g.idle_ticks = 0
            g.node.wake()
            self._awake[g.id] = g
            self.stats.woken += 1

    def step(self, group: int, m: Message) -> None:
        """Step a peer's message (already checked for sender and addressee by the transport)."""
        g = self._groups.get(group)
        if g is None:
            self.stats.unknown_group_messages += 1
            return
        r = g.node.raft
        if g.quiescent and not self._keeps_quiet(r, m):
            self._wake(g)
        g.node.step(m)
        self._dirty[group] = g
        if (
            isinstance(m, Heartbeat)
            and not g.quiescent
            and self.config.quiesce
            and r.accepts_quiesce(m)
        ):
            self._quiesce(g)  # (unanswered: Config.quiesce)
        elif g.quiescent and r.role is Role.LEADER and isinstance(m, HeartbeatResponse):
            pr = r.prs.get(m.frm)
            if pr is not None and pr.match != r.log.last_index():
                self._wake(g)  # a follower that is behind answered: it needs appends

    @staticmethod
    def _keeps_quiet(r: Raft, m: Message) -> bool:
        term = r.term
        if isinstance(m, Heartbeat):
            # Its leader's quiescing heartbeat, or one sent before it and delivered late, or a
            # read round of an awake leader: it brings nothing this follower lacks (the step
            # still answers it, which is all a read round needs).
            stale = m.frm == r.lead and m.commit <= r.log.committed
            return m.term == term and (m.quiesce or stale)
        if isinstance(m, HeartbeatResponse):
            return m.term == term  # a quiescent leader has no read waiting for it
        return False

    def propose(self, group: int, data: bytes) -> int:
        """Append ``data`` to the log of ``group`` (leader only); returns its index."""
        g = self._groups[group]
        self._wake(g)
        self._dirty[group] = g
        return g.node.propose(data)

    def propose_conf_change(self, group: int, change: ConfChange) -> int:
        g = self._groups[group]
        self._wake(g)
        self._dirty[group] = g
        return g.node.propose_conf_change(change)

    def read_index(self, group: int, context: bytes) -> None:
        g = self._groups[group]
        self._wake(g)
        self._dirty[group] = g
        g.node.read_index(context)

    def transfer_leader(self, group: int, to: int) -> None:
        g = self._groups[group]
        self._wake(g)
        self._dirty[group] = g
        g.node.transfer_leader(to)

    def campaign(self, group: int) -> None:
        g = self._groups[group]
        self._wake(g)
        self._dirty[group] = g
        g.node.campaign()

    def report_snapshot(self, group: int, peer: int, failed: bool) -> None:
        g = self._groups.get(group)
        if g is None:
            return
        self._wake(g)
        self._dirty[group] = g
        g.node.report_snapshot(peer, failed)

    def peer_up(self, peer: int) -> None:
        self._live.add(peer)
        for g in self._groups.values():
            r = g.node.raft
            if r.role is Role.LEADER and peer in r.prs:
                self._wake(g)
                g.node.heartbeat_next_tick()
                self._dirty[g.id] = g

    def peer_down(self, peer: int) -> None:
        self._live.discard(peer)
        for g in self._groups.values():
            r = g.node.raft
            if peer not in r.prs:
                continue
            if r.role is Role.LEADER:
                self._wake(g)
                g.node.report_unreachable(peer)
                self._dirty[g.id] = g
            elif r.lead == peer or r.lead == NONE:
                self._wake(g)
                self._dirty[g.id] = g

    # -- outputs -------------------------------------------------------------------------------
    def ready(self) -> list[tuple[int, Ready]]:
        """The Readies of the groups with work (at most one outstanding per group)."""
        out: list[tuple[int, Ready]] = []
        traffic: list[tuple[int, ReadTraffic]] = []
        dirty, self._dirty = self._dirty, {}
        notices = self._notices
        for group, g in dirty.items():
            if g.node.outstanding:
                t = g.node.read_traffic()
                if t is not None:
                    traffic.append((group, t))
            elif g.node.has_ready():
                rd = g.node.ready()
                if rd.soft_state is not None and rd.soft_state.lead != NONE:
                    g.failures = 0
                    g.campaign_at = None
                out.append((group, rd))
            r = g.node.raft
            if r.role is Role.LEADER:  # (after its appends: those carry the commit too)
                r.owed_commits(group, notices)
        self._read_traffic = traffic
        return out

    def take_commit_notices(self) -> dict[int, list[int]]:
        """The commit notices the groups' leaders here owe their followers, per follower: flat
        ``group, term, commit`` triples (``Raft.owed_commits``, gathered by ``ready()``), handed
        out once (read them, do not keep the dict: an empty one is handed out again)."""
        notices = self._notices
        if notices:  # (most passes have none: no new dict for them)
            self._notices = {}
        return notices

    def commit_notices(self, frm: int, notices: list[int]) -> None:
        """Take the commit notices of the leader ``frm`` (``take_commit_notices`` on its node):
        each group's follower here may commit and apply what it acknowledged at once instead
        of at the next append or heartbeat (only those ``prompt`` names: the others take the
        commit, and apply it with whatever makes them work next).  Groups not hosted here are
        skipped."""
        groups, dirty, prompt = self._groups, self._dirty, self.prompt
        for i in range(0, len(notices) - 2, 3):
            group = notices[i]
            g = groups.get(group)
            if g is None:
                continue  # (a group this node left, or not yet hosted: nothing to apply)
            if g.node.raft.commit_notice(frm, notices[i + 1], notices[i + 2]) and (
                prompt is None or prompt(group)
            ):
                dirty[group] = g

    def read_traffic(self) -> list[tuple[int, ReadTraffic]]:
        """The read traffic of the groups the last ``ready()`` found with a Ready outstanding
        (handed out once)."""
        traffic, self._read_traffic = self._read_traffic, []
        return traffic

    def advance(self, group: int, rd: Ready) -> None:
        g = self._groups[group]
        g.node.advance(rd)
        self._dirty[group] = g

    def has_dirty(self) -> bool:
        return bool(self._dirty)


__all__ = ["HostConfig", "HostStats", "MultiRaft"]
