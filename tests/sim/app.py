"""The application the simulated nodes run, its clients, and the product's invariants.

Each node's state machine is ``SimApp``: ctxstore's ``ConversationState`` (the product's state
machine, as ``ctxstore serve`` runs it) under a hash chain over every applied entry, which the
Raft checker compares across replicas.  Its snapshot carries the applied index, the chain and
the conversation state.

The clients (``Clients``) create sessions, append messages (each with a ``client_msg_id``),
retry appends whose outcome they did not learn (``timeout``, ``unavailable``, a crashed node:
the same id and content, possibly under another leader), retry some they did learn (a dedupe
must answer the same seq), and mark sessions read; they submit through a node's router
(ctxstore/router.py), which may forward, retry and batch (several appends at once).  The
product's invariants, checked as the nodes apply and as the clients hear answers, and over every
replica's history at the end of a run:

- every acknowledged append is in the history exactly once, at the seq it was acknowledged with;
  seqs are 1, 2, 3... with no gap;
- dedupe holds across leader changes: a ``client_msg_id`` is appended at one seq only, and every
  answer for it (first or deduped, from any leader) names that seq;
- read cursors never move back: on each replica as it applies, and in the answers clients get
  (an answer is never below one a client got before it asked);
- a read barrier's answer sees every append acknowledged before the read began.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from ctxstore import commands
from ctxstore.errors import ServiceError
from ctxstore.placement import group_of
from ctxstore.state import ConversationState
from raft import Entry, EntryType
from wire.protocol import Sender

from .checker import GENESIS, Checker, Violation, chain

SESSIONS_PER_GROUP = 2
MARK_READ = 3  # commands.MarkRead's tag: an entry is a msgpack array, the tag first

_snap_encoder = msgspec.msgpack.Encoder()
_snap_decoder = msgspec.msgpack.Decoder(tuple[int, bytes, bytes])


class History:
    """The product's history as every replica applies it, and what clients were told."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, int], str | None] = {}  # (session, seq) -> client_msg_id
        self.seq_of: dict[tuple[str, str], int] = {}  # (session, client_msg_id) -> its seq
        self.content: dict[tuple[str, str], str] = {}  # (session, client_msg_id) -> content
        self.acked: dict[tuple[str, str], int] = {}  # acknowledged to a client: seq
        self.acked_ids: dict[str, list[str]] = {}  # session -> acknowledged ids, in ack order
        self.acked_max: dict[str, int] = {}  # session -> highest acknowledged seq
        self.cursor_acked: dict[str, int] = {}  # session -> highest cursor a client was told
        self.acks = 0
        self.dedupes = 0

    def applied_append(self, node: int, cmd: commands.Append, result: object) -> None:
        if not isinstance(result, commands.Appended):
            raise Violation(f"n{node}: append {cmd.client_msg_id} in {cmd.session_id}: {result}")
        sid, cmid = cmd.session_id, cmd.client_msg_id
        assert cmid is not None
        key = (sid, cmid)
        if result.deduped:
            if self.seq_of.get(key) != result.seq:
                raise Violation(
                    f"n{node}: {sid} {cmid} deduped to seq {result.seq}, "
                    f"appended at {self.seq_of.get(key)}"
                )
            return
        seen = self.at.setdefault((sid, result.seq), cmid)
        if seen != cmid:
            raise Violation(f"n{node}: {sid} seq {result.seq} holds {cmid}, elsewhere {seen}")
        first = self.seq_of.setdefault(key, result.seq)
        if first != result.seq:
            raise Violation(
                f"n{node}: {sid} {cmid} appended twice, at seq {first} and {result.seq} "
                f"(dedupe failed)"
            )
        self.content.setdefault(key, cmd.content)

    def acknowledged(self, sid: str, cmid: str, result: commands.Appended) -> None:
        key = (sid, cmid)
        was = self.acked.get(key)
        if was is None:
            self.acked[key] = result.seq
            self.acked_ids.setdefault(sid, []).append(cmid)
        elif was != result.seq:
            raise Violation(f"{sid} {cmid} acknowledged at seq {was}, then at {result.seq}")
        if self.at.get((sid, result.seq)) != cmid:
            raise Violation(f"{sid} {cmid} acknowledged at seq {result.seq}, not applied there")
        self.acks += 1
        self.dedupes += result.deduped
        self.acked_max[sid] = max(self.acked_max.get(sid, 0), result.seq)

    def cursor_told(self, sid: str, seq: int, floor: int) -> None:
        """A mark-read was answered with cursor ``seq``; ``floor``: the highest cursor a client
        had been told when it was sent (an answer to a concurrent request may be lower)."""
        if seq < floor:
            raise Violation(f"{sid}: a client was told cursor {floor}, then {seq} (moved back)")
        self.cursor_acked[sid] = max(self.cursor_acked.get(sid, 0), seq)

    def check_replica(self, node: int, state: ConversationState, sessions: list[str]) -> None:
        """Every acknowledged append of ``sessions`` is in the replica's history exactly once
        at its seq; the history's seqs have no gap."""
        for sid in sessions:
            res = state.read(sid, 0, 1 << 30)
            if res is None:
                if any(k[0] == sid for k in self.acked):
                    raise Violation(f"n{node}: session {sid} with acknowledged appends is gone")
                continue
            seqs = [m.seq for m in res.messages]
            if seqs != list(range(res.first_seq, res.last_seq + 1)):
                raise Violation(f"n{node}: {sid} history seqs {seqs[:5]}... have gaps")
            ids = [m.client_msg_id for m in res.messages]
            if len(set(ids)) != len(ids):
                raise Violation(f"n{node}: {sid} holds a client_msg_id twice")
            by_seq = {m.seq: m for m in res.messages}
            for (s, cmid), seq in self.acked.items():
                if s != sid or seq < res.first_seq:
                    continue
                m = by_seq.get(seq)
                if m is None or m.client_msg_id != cmid or m.content != self.content[(s, cmid)]:
                    raise Violation(f"n{node}: acknowledged {sid} {cmid} is not at seq {seq}")


class SimApp:
    """One node's state machine (``raft.pipeline.StateMachine``): the hash chain, reported to
    the checker, over ctxstore's ``ConversationState``, with the per-replica product checks."""

    def __init__(
        self,
        node: int,
        group_count: int,
        checker: Checker,
        history: History,
        term: Callable[[int], int],
    ) -> None:
        self.node = node
        self.checker = checker
        self.history = history
        self.term = term  # group -> the node's current term (for the checker)
        self.state = ConversationState(groups=group_count)
        self.index: dict[int, int] = {}
        self.chain: dict[int, bytes] = {}
        self.cursors: dict[str, int] = {}  # session -> its owner's cursor here, as applied
        self.on_command: Callable[[], None] = lambda: None  # a client command was applied

    def apply(self, group: int, entries: list[Entry]) -> list[object]:
        node = self.node
        self.checker.on_committed(node, group, self.term(group), entries)
        state = self.chain[group]
        index = self.index[group]
        for e in entries:
            if e.index != index + 1:
                raise Violation(f"g{group} n{node}: applied {e.index} after {index}")
            data = e.data if e.type is EntryType.NORMAL else b"conf:" + e.data
            state = chain(state, data)
            index = e.index
            # A proposal's bytes are unique (a retry's ``inserted_at`` differs), but for a
            # mark-read's (the same seq marked twice): those may be applied at two indexes.
            proposal = bool(e.data) and e.type is EntryType.NORMAL and e.data[1] != MARK_READ
            self.checker.on_apply(node, group, e.index, data, state, proposal)
        self.chain[group] = state
        self.index[group] = index
        results = self.state.apply(group, entries)
        for e, result in zip(entries, results, strict=True):
            if not e.data or e.type is not EntryType.NORMAL:
                continue
            self.on_command()
            cmd = commands.decode_command(e.data)
            if isinstance(cmd, commands.Append):
                self.history.applied_append(node, cmd, result)
                if cmd.sender == "user":  # (other senders leave the cursors alone)
                    self._cursor(group, cmd.session_id)
            elif isinstance(cmd, commands.AppendBatch):
                if not isinstance(result, list) or len(result) != len(cmd.appends):
                    raise Violation(f"n{node}: a batch of {len(cmd.appends)} gave {result}")
                for one, one_result in zip(cmd.appends, result, strict=True):
                    self.history.applied_append(node, one, one_result)
                    if one.sender == "user":
                        self._cursor(group, one.session_id)
            elif isinstance(cmd, commands.MarkRead):
                if not isinstance(result, commands.ReadMarked):
                    raise Violation(f"n{node}: mark read {cmd} refused: {result}")
                self._cursor(group, cmd.session_id)
        return results

    def _cursor(self, group: int, sid: str) -> None:
        """The owner's cursor of ``sid`` (its only reader in the simulation) after an entry
        that may move it: never behind what this replica had."""
        now = self.state.read_cursor(sid, owner(sid)) or 0
        was = self.cursors.get(sid, 0)
        if now < was:
            raise Violation(f"g{group} n{self.node}: {sid} cursor moved back {was} -> {now}")
        self.cursors[sid] = now

    def snapshot(self, group: int) -> bytes:
        inner = self.state.snapshot(group)
        return _snap_encoder.encode((self.index[group], self.chain[group], inner))

    def restore(self, group: int, data: bytes) -> None:
        index, state, inner = (0, GENESIS, b"") if not data else _snap_decoder.decode(data)
        self.state.restore(group, inner)
        self.index[group] = index
        self.chain[group] = state
        for sid in self.state.session_ids(group):
            self.cursors[sid] = self.state.read_cursor(sid, owner(sid)) or 0
        self.checker.on_restore(self.node, group, index, state)


class Submission:
    """A command a client submits through a node's router, and what to do with its outcome
    (``append``: an append, which the router may batch with others)."""

    __slots__ = ("append", "command", "done")

    def __init__(
        self,
        command: commands.Command,
        done: Callable[[object, object], None],
        append: bool = False,
    ) -> None:
        self.command = command
        self.done = done
        self.append = append

    def data(self) -> bytes:
        return commands.encode_command(self.command)


# The failures a client may be told (ctxstore/router.py): the outcome is unknown ("timeout"),
# or nothing was done ("unavailable").  Any other code ("internal"...) is a broken router.
RETRYABLE_CODES = ("timeout", "unavailable")


def told_failure(what: str, exc: object) -> None:
    """A request failed: only in a way the router may fail it."""
    if not isinstance(exc, ServiceError) or exc.code not in RETRYABLE_CODES:
        raise Violation(f"{what}: told {exc!r}")


def owner(sid: str) -> str:
    """The user who owns session ``sid`` (the clients create every session so)."""
    return f"u-{sid}"


def session_ids(groups: int) -> dict[int, list[str]]:
    """``SESSIONS_PER_GROUP`` session ids placed in each group."""
    out: dict[int, list[str]] = {g: [] for g in range(groups)}
    k = 0
    while any(len(ids) < SESSIONS_PER_GROUP for ids in out.values()):
        sid = f"s{k}"
        g = group_of(sid, groups)
        if len(out[g]) < SESSIONS_PER_GROUP:
            out[g].append(sid)
        k += 1
    return out


class Clients:
    """What the clients of every node ask, and what they learn (see the module doc)."""

    def __init__(self, rng: random.Random, groups: int, history: History) -> None:
        self.rng = rng
        self.history = history
        self.sessions = session_ids(groups)
        self.created: set[str] = set()
        self.unknown: dict[str, dict[str, str]] = {}  # session -> cmid -> content (no answer)
        self.counter = 0
        # Broken invariants seen in answers (the pipeline logs what a callback raises: the
        # simulation raises these after the round).
        self.violations: list[Violation] = []

    def guard(self, done: Callable[[object, object], None]) -> Callable[[object, object], None]:
        def guarded(result: object, exc: object) -> None:
            try:
                done(result, exc)
            except Violation as v:
                self.violations.append(v)

        return guarded

    def command(self, group: int) -> list[Submission]:
        """The next commands for ``group``, to submit together through one node's router, and
        what to do with each outcome: usually one; sometimes several appends, which the router
        proposes in one ``AppendBatch`` entry (its batches of a loop iteration)."""
        self.counter += 1
        n = self.counter
        for sid in self.sessions[group]:
            if sid not in self.created:
                cmd: commands.Command = commands.CreateSession(
                    session_id=sid, user_id=owner(sid), agent_id="a", metadata={}, created_at=n
                )
                return [Submission(cmd, self._created(sid))]
        rng = self.rng
        if rng.random() < 0.15:  # several appends at once: the router batches them
            return self._several(group, rng.randint(2, 4))
        sid = rng.choice(self.sessions[group])
        x = rng.random()
        unknown = self.unknown.setdefault(sid, {})
        acked = self.history.acked_ids.get(sid, [])
        if x < 0.2 and unknown:  # retry an append whose outcome we do not know
            cmid = rng.choice(sorted(unknown))
            return [self._append(sid, cmid, unknown[cmid], n)]
        if x < 0.25 and acked:  # retry one we know: a dedupe
            cmid = rng.choice(acked)
            return [self._append(sid, cmid, self.history.content[(sid, cmid)], n)]
        if x < 0.35:
            top = self.history.acked_max.get(sid, 0)
            cmd = commands.MarkRead(session_id=sid, user_id=owner(sid), seq=rng.randint(0, top))
            return [Submission(cmd, self._marked(sid))]
        return [self.new_append(sid)]

    def new_append(self, sid: str) -> Submission:
        """An append of a new message (a new ``client_msg_id``) to session ``sid``."""
        self.counter += 1
        n = self.counter
        cmid = f"c{n}"
        self.unknown.setdefault(sid, {})[cmid] = content = f"m{n}"
        return self._append(sid, cmid, content, n)

    def _several(self, group: int, count: int) -> list[Submission]:
        """``count`` appends of the group's sessions: new ones, or retries of appends whose
        outcome is unknown (the same id twice in one batch: the second is a dedupe)."""
        out: list[Submission] = []
        for _ in range(count):
            self.counter += 1
            n = self.counter
            sid = self.rng.choice(self.sessions[group])
            unknown = self.unknown.setdefault(sid, {})
            if unknown and self.rng.random() < 0.3:
                cmid = self.rng.choice(sorted(unknown))
            else:
                cmid = f"c{n}"
                unknown[cmid] = f"m{n}"
            out.append(self._append(sid, cmid, unknown[cmid], n))
        return out

    def _append(self, sid: str, cmid: str, content: str, n: int) -> Submission:
        sender: Sender = "user" if int(cmid[1:]) % 3 == 0 else "agent"  # (the same on a retry)
        cmd = commands.Append(
            session_id=sid,
            sender=sender,
            sender_id=owner(sid) if sender == "user" else "a",
            kind="text",
            content=content,
            metadata={},
            client_msg_id=cmid,
            expected_seq=None,
            token_count=None,
            inserted_at=n,  # a retry's entry differs in bytes, never in fingerprint
        )
        return Submission(cmd, self._appended(sid, cmid), append=True)

    def _created(self, sid: str) -> Callable[[object, object], None]:
        def done(result: object, exc: object) -> None:
            if exc is not None:
                told_failure(f"create {sid}", exc)
            else:
                if not isinstance(result, commands.SessionCreated):
                    raise Violation(f"create {sid}: {result}")
                self.created.add(sid)

        return self.guard(done)

    def _appended(self, sid: str, cmid: str) -> Callable[[object, object], None]:
        def done(result: object, exc: object) -> None:
            if exc is not None:
                told_failure(f"append {sid} {cmid}", exc)
                return  # unknown outcome: retried later
            if not isinstance(result, commands.Appended):
                raise Violation(f"append {sid} {cmid}: {result}")
            self.history.acknowledged(sid, cmid, result)
            self.unknown.get(sid, {}).pop(cmid, None)

        return self.guard(done)

    def _marked(self, sid: str) -> Callable[[object, object], None]:
        floor = self.history.cursor_acked.get(sid, 0)

        def done(result: object, exc: object) -> None:
            if exc is not None:
                told_failure(f"mark read {sid}", exc)
            else:
                if not isinstance(result, commands.ReadMarked):
                    raise Violation(f"mark read {sid}: {result}")
                self.history.cursor_told(sid, result.seq, floor)

        return self.guard(done)

    def read_floor(self, group: int) -> dict[str, int]:
        """What a read of ``group`` asked now must see: each session's highest acked seq."""
        return {sid: self.history.acked_max.get(sid, 0) for sid in self.sessions[group]}
