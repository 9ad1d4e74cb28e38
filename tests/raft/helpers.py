"""Helpers that make a paper test a few lines long.

``Cluster`` runs RawNodes over MemoryStorage with a synchronous, perfect network: ``stabilize``
persists every Ready (storage = disk), delivers its messages, applies committed entries and
repeats until nothing moves.  Messages can be dropped per link (``cut``/``isolate``) or held
back and inspected (``capture``), dropped or altered in flight (``filter``, ``rewrite``), and
counted (``sent`` has every message handed to the network, ``delivered`` those that arrived).
Each node's ``Ready.read_states`` and ``Ready.snapshot`` are kept in ``read_states`` and
``snapshots``.  ``set_log`` rebuilds a node over a hand-made log (e.g. the paper's figures).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from raft import (
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    RawNode,
    ReadState,
    Ready,
    Snapshot,
)
from raft.messages import Message


def config(id_: int, **kw: object) -> Config:
    base: dict[str, object] = {"election_ticks": 10, "heartbeat_ticks": 1, "seed": 1}
    base.update(kw)
    return Config(id=id_, **base)  # type: ignore[arg-type]


def persist(storage: MemoryStorage, rd: Ready) -> None:
    """Write a Ready to MemoryStorage exactly as a driver writes it to disk."""
    if rd.snapshot is not None:
        storage.apply_snapshot(rd.snapshot)
    storage.append(rd.entries)
    if rd.hard_state is not None:
        storage.set_hard_state(rd.hard_state)


def lone_node(
    id_: int = 1,
    terms: Iterable[int] = (),
    term: int = 0,
    vote: int = 0,
    voters: tuple[int, ...] = (1, 2, 3),
    **cfg: object,
) -> tuple[RawNode, MemoryStorage]:
    """Node ``id_`` of ``voters``, restarted over a disk holding a log of ``terms`` in ``term``.

    Its peers are not wired: a test steps messages into it and reads its Readies (``drain``).
    """
    storage = MemoryStorage(ConfState(voters))
    storage.append(entries_of(terms))
    storage.set_hard_state(HardState(term, vote, 0))
    return RawNode(config(id_, **cfg), storage), storage


def drain(node: RawNode, storage: MemoryStorage) -> list[Message]:
    """Persist and advance every Ready of a lone node; return all its messages."""
    out: list[Message] = []
    while node.has_ready():
        rd = node.ready()
        persist(storage, rd)
        out += rd.messages + rd.persisted_messages
        node.advance(rd)
    return out


def entries_of(terms: Iterable[int], first: int = 1) -> list[Entry]:
    """Entries with the given terms at indexes ``first``, ``first + 1``, ... (paper figures)."""
    return [Entry(t, first + i) for i, t in enumerate(terms)]


class Cluster:
    def __init__(
        self,
        ids: Iterable[int] = (1, 2, 3),
        learners: Iterable[int] = (),
        **cfg: object,
    ) -> None:
        ids = list(ids)
        learners = list(learners)
        cs = ConfState(tuple(ids), tuple(learners))
        self.conf_state = cs
        self.cfg = cfg
        self.storage: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RawNode] = {}
        self.applied: dict[int, list[bytes]] = {}
        self.read_states: dict[int, list[ReadState]] = {}
        self.snapshots: dict[int, list[Snapshot]] = {}
        for i in ids + learners:
            self.storage[i] = MemoryStorage(cs)
            self.nodes[i] = RawNode(config(i, **cfg), self.storage[i])
            self._init_outputs(i)
        self.cut_links: set[tuple[int, int]] = set()
        self.filter: Callable[[Message], bool] | None = None  # return False to drop
        self.captured: list[Message] = []
        self.capture_types: tuple[type, ...] = ()
        self.rewrite: Callable[[Message], Message | None] | None = None  # None: drop
        self.delivered: list[Message] = []
        self.sent: list[Message] = []

    def _init_outputs(self, id_: int) -> None:
        self.applied[id_] = []
        self.read_states[id_] = []
        self.snapshots[id_] = []

    def add_node(self, id_: int, storage: MemoryStorage | None = None, **cfg: object) -> RawNode:
        """A new (empty) node that learns its membership from the leader."""
        self.storage[id_] = storage or MemoryStorage(ConfState())
        self.nodes[id_] = RawNode(config(id_, **{**self.cfg, **cfg}), self.storage[id_])
        self._init_outputs(id_)
        return self.nodes[id_]

    def set_log(
        self, id_: int, entries: list[Entry], term: int, vote: int = 0, commit: int = 0
    ) -> RawNode:
        """Rebuild node ``id_`` as if restarted over a disk holding ``entries`` and ``term``."""
        storage = MemoryStorage(self.conf_state)
        storage.append(entries)
        storage.set_hard_state(HardState(term, vote, commit))
        self.storage[id_] = storage
        self.nodes[id_] = RawNode(config(id_, **self.cfg), storage)
        self._init_outputs(id_)
        return self.nodes[id_]

    def log(self, id_: int) -> list[Entry]:
        """Every entry node ``id_`` holds (persisted or not), from its first index."""
        return self.raft(id_).log.all_entries()  # type: ignore[no-any-return]

    def terms(self, id_: int) -> list[int]:
        return [e.term for e in self.log(id_)]

    def raft(self, id_: int):  # type: ignore[no-untyped-def]
        return self.nodes[id_].raft

    # -- faults ------------------------------------------------------------------------------
    def cut(self, a: int, b: int) -> None:
        self.cut_links |= {(a, b), (b, a)}

    def isolate(self, a: int) -> None:
        for b in self.nodes:
            if b != a:
                self.cut(a, b)

    def heal(self) -> None:
        self.cut_links.clear()

    # -- driving -----------------------------------------------------------------------------
    def process(self, id_: int) -> list[Message]:
        """Persist, apply and advance every Ready of ``id_``; return the messages to send."""
        node = self.nodes[id_]
        out: list[Message] = []
        while node.has_ready():
            rd = node.ready()
            out += rd.messages
            persist(self.storage[id_], rd)
            out += rd.persisted_messages
            if rd.snapshot is not None:
                self.snapshots[id_].append(rd.snapshot)
            for e in rd.committed_entries:
                if e.type is EntryType.NORMAL and e.data:
                    self.applied[id_].append(e.data)
            self.read_states[id_] += rd.read_states
            node.advance(rd)
        return out

    def send(self, msgs: list[Message]) -> None:
        pending = list(msgs)
        while pending:
            m = pending.pop(0)
            self.sent.append(m)
            if (m.frm, m.to) in self.cut_links or m.to not in self.nodes:
                continue
            if self.rewrite is not None:
                rewritten = self.rewrite(m)
                if rewritten is None:
                    continue
                m = rewritten
            if self.filter is not None and not self.filter(m):
                continue
            if self.capture_types and isinstance(m, self.capture_types):
                self.captured.append(m)
                continue
            self.delivered.append(m)
            self.nodes[m.to].step(m)
            pending += self.process(m.to)

    def stabilize(self) -> None:
        for _ in range(1000):
            msgs: list[Message] = []
            for id_ in self.nodes:
                msgs += self.process(id_)
            if not msgs:
                return
            self.send(msgs)
        raise AssertionError("cluster did not stabilize")

    def tick(self, id_: int, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[id_].tick()
        self.stabilize()

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for node in self.nodes.values():
                node.tick()
            self.stabilize()

    def campaign(self, id_: int) -> None:
        self.nodes[id_].campaign()
        self.stabilize()

    def elect(self, id_: int) -> None:
        self.campaign(id_)
        assert self.raft(id_).role.value == "leader", f"{id_} did not win: {self.raft(id_)!r}"

    def propose(self, id_: int, data: bytes) -> int:
        index = self.nodes[id_].propose(data)
        self.stabilize()
        return index

    def leader(self) -> int | None:
        leaders = [i for i, n in self.nodes.items() if n.raft.role.value == "leader"]
        return leaders[0] if len(leaders) == 1 else None


def of_type(
    msgs: Iterable[Message], type_: type | tuple[type, ...], to: int | None = None
) -> list[Message]:
    """The messages of ``type_`` (sent to ``to`` when given), in order."""
    return [m for m in msgs if isinstance(m, type_) and (to is None or m.to == to)]


class Hold:
    """A ``Cluster.filter`` that holds back the messages ``match`` selects (and lets the rest
    through); ``release`` delivers the held ones."""

    def __init__(self, cluster: Cluster, match: Callable[[Message], bool]) -> None:
        self.cluster = cluster
        self.match = match
        self.held: list[Message] = []
        cluster.filter = self

    def __call__(self, m: Message) -> bool:
        if self.match(m):
            self.held.append(m)
            return False
        return True

    def release(self) -> None:
        held, self.held = self.held, []
        self.cluster.filter = None
        self.cluster.send(held)
        self.cluster.stabilize()
