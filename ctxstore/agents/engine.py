"""The dispatch engine: on the leader of each session's group, call the session's agent for its
new user messages, push the streamed chunks live, and store the assembled reply exactly once
(design §5.5; docs/agents.md).

Driven by replicated state (ctxstore/state.py), so a new leader resumes what an old one left:
- each session keeps ``last_user_seq``, the cursor ``dispatched_seq`` and an in-flight marker
  (trigger seq, attempt).  User messages past the cursor arm a **debounce** on the group's
  leader (sliding: each new one restarts it, bounded by ``MAX_WAIT_FACTOR`` x ``debounce_ms``
  after the first); when it fires, **one task per session** runs the calls;
- a call starts by committing ``DispatchBegin`` (trigger = the newest user seq, attempt = the
  marker's + 1 for the same trigger, else 1), and ends by committing ``DispatchEnd`` with the
  reply (or a ``system`` message saying the dispatch was dropped), which the state machine
  applies only while the marker is still that (trigger, attempt): a deposed leader's late reply
  or a second outcome of the same attempt stores nothing.  The reply's ``client_msg_id`` is
  ``agent-reply:<trigger>:<attempt>`` (``agent-drop:...`` for a drop): deterministic, so a
  retried proposal is deduplicated too;
- a leader that loses a group cancels that group's calls (their chunks stop); the new leader's
  ``on_leader_change`` finds the sessions past their cursor and starts the next attempt.
Failures: a stream that ends without ``finish``/``abort``, malformed chunks, an ``error`` chunk,
a timeout (whole call or between chunks), a connection failure, 408, 429 and 5xx are retried
with backoff (``backoff_base_s`` x 2^n up to ``backoff_max_s``, full jitter; ``Retry-After``
honoured on 429/503, at most ``retry_after_max_s``) until ``max_attempts``; other 4xx, a wrong
content type and an invalid reply are not.  Appends never wait on any of this.

An agent is registered in the group its id hashes to, which with more than three nodes the
session's leader may not host: such an agent is read from a replica of its group through the
relay (``fetch_agent``, a ``get_agent`` served after that replica's barrier) and kept here for
``remote_agent_ttl_s`` (an update or a disable reaches this node's calls within that time; an
agent found absent is asked again after it too); past it, a call still starts with the kept
record while a fresh one is fetched.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import msgspec
import msgspec.json

from wire.parts import PartError, check_parts
from wire.protocol import MESSAGE_BYTES_MAX, METADATA_BYTES_MAX, Message
from wire.web_codec import json_stand_in

from .. import commands
from ..context import Plan, WindowCache, answer, from_history, from_memory, window_tokenizer
from ..history import History, HistoryUnavailable
from ..placement import group_of
from ..records import NO_PARTS, AgentRecord, StoredMessage, encode_parts, message_to_wire
from ..router import RouteError, Router
from ..state import ConversationState, fingerprint, payload_bytes
from ..subscriptions import Subscriptions
from ..tokens import TokenCounters, offload
from .assemble import Assembler
from .http import HttpError
from .pool import Pool
from .registry import origin_of, target_of
from .stream import StreamDecoder, StreamError, framing_of

logger = logging.getLogger(__name__)

MAX_WAIT_FACTOR = 5
DRAIN_AFTER_END_S = 1.0  # how long the rest of a body is read after finish/abort (keep-alive)
BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
_json = msgspec.json.Encoder(enc_hook=json_stand_in)  # (an extension stored before refusal)
_msgpack = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class DispatchLimits:
    history_messages_max: int = 10_000  # messages a call carries (``all``, ``tail N``)
    history_bytes_max: int = 8 * 1024 * 1024  # their encoded size (the oldest left out)
    backoff_base_s: float = 0.25
    backoff_max_s: float = 5.0
    retry_after_max_s: float = 60.0
    end_tries_max: int = 8  # proposals of one DispatchEnd before the task gives up
    absent_agents_max: int = 10_000  # agents known absent here (negative cache, LRU)
    skipped_max: int = 10_000  # sessions not called on that knowledge, remembered a while
    skipped_recent_s: float = 5.0  # a skip this recent is undone when the agent is saved
    starts_per_pass: int = 16  # calls started in one loop pass; the others in the next passes
    remote_agent_ttl_s: float = 5.0  # an agent read from another node's group is read again after
    remote_agents_max: int = 10_000  # agents of groups not hosted here kept (LRU)


class Histogram:
    __slots__ = ("counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS_S, seconds)] += 1
        self.sum_s += seconds


@dataclass
class AgentStats:
    """Per agent, on this node (as the leader of the sessions' groups)."""

    attempts: int = 0  # calls started
    replies: int = 0  # replies stored
    in_flight: int = 0
    chunks: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # attempts failed, by reason
    drops: dict[str, int] = field(default_factory=dict)  # dispatches dropped, by reason
    first_chunk: Histogram = field(default_factory=Histogram)  # user message acked -> 1st chunk
    duration: Histogram = field(default_factory=Histogram)  # one call, start to end


class Failure(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool, after_s: float = 0.0):
        super().__init__(detail)
        self.reason, self.detail, self.retryable, self.after_s = reason, detail, retryable, after_s


def _status_failure(status: int, retry_after: str, cap_s: float) -> Failure:
    after = 0.0
    if status in (429, 503) and retry_after:
        after = _retry_after_s(retry_after, cap_s)
    if status in (408, 429) or status >= 500:
        return Failure(f"http_{status}", f"the agent answered {status}", True, after)
    return Failure(f"http_{status}", f"the agent answered {status}", False)


def _retry_after_s(value: str, cap_s: float) -> float:
    value = value.strip()
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return max(0.0, min(seconds, cap_s))


def ui_message(m: Message) -> dict[str, Any]:
    """A stored message as the webhook gets it: the AI SDK UIMessage shape plus ctxstore's."""
    role = m.role or {"user": "user", "agent": "assistant", "system": "system"}[m.sender]
    parts = m.parts if m.parts is not None else [{"type": "text", "text": m.content}]
    return {
        "id": f"{m.session_id}:{m.seq}", "role": role, "parts": parts, "metadata": m.metadata,
        "seq": m.seq, "sender": m.sender, "sender_id": m.sender_id, "kind": m.kind,
        "inserted_at": m.inserted_at,
    }  # fmt: skip


class Dispatcher:
    def __init__(
        self,
        node_id: int,
        state: ConversationState,
        router: Router,
        leader_of: Callable[[int], int],
        groups: int,
        history: History,
        subscriptions: Subscriptions,
        counters: TokenCounters,
        clock_ms: Callable[[], int],
        window_cache: WindowCache,
        pool: Pool | None = None,
        limits: DispatchLimits | None = None,
    ) -> None:
        self.node_id = node_id
        self.state = state
        self.router = router
        self.leader_of = leader_of
        self.groups = groups
        self.history = history
        self.subscriptions = subscriptions
        self.counters = counters
        self.clock_ms = clock_ms
        self.window_cache = window_cache  # the node's copies of windows' older messages
        self.pool = pool or Pool()
        self.limits = limits or DispatchLimits()
        self.running = False
        self.stats: dict[str, AgentStats] = {}
        self.relay: Callable[[str, int, int, list[dict[str, Any]]], None] | None = None  # to peers
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Pacing: sessions whose debounce fired beyond ``starts_per_pass`` in a loop pass wait
        # here (in order) for the next passes, so that a burst of user messages does not start
        # every call (a commit, a history read, a request each) in one pass, nor line up their
        # streams' chunks.
        self._due: dict[str, None] = {}
        self._started = 0  # calls started in this loop pass
        self._pass_scheduled = False
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}  # sid -> (first, timer)
        # sid -> when its newest user message applied here, for the sessions armed, due, running
        # or waiting for their agent's lookup (a session whose agent is absent holds none).
        self._acked_at: dict[str, float] = {}
        self._lookups: dict[str, dict[str, bool]] = {}  # agent id -> sessions waiting (resume)
        # Negative cache: agents a barrier found absent (or disabled), so that a session whose
        # agent is not registered costs no barrier per user message; an entry leaves when the
        # agent is saved (``on_agent``) or its group's state replaced; the least recently used
        # leaves beyond ``absent_agents_max``.
        self._absent: OrderedDict[str, None] = OrderedDict()
        # sid -> (agent, when, resume), the least recently skipped first
        self._skipped: OrderedDict[str, tuple[str, float, bool]] = OrderedDict()
        self.lookups = 0  # barriers run to read an agent unknown here
        # Agents of groups this node does not host (scale-out): read from a replica through the
        # relay (set by the client service), kept with when they were read (None: absent or
        # unreadable as of then); ``remote_lookups`` counts the reads.
        self.fetch_agent: Callable[[str, Callable[[AgentRecord | None, bool], None]], None] | None
        self.fetch_agent = None
        self._remote: OrderedDict[str, tuple[AgentRecord | None, float]] = OrderedDict()
        self.remote_lookups = 0
        self.absent_hits = 0  # arms skipped on the negative cache (barriers saved)
        self._random = random.Random()
        # The loop, kept from ``start`` (asyncio.get_running_loop() makes a getpid() system
        # call each time; ``on_message`` runs for every user message a leader applies).
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the node's side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.running = True
        for group in range(self.groups):
            if self._leads(group):
                self._resume(group)

    async def stop(self) -> None:
        self.running = False
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._due.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.pool.close()

    def on_message(self, group: int, message: StoredMessage) -> None:
        """An applied message (state observer, inside apply): a user's arms the debounce."""
        if message.sender != "user" or not self.running or not self._leads(group):
            return
        self._acked_at[message.session_id] = self._running_loop().time()
        self._arm(message.session_id)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        return asyncio.get_running_loop() if loop is None else loop

    def on_leader_change(self, group: int, leader: int) -> None:
        if not self.running:
            return
        if leader == self.node_id:
            self._resume(group)
            return
        for sid in [s for s in self._timers if group_of(s, self.groups) == group]:
            self._timers.pop(sid)[1].cancel()
            self._unacked(sid)
        for sid in [s for s in self._due if group_of(s, self.groups) == group]:
            del self._due[sid]
            self._unacked(sid)
        for sid, task in list(self._tasks.items()):
            if group_of(sid, self.groups) == group:
                task.cancel()  # the new leader resumes it with the next attempt

    def on_agent(self, agent_id: str) -> None:
        """An agent was saved (created, updated, disabled) on this replica, or (``""``) a group's
        agents were replaced by a snapshot: forget that it was absent.  Sessions skipped on
        that knowledge in the last ``skipped_recent_s`` (their user message may have been
        applied after the agent's creation committed, before this replica applied it) are
        armed again; older ones wait for their next user message, as before."""
        if agent_id:
            self._absent.pop(agent_id, None)
        else:
            self._absent.clear()
        if not self.running or not self._skipped:
            return
        horizon = asyncio.get_running_loop().time() - self.limits.skipped_recent_s
        again = [(sid, resume) for sid, (aid, at, resume) in self._skipped.items()
                 if (not agent_id or aid == agent_id) and at >= horizon]  # fmt: skip
        for sid, _ in again:
            del self._skipped[sid]
        # Not from inside apply (the state observer): the arm may need a barrier.
        loop = asyncio.get_running_loop()
        for sid, resume in again:
            if self._leads(group_of(sid, self.groups)):
                loop.call_soon(self._arm, sid, resume)

    def in_flight(self) -> int:
        return len(self._tasks)

    # -- scheduling --------------------------------------------------------------------------------
    def _leads(self, group: int) -> bool:
        return self.leader_of(group) == self.node_id

    def _resume(self, group: int) -> None:
        for sid in self.state.undispatched(group):
            self._arm(sid, resume=True)

    def _hosts_agent(self, agent_id: str) -> bool:
        return (
            self.fetch_agent is None or group_of(agent_id, self.groups) in self.router.driver.host
        )

    def _agent(self, agent_id: str) -> AgentRecord | None:
        """The agent as this node knows it: its group's state here, else the record read from
        a replica (kept past ``remote_agent_ttl_s`` while a fresh read is on its way)."""
        if self._hosts_agent(agent_id):
            return self.state.get_agent(agent_id)
        kept = self._remote.get(agent_id)
        if kept is None:
            return None
        self._remote.move_to_end(agent_id)
        agent, read_at = kept
        loop = asyncio.get_running_loop()
        stale = loop.time() - read_at > self.limits.remote_agent_ttl_s
        if stale and agent_id not in self._lookups:
            self._lookups[agent_id] = {}
            loop.call_soon(self._lookup, agent_id)
        return agent

    def _absent_here(self, agent_id: str) -> bool:
        """Known absent (or disabled) as of a recent barrier or read: no lookup per message."""
        if self._hosts_agent(agent_id):
            return agent_id in self._absent
        kept = self._remote.get(agent_id)
        return (
            kept is not None
            and (kept[0] is None or kept[0].status != "active")
            and asyncio.get_running_loop().time() - kept[1] <= self.limits.remote_agent_ttl_s
        )

    def _active_agent(self, session_id: str) -> AgentRecord | None:
        view = self.state.dispatch_state(session_id)
        if view is None:
            return None
        agent = self._agent(view[0])
        return agent if agent is not None and agent.status == "active" else None

    def _arm(self, sid: str, resume: bool = False, checked: bool = False) -> None:
        if sid in self._tasks or sid in self._due:
            return  # the running (or starting) task re-checks the cursor when it ends
        view = self.state.dispatch_state(sid)
        agent = None if view is None else self._agent(view[0])
        if agent is None or agent.status != "active":
            if view is None or checked:
                self._unacked(sid)
                return
            if self._absent_here(view[0]):
                if view[0] in self._absent:
                    self._absent.move_to_end(view[0])
                self.absent_hits += 1
                self._skip(sid, view[0], resume)
                return
            self._refresh(view[0], sid, resume)
            return
        loop = self._running_loop()
        now = loop.time()
        debounce = 0.0 if resume else agent.debounce_ms / 1000
        first = now
        armed = self._timers.pop(sid, None)
        if armed is not None:
            first = armed[0]
            armed[1].cancel()
        at = min(now + debounce, first + debounce * MAX_WAIT_FACTOR)
        self._timers[sid] = (first, loop.call_at(at, self._fire, sid))

    def _refresh(self, agent_id: str, sid: str, resume: bool) -> None:
        """The agent is unknown here (or disabled): this replica of its group may not have
        applied its registration yet (a follower learns a commit with the next message, and
        an idle group sends none).  Read it after a barrier of its group, then arm again; one
        barrier per agent at a time, shared by the sessions waiting for it."""
        waiting = self._lookups.get(agent_id)
        if waiting is not None:
            waiting[sid] = waiting.get(sid, False) or resume
            return
        self._lookups[agent_id] = {sid: resume}
        # Not from inside apply (the driver's pass): the barrier goes through the driver.
        asyncio.get_running_loop().call_soon(self._lookup, agent_id)

    def _skip(self, sid: str, agent_id: str, resume: bool) -> None:
        self._unacked(sid)  # (armed again by ``on_agent``: no first-chunk time)
        skipped = self._skipped
        skipped[sid] = (agent_id, self._running_loop().time(), resume)
        skipped.move_to_end(sid)
        if len(skipped) > self.limits.skipped_max:
            skipped.popitem(last=False)  # the oldest skip (O(1), unlike a dict's first key)

    def _lookup(self, agent_id: str) -> None:
        if not self.running:
            self._unwait(agent_id)
            return
        if not self._hosts_agent(agent_id):
            self._fetch(agent_id)
            return
        self.lookups += 1
        fut = self.router.barrier(group_of(agent_id, self.groups))

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None or not self.running:
                self._unwait(agent_id)
                return  # no barrier now: the next user message or leader change tries again
            agent = self.state.get_agent(agent_id)
            if agent is None or agent.status != "active":
                # Absent as of the barrier: remembered until it is saved (``on_agent``).
                self._absent[agent_id] = None
                self._absent.move_to_end(agent_id)
                if len(self._absent) > self.limits.absent_agents_max:
                    self._absent.popitem(last=False)
            self._looked_up(agent_id, agent)

        fut.add_done_callback(done)

    def _fetch(self, agent_id: str) -> None:
        """Read an agent of a group not hosted here from one of its replicas (the relay)."""
        assert self.fetch_agent is not None
        self.remote_lookups += 1

        def done(agent: AgentRecord | None, answered: bool) -> None:
            if not answered or not self.running:
                self._unwait(agent_id)
                return  # no replica answered: the next user message or leader change tries again
            self._remote[agent_id] = (agent, asyncio.get_running_loop().time())
            self._remote.move_to_end(agent_id)
            if len(self._remote) > self.limits.remote_agents_max:
                self._remote.popitem(last=False)
            self._looked_up(agent_id, agent)

        self.fetch_agent(agent_id, done)

    def _looked_up(self, agent_id: str, agent: AgentRecord | None) -> None:
        """The sessions waiting for ``agent_id`` learn what it is now."""
        sessions = self._lookups.pop(agent_id, {})
        if agent is None or agent.status != "active":
            for waiting_sid, waiting_resume in sessions.items():
                self._skip(waiting_sid, agent_id, waiting_resume)
            return
        for waiting_sid, waiting_resume in sessions.items():
            if self._leads(group_of(waiting_sid, self.groups)):
                self._arm(waiting_sid, waiting_resume, checked=True)
            else:
                self._unacked(waiting_sid)  # (the new leader resumes it)

    def _unwait(self, agent_id: str) -> None:
        """The lookup of ``agent_id`` learned nothing: its sessions wait for their next user
        message or leader change, with no start time kept meanwhile."""
        for sid in self._lookups.pop(agent_id, {}):
            self._unacked(sid)

    def _unacked(self, sid: str) -> None:
        """``sid`` is neither armed, due nor running here: no first-chunk start time for it."""
        if sid not in self._tasks and sid not in self._timers and sid not in self._due:
            self._acked_at.pop(sid, None)

    def _fire(self, sid: str) -> None:
        self._timers.pop(sid, None)
        if not self.running or sid in self._tasks:
            return
        if self._started >= max(1, self.limits.starts_per_pass) or self._due:  # (in order)
            self._due[sid] = None
            return
        self._start(sid)

    def _next_pass(self) -> None:
        """A new loop pass: a new budget of starts, first for the sessions waiting."""
        self._pass_scheduled = False
        self._started = 0
        due = self._due
        while due and self._started < max(1, self.limits.starts_per_pass):
            sid = next(iter(due))
            del due[sid]
            if self.running and sid not in self._tasks and self._leads(group_of(sid, self.groups)):
                self._start(sid)

    def _start(self, sid: str) -> None:
        loop = asyncio.get_running_loop()
        if not self._pass_scheduled:
            self._pass_scheduled = True
            loop.call_soon(self._next_pass)  # (runs in the next pass)
        self._started += 1
        task = loop.create_task(self._run(sid))
        self._tasks[sid] = task
        task.add_done_callback(lambda t: self._done(sid, t))

    def _done(self, sid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(sid) is task:
            del self._tasks[sid]
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("dispatch of session %r failed: %r", sid, exc, exc_info=exc)
        if not self.running:
            return
        # User messages came during the call; or the task was cancelled by a leadership loss
        # and this node leads the group again (its resume skipped the session: the task was
        # still here).
        view = self.state.dispatch_state(sid)
        if view is not None and view[2] > view[3] and self._leads(group_of(sid, self.groups)):
            self._arm(sid, resume=task.cancelled())
        else:
            self._acked_at.pop(sid, None)

    # -- one session's dispatches ------------------------------------------------------------------
    async def _run(self, sid: str) -> None:
        group = group_of(sid, self.groups)
        for _ in range(1000):  # bounded: each pass commits a begin or an end, or returns
            view = self.state.dispatch_state(sid)
            if view is None:
                return
            agent_id, user_id, last_user, dispatched, inflight = view
            agent = self._active_agent(sid)
            if last_user <= dispatched or agent is None:
                return
            trigger = last_user
            attempt = inflight[1] + 1 if inflight is not None and inflight[0] == trigger else 1
            stats = self._stats(agent_id)
            if attempt > agent.max_attempts:  # spent by earlier leaders
                assert inflight is not None
                await self._drop(sid, group, agent, trigger, inflight[1], "attempts",
                                 "every attempt failed")  # fmt: skip
                continue
            begin = commands.DispatchBegin(sid, trigger, attempt, self.clock_ms())
            try:
                begun = await self.router.submit(group, commands.encode_command(begin))
            except RouteError as e:
                logger.info("dispatch of %r: begin not committed (%s); again", sid, e)
                await asyncio.sleep(self._backoff(1))
                continue
            if not isinstance(begun, commands.DispatchBegun):
                await asyncio.sleep(0)  # the state moved (another attempt, the cursor): re-read
                continue
            stats.attempts += 1
            stats.in_flight += 1
            started = asyncio.get_running_loop().time()
            try:
                reply = await self._call(agent, sid, user_id, trigger, attempt, stats)
            except Failure as f:
                stats.failures[f.reason] = stats.failures.get(f.reason, 0) + 1
                logger.info("agent %r, session %r, trigger %d, attempt %d failed: %s (%s)",
                            agent.id, sid, trigger, attempt, f.reason, f.detail)  # fmt: skip
                if f.retryable and attempt < agent.max_attempts:
                    await asyncio.sleep(max(f.after_s, self._backoff(attempt)))
                    continue
                await self._drop(sid, group, agent, trigger, attempt, f.reason, f.detail)
                continue
            finally:
                stats.in_flight -= 1
                stats.duration.observe(asyncio.get_running_loop().time() - started)
            if await self._end(sid, group, trigger, attempt, reply):
                stats.replies += 1

    def _backoff(self, attempt: int) -> float:
        cap = min(self.limits.backoff_max_s, self.limits.backoff_base_s * 2 ** (attempt - 1))
        return self._random.uniform(cap / 2, cap)

    def _stats(self, agent_id: str) -> AgentStats:
        stats = self.stats.get(agent_id)
        if stats is None:
            stats = self.stats[agent_id] = AgentStats()
        return stats

    async def _end(
        self, sid: str, group: int, trigger: int, attempt: int, append: commands.Append
    ) -> bool:
        """Commit the outcome; True if it was stored by this call (not refused)."""
        end = commands.encode_command(commands.DispatchEnd(sid, trigger, attempt, append))
        for n in range(1, self.limits.end_tries_max + 1):
            try:
                result = await self.router.submit(group, end)
            except RouteError as e:  # timeout: maybe applied; a retry is refused if so
                logger.info("dispatch of %r: end not committed (%s); again", sid, e)
                await asyncio.sleep(self._backoff(n))
                continue
            return isinstance(result, commands.Appended)
        raise RuntimeError(f"could not commit the reply of session {sid!r} trigger {trigger}")

    async def _drop(
        self, sid: str, group: int, agent: AgentRecord, trigger: int, attempt: int, reason: str,
        detail: str,
    ) -> None:  # fmt: skip
        stats = self._stats(agent.id)
        stats.drops[reason] = stats.drops.get(reason, 0) + 1
        meta = {"agent": {"id": agent.id, "trigger_seq": trigger, "attempt": attempt,
                          "dropped": reason, "detail": detail[:1024]}}  # fmt: skip
        content = f"The agent {agent.id} did not answer ({reason})."
        tokenizer = window_tokenizer(self.state, sid)
        tokens = (
            None if tokenizer is None else self.counters.get(tokenizer).message(content, None)[0]
        )
        printed = fingerprint("system", "ctxstore", "agent_dropped", content, meta, "system",
                              NO_PARTS)  # fmt: skip
        append = commands.Append(
            sid, "system", "ctxstore", "agent_dropped", content, meta,
            f"agent-drop:{trigger}:{attempt}", None, tokens, self.clock_ms(), "system",
            fingerprint=printed,
        )  # fmt: skip
        await self._end(sid, group, trigger, attempt, append)

    # -- one call ----------------------------------------------------------------------------------
    async def _call(
        self, agent: AgentRecord, sid: str, user_id: str, trigger: int, attempt: int,
        stats: AgentStats,
    ) -> commands.Append:  # fmt: skip
        messages = await self._messages(agent, sid, trigger)
        body = _json.encode({"session_id": sid, "agent_id": agent.id, "user_id": user_id,
                             "trigger_seq": trigger, "attempt": attempt,
                             "messages": messages})  # fmt: skip
        headers = [(b"content-type", b"application/json"),
                   (b"accept", b"text/event-stream, application/x-ndjson"),
                   (b"user-agent", b"ctxstore")]  # fmt: skip
        headers += [(k.lower().encode(), v.encode()) for k, v in agent.headers.items()]
        origin = origin_of(agent)
        idle_s = agent.idle_timeout_ms / 1000
        assembler = Assembler()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(agent.timeout_ms / 1000), self.pool.slot(origin):
                response = await self.pool.request(
                    origin, agent.protocol, target_of(agent), headers, body, idle_s
                )
                chunks = response.body
                try:
                    if not 200 <= response.status < 300:
                        raise _status_failure(
                            response.status, response.header(b"retry-after"),
                            self.limits.retry_after_max_s,
                        )  # fmt: skip
                    framing = framing_of(response.header(b"content-type"))
                    if framing is None:
                        kind = response.header(b"content-type")[:64]
                        raise Failure("content_type", f"content type {kind!r}", False)
                    decoder = StreamDecoder(framing)
                    async for data in chunks:
                        if got := decoder.feed(data):
                            self._chunks(sid, trigger, attempt, got, assembler, stats, loop)
                        if decoder.error is not None:
                            raise decoder.error
                        if assembler.terminated is not None or decoder.done:
                            break
                    else:
                        if got := decoder.end():
                            self._chunks(sid, trigger, attempt, got, assembler, stats, loop)
                    if assembler.terminated is not None:
                        await _drain(chunks)
                finally:
                    await chunks.aclose()  # (read or not: the request ends, http.Body)
        except TimeoutError:
            raise Failure("timeout", f"no finish within {agent.timeout_ms} ms", True) from None
        except HttpError as e:
            raise Failure(e.reason, str(e), True) from None
        except StreamError as e:
            raise Failure(e.reason, str(e), e.reason != "too_large") from None
        if assembler.terminated is None:
            raise Failure("no_finish", "the stream ended without finish or abort", True)
        return await self._reply(agent, sid, trigger, attempt, assembler)

    def _chunks(
        self, sid: str, trigger: int, attempt: int, chunks: list[dict[str, Any]],
        assembler: Assembler, stats: AgentStats, loop: asyncio.AbstractEventLoop,
    ) -> None:  # fmt: skip
        """Show the chunks one read brought, in order, to the session's subscribers here and
        on the peers (one relay message for them all).  Each goes into the assembler first: a
        bad one raises ``StreamError`` once the chunks before it are shown, never itself."""
        first = assembler.chunks == 0
        error: StreamError | None = None
        for i, chunk in enumerate(chunks):
            try:
                assembler.add(chunk)
            except StreamError as e:
                chunks, error = chunks[:i], e
                break
        if chunks:
            if first:
                acked = self._acked_at.pop(sid, None)
                if acked is not None:
                    stats.first_chunk.observe(loop.time() - acked)
            stats.chunks += len(chunks)
            self.subscriptions.on_chunks(sid, trigger, attempt, chunks)
            if self.relay is not None:
                self.relay(sid, trigger, attempt, chunks)
        if error is not None:
            raise error

    async def _reply(
        self, agent: AgentRecord, sid: str, trigger: int, attempt: int, a: Assembler
    ) -> commands.Append:
        try:
            check_parts(a.parts)
        except PartError as e:
            raise Failure("invalid_reply", str(e), False) from None
        meta: dict[str, Any] = dict(a.metadata)
        if len(_msgpack.encode(meta)) > METADATA_BYTES_MAX // 2:
            meta = {"metadata_dropped": True}  # the agent's metadata is too big to keep
        meta["agent"] = {"id": agent.id, "trigger_seq": trigger, "attempt": attempt,
                         "termination": a.terminated, "finish_reason": a.finish_reason}  # fmt: skip
        parts = encode_parts(a.parts)
        message = StoredMessage(sid, 0, "agent", agent.id, "text", "", meta, None, 0, None,
                                "assistant", parts)  # fmt: skip
        if payload_bytes(message) > MESSAGE_BYTES_MAX:
            raise Failure("too_large", f"the reply is over {MESSAGE_BYTES_MAX} bytes", False)
        tokens: int | None = None
        per_part: list[int] | None = None
        tokenizer = window_tokenizer(self.state, sid)  # counted only for a context window
        if tokenizer is not None:
            counter = self.counters.get(tokenizer)
            if offload("", a.parts):
                tokens, per_part = await asyncio.to_thread(counter.message, "", a.parts)
            else:
                tokens, per_part = counter.message("", a.parts)
        printed = fingerprint("agent", agent.id, "text", "", meta, "assistant", parts)
        return commands.Append(
            sid, "agent", agent.id, "text", "", meta, f"agent-reply:{trigger}:{attempt}", None,
            tokens, self.clock_ms(), "assistant", parts, per_part, fingerprint=printed,
        )  # fmt: skip

    # -- the history a call carries ----------------------------------------------------------------
    async def _messages(self, agent: AgentRecord, sid: str, trigger: int) -> list[dict[str, Any]]:
        mode = agent.history
        lim = self.limits
        try:
            if mode == "window":
                view = self.state.window(sid)
                if view is not None and view[0] is not None:
                    plan = Plan(sid, view[0], view[1])
                    cache = self.window_cache
                    found = from_memory(self.state, cache, plan)
                    if found is None:
                        found = await from_history(self.history, cache, plan,
                                                   lim.history_bytes_max)  # fmt: skip
                    context = answer(0, plan, found)
                    return [ui_message(m) for m in context.messages if m.seq <= trigger]
                mode = "all"  # no window configured: the whole history
            count = lim.history_messages_max if mode == "all" else int(mode.split()[1])
            after = max(0, trigger - min(count, lim.history_messages_max))
            out: list[StoredMessage] = []
            while after < trigger:
                page = await self.history.read(sid, after, min(1000, trigger - after),
                                               lim.history_bytes_max)  # fmt: skip
                if page is None or not page.messages:
                    break
                out.extend(m for m in page.messages if m.seq <= trigger)
                after = page.messages[-1].seq
        except HistoryUnavailable as e:
            raise Failure("history", str(e), True) from None
        dicts = [ui_message(message_to_wire(m)) for m in out]
        size = 0
        for i in range(len(dicts) - 1, -1, -1):  # the newest within the byte budget
            size += len(_json.encode(dicts[i]))
            if size > lim.history_bytes_max:
                return dicts[i + 1 :]
        return dicts


async def _drain(chunks: Any) -> None:
    """Read what follows ``finish`` (``[DONE]``, the end) so a keep-alive connection can be
    reused; a body that does not end soon is cut (its connection closed)."""
    try:
        async with asyncio.timeout(DRAIN_AFTER_END_S):
            async for _ in chunks:
                pass
    except (TimeoutError, HttpError):
        pass


__all__ = ["AgentStats", "DispatchLimits", "Dispatcher", "Failure", "ui_message"]
