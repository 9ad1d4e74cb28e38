"""The load: client processes that append (and read) and measure, and their parent's handle
(``Workers``, on ``procs.ClientProcesses``).

Each client process (spawned with ``multiprocessing``; uvloop; one pipelined connection per
node, see ``routing``) runs its share of the load between the times the parent gives it:

- closed loop: ``concurrency`` slots, each sending its next request when the previous returns;
  a request's latency runs from its first send to its answer;
- open loop: requests at intended times (``schedule.OpenLoopSchedule``), each sent as its own
  task; latency runs from the *intended* time; at most ``outstanding_max`` in flight, the
  others are skipped as ``overload``;
- replay readers (``readers``): new connections that read a backlog session from seq 0 in pages.

The requests go through ``via`` (``routing.new_load_client``): the native port, a WebSocket or
the HTTP/JSON API of each node; everything else here is the same whatever the transport.

Requests whose start (first send, or intended time) falls in the measured window
[measure, end) are recorded in the window's histograms (appends and open-loop send lags from
their logs once the run is over, not in its hot path).  Every append carries a
``client_msg_id`` (``<run>-<process>-<n>``) and is resent with it on retryable errors (each
error counted by code, each resend as a retry) until acked, for at most ``retry_for_s``.
Every ack is logged (session, n, seq, start, done) for the read-back check and the failover
figures.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from wire.client import ClientError, expect_response
from wire.placement import group_of
from wire.protocol import Appended, Response

from .context import (
    CONTEXT_OUTSTANDING_MAX,
    append_structured,
    append_structured_nowait,
    get_context,
    message_parts,
    payload,
)
from .histogram import LatencyHistogram
from .procs import ClientProcesses, WorkerError, tune_collector
from .routing import Route, Router, new_load_client
from .schedule import OpenLoopSchedule
from .timeline import window_histogram
from .webclients import LoadClient, Via

T = TypeVar("T")
now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine

OPEN_LOOP_TICK_S = 0.001
ATTEMPTS_MAX = 1000  # per request, on top of retry_for_s
BACKOFF_MIN_S = 0.005
BACKOFF_MAX_S = 0.2
ACK_LOG_MAX = 4_000_000  # per process (~160 MB); beyond it acks are counted, not logged
ERROR_LOG_MAX = 1_000_000
SEND_LAG_LOG_MAX = 4_000_000  # per process (32 MB); beyond it lags are recorded as they come
# progress counters shared with the parent (RawArray 'q'), all since the start of the run
ACKS, ERRORS, READS, REPLAYS, OUTSTANDING = range(5)


def session_id(run_id: str, i: int) -> str:
    return f"{run_id}-s{i}"


class Failed(Exception):
    """A request that failed for good: ``reason`` is an error code or ``gave_up``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    index: int
    procs: int
    run_id: str
    sessions: int  # ids: session_id(run_id, i) for i in range(sessions)
    groups: int
    nodes: dict[int, str]  # node id -> client address
    leaders: tuple[int, ...]  # group -> leader at the start
    route: Route
    token: str | None
    payload_bytes: int
    concurrency: int  # this process's closed-loop slots (0: open loop)
    rate: float  # the open loop's rate over all processes (0: closed loop)
    outstanding_max: int  # this process's open-loop bound
    read_ratio: float  # share of operations that are reads of the last ``read_last`` messages
    read_last: int
    readers: int  # this process's replay readers
    backlog_session: str | None
    backlog_seq: int  # the backlog's last seq: a replay reads 1..backlog_seq
    page: int
    retry_for_s: float
    timeout_s: float
    seed: int
    via: Via = "native"  # the transport (``routing.new_load_client``)
    web: dict[int, str] = dataclasses.field(default_factory=dict)  # node id -> its HTTP port
    parts: int = 0  # structured messages of this many parts (bench.context; 0: the short form)
    payload_text: str = "letters"  # the payload's characters (bench.context.PAYLOAD_TEXTS)
    context_sessions: tuple[str, ...] = ()  # get_context on these, in turn, ...
    context_rate: float = 0.0  # ... at this rate (open loop; 0: none)


@dataclasses.dataclass
class WorkerResult:
    index: int
    pid: int
    histograms: dict[str, str]  # name -> encoded LatencyHistogram of the window
    errors: dict[str, int]  # code -> errors in the window (by the time of the error)
    failed: dict[str, int]  # reason -> requests of the window that never succeeded
    retries: int  # resends in the window
    unfinished: int  # requests still in flight after the drain (not counted anywhere else)
    ack_sess: array.array[int]
    ack_n: array.array[int]
    ack_seq: array.array[int]
    ack_start: array.array[float]
    ack_done: array.array[float]
    acks_unlogged: int
    error_t: array.array[float]
    error_code: array.array[int]
    error_codes: list[str]
    routes_refreshes: int
    context_windows: dict[str, int] = dataclasses.field(default_factory=dict)  # what they held


class Worker:
    """The load of one client process."""

    def __init__(self, spec: WorkerSpec, counters: Any) -> None:
        self.spec = spec
        self.counters = counters
        self.rng = random.Random(spec.seed * 1000 + spec.index)
        self.router = Router(
            spec.nodes,
            list(spec.leaders),
            spec.route,
            token=spec.token,
            timeout_s=spec.timeout_s,
            via=spec.via,
            web=spec.web,
        )
        self.session_ids = [session_id(spec.run_id, i) for i in range(spec.sessions)]
        self.session_groups = [group_of(s, spec.groups) for s in self.session_ids]
        self.last_seq = [0] * spec.sessions
        self.content = payload(self.rng, spec.payload_bytes, spec.payload_text)
        self.parts = message_parts(spec.parts, self.content)  # None: the short form
        self.context_groups = [group_of(s, spec.groups) for s in spec.context_sessions]
        self.context_windows: dict[str, int] = {}
        self.msg_prefix = f"{spec.run_id}-{spec.index}-"
        self.next_n = 0
        self.measure = self.end = 0.0
        self.hist = {
            name: LatencyHistogram()
            for name in ("append", "read", "replay", "page", "send_lag", "context")
        }
        self.errors: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.retries = 0
        self.ack_sess: array.array[int] = array.array("I")
        self.ack_n: array.array[int] = array.array("Q")
        self.ack_seq: array.array[int] = array.array("Q")
        self.ack_start: array.array[float] = array.array("d")
        self.ack_done: array.array[float] = array.array("d")
        self.acks_unlogged = 0
        self.send_lags: array.array[float] = array.array("d")  # the window's, in seconds
        self.error_t: array.array[float] = array.array("d")
        self.error_code: array.array[int] = array.array("B")
        self.error_codes: list[str] = []
        # the open loop's requests in flight: tasks, and futures of appends sent without one
        self.ops: set[asyncio.Future[Any]] = set()
        self.replaying = 0

    # -- accounting ---------------------------------------------------------------------------
    def in_window(self, t: float) -> bool:
        return self.measure <= t < self.end

    def error(self, t: float, code: str) -> None:
        self.counters[ERRORS] += 1
        if self.in_window(t):
            self.errors[code] += 1
        if len(self.error_t) < ERROR_LOG_MAX:
            if code not in self.error_codes:
                self.error_codes.append(code)
            self.error_t.append(t)
            self.error_code.append(self.error_codes.index(code))

    def fail(self, start: float, reason: str) -> None:
        if self.in_window(start):
            self.failed[reason] += 1

    def ack(self, sidx: int, n: int, seq: int, start: float, done: float) -> None:
        self.counters[ACKS] += 1
        if seq > self.last_seq[sidx]:
            self.last_seq[sidx] = seq
        if len(self.ack_n) >= ACK_LOG_MAX:
            self.acks_unlogged += 1
            if self.in_window(start):  # a logged ack is recorded after the run (``recorded``)
                self.hist["append"].record_s(done - start)
            return
        self.ack_sess.append(sidx)
        self.ack_n.append(n)
        self.ack_seq.append(seq)
        self.ack_start.append(start)
        self.ack_done.append(done)

    # -- requests -----------------------------------------------------------------------------
    async def attempt(
        self,
        group: int,
        start: float,
        call: Callable[[LoadClient], Awaitable[T]],
        tried: int = 0,
    ) -> T:
        """``call`` on the node ``group``'s requests go to, until it succeeds.  Raises
        ``Failed`` with the error code when it fails for good, or ``gave_up`` after retryable
        errors for ``retry_for_s``.  ``tried``: attempts already made (and failed) elsewhere."""
        backoff_s = BACKOFF_MIN_S
        router = self.router
        for k in range(tried, ATTEMPTS_MAX):
            if k > 0:
                await asyncio.sleep(self.rng.uniform(backoff_s / 2, backoff_s))
                backoff_s = min(2 * backoff_s, BACKOFF_MAX_S)
            node_id = router.pick(group)
            try:
                return await call(router.clients[node_id])
            except ClientError as e:
                reason = self.attempt_failed(node_id, start, e)
                if reason is not None:
                    raise Failed(reason) from None
        raise Failed("gave_up")

    def attempt_failed(self, node_id: int, start: float, e: ClientError) -> str | None:
        """Account for a failed attempt; the reason the request fails for good, or None to
        try again."""
        t = now()
        self.error(t, e.code)
        self.router.failed(node_id, e)
        if not e.retryable:
            return e.code
        if t - start > self.spec.retry_for_s:
            return "gave_up"
        if self.in_window(start):
            self.retries += 1
        return None

    def next_append(self) -> tuple[int, int]:
        """The session (index) and number of the next append."""
        n = self.next_n
        self.next_n += 1
        return self.rng.randrange(self.spec.sessions), n

    async def append(self, start: float, sidx: int, n: int, tried: int = 0) -> None:
        sid, content, msg_id = self.session_ids[sidx], self.content, f"{self.msg_prefix}{n}"
        parts = self.parts

        def call(client: LoadClient) -> Awaitable[Any]:
            if parts is not None:
                return append_structured(client, sid, parts, msg_id)
            return client.append(sid, content, client_msg_id=msg_id)

        try:
            ack = await self.attempt(self.session_groups[sidx], start, call, tried)
        except Failed as e:
            self.fail(start, e.reason)
            return
        self.ack(sidx, n, ack.seq, start, now())

    def append_nowait(self, start: float) -> bool:
        """The open loop's append without a task: sent on its node's open connection, finished
        by a callback (a retry continues in a task).  False, with nothing sent, when that
        connection is not open and writable."""
        sidx = self.rng.randrange(self.spec.sessions)
        node_id = self.router.pick(self.session_groups[sidx])
        n = self.next_n
        client = self.router.clients[node_id]
        if self.parts is not None:
            future = append_structured_nowait(
                client, self.session_ids[sidx], self.parts, f"{self.msg_prefix}{n}"
            )
        else:
            future = client.append_nowait(
                self.session_ids[sidx], self.content, client_msg_id=f"{self.msg_prefix}{n}"
            )
        if future is None:
            return False
        self.next_n += 1
        self.counters[OUTSTANDING] += 1
        self.ops.add(future)
        future.add_done_callback(lambda f: self.appended_nowait(f, start, sidx, n, node_id))
        return True

    def appended_nowait(
        self, f: asyncio.Future[Response], start: float, sidx: int, n: int, node_id: int
    ) -> None:
        self.ops.discard(f)
        if f.cancelled():  # the drain gave up on it: counted as unfinished
            return
        try:
            ack = expect_response(f.result(), Appended, "Append")  # as Client.append does
        except ClientError as e:
            error = e
        else:
            self.counters[OUTSTANDING] -= 1
            self.ack(sidx, n, ack.seq, start, now())
            return
        reason = self.attempt_failed(node_id, start, error)
        if reason is not None:
            self.counters[OUTSTANDING] -= 1
            self.fail(start, reason)
            return
        task = asyncio.get_running_loop().create_task(self.retry_append(start, sidx, n))
        self.ops.add(task)
        task.add_done_callback(self.ops.discard)

    async def retry_append(self, start: float, sidx: int, n: int) -> None:
        try:
            await self.append(start, sidx, n, tried=1)
        finally:
            self.counters[OUTSTANDING] -= 1

    async def read(self, start: float) -> None:
        sidx = self.rng.randrange(self.spec.sessions)
        sid, limit = self.session_ids[sidx], self.spec.read_last
        after = max(0, self.last_seq[sidx] - limit)

        def call(client: LoadClient) -> Awaitable[Any]:
            return client.read(sid, after, limit)

        try:
            await self.attempt(self.session_groups[sidx], start, call)
        except Failed as e:
            self.fail(start, f"read:{e.reason}")
            return
        self.counters[READS] += 1
        if self.in_window(start):
            self.hist["read"].record_s(now() - start)

    async def get_context(self, start: float, k: int) -> None:
        """``get_context`` of the ``k``-th context session, intended at ``start``."""
        sid = self.spec.context_sessions[k]

        def call(client: LoadClient) -> Awaitable[Any]:
            return get_context(client, sid)

        self.counters[OUTSTANDING] += 1
        try:
            try:
                window = await self.attempt(self.context_groups[k], start, call)
            except Failed as e:
                self.fail(start, f"context:{e.reason}")
                return
            if self.in_window(start):
                self.hist["context"].record_s(now() - start)
                held = self.context_windows
                tokens, messages = window.token_count, len(window.messages)
                held["tokens_min"] = min(held.get("tokens_min", tokens), tokens)
                held["tokens_max"] = max(held.get("tokens_max", tokens), tokens)
                held["messages_min"] = min(held.get("messages_min", messages), messages)
                held["messages_max"] = max(held.get("messages_max", messages), messages)
        finally:
            self.counters[OUTSTANDING] -= 1

    async def context_loop(self, t0: float) -> None:
        """``get_context`` on the context sessions in turn at ``context_rate`` (open loop)."""
        spec = self.spec
        schedule = OpenLoopSchedule(t0, 1 / spec.context_rate, self.end, CONTEXT_OUTSTANDING_MAX)
        ops = self.ops
        k = 0
        while not schedule.finished:
            due = schedule.poll(now(), len(ops))
            for intended in due.send:
                task = asyncio.create_task(self.get_context(intended, k))
                k = (k + 1) % len(spec.context_sessions)
                ops.add(task)
                task.add_done_callback(ops.discard)
            for intended in due.skipped:
                self.error(intended, "overload")
                self.fail(intended, "context:overload")
            await asyncio.sleep(max(OPEN_LOOP_TICK_S, schedule.next_s - now()))

    async def operation(self, start: float) -> None:
        ratio = self.spec.read_ratio
        self.counters[OUTSTANDING] += 1
        try:
            if ratio > 0 and self.rng.random() < ratio:
                await self.read(start)
            else:
                await self.append(start, *self.next_append())
        finally:
            self.counters[OUTSTANDING] -= 1

    async def replay(self, start: float) -> None:
        """Read the backlog 1..backlog_seq on a new connection, ``page`` messages at a time."""
        spec = self.spec
        assert spec.backlog_session is not None
        sid, page = spec.backlog_session, spec.page
        group = group_of(sid, spec.groups)
        node_id = self.router.pick(group)
        client = new_load_client(
            spec.via, spec.nodes[node_id], spec.web.get(node_id), spec.token, spec.timeout_s
        )
        after = 0
        self.replaying += 1
        try:
            while after < spec.backlog_seq:
                t = now()
                try:
                    messages = await client.read(sid, after, page)
                except ClientError as e:
                    self.error(now(), e.code)
                    if not e.retryable or now() - start > spec.retry_for_s:
                        self.fail(start, f"replay:{e.code}")
                        return
                    await asyncio.sleep(BACKOFF_MAX_S)
                    continue
                if not messages.messages:
                    self.fail(start, "replay:short")  # the backlog ended before backlog_seq
                    return
                after = messages.messages[-1].seq
                if self.in_window(start):
                    self.hist["page"].record_s(now() - t)
        finally:
            self.replaying -= 1
            await client.close()
        self.counters[REPLAYS] += 1
        if self.in_window(start):
            self.hist["replay"].record_s(now() - start)

    # -- loops --------------------------------------------------------------------------------
    async def closed_slot(self) -> None:
        while (t := now()) < self.end:
            await self.operation(t)

    async def reader(self) -> None:
        while (t := now()) < self.end:
            await self.replay(t)

    async def open_loop(self, t0: float) -> None:
        spec = self.spec
        interval = spec.procs / spec.rate
        first = t0 + spec.index / spec.rate  # the processes interleave their schedules
        schedule = OpenLoopSchedule(first, interval, self.end, spec.outstanding_max)
        ops = self.ops
        send_lags = self.send_lags
        fast = spec.read_ratio == 0  # appends only: the task-free path
        while not schedule.finished:
            t = now()
            due = schedule.poll(t, len(ops))
            for intended in due.send:
                if self.in_window(intended):
                    if len(send_lags) < SEND_LAG_LOG_MAX:
                        send_lags.append(t - intended)  # recorded after the run
                    else:
                        self.hist["send_lag"].record_s(t - intended)
                if fast and self.append_nowait(intended):
                    continue  # no task per request: the client's own CPU stays low
                task = asyncio.create_task(self.operation(intended))
                ops.add(task)
                task.add_done_callback(ops.discard)
            for intended in due.skipped:
                self.error(intended, "overload")
                self.fail(intended, "overload")
            # Not less than a tick: uvloop's timers have a 1 ms resolution, and a shorter sleep
            # would spin.  A request sent up to a tick late has that in its latency.
            await asyncio.sleep(max(OPEN_LOOP_TICK_S, schedule.next_s - now()))

    async def run(self, t0: float, measure: float, end: float) -> int:
        """Run the load from ``t0``, measure [measure, end), drain; return the requests still
        in flight after the drain (cancelled, counted nowhere else)."""
        self.measure, self.end = measure, end
        await asyncio.sleep(max(0.0, t0 - now()))
        spec = self.spec
        loops: set[asyncio.Task[None]] = set()
        if spec.rate > 0:
            loops.add(asyncio.create_task(self.open_loop(t0)))
        loops |= {asyncio.create_task(self.closed_slot()) for _ in range(spec.concurrency)}
        loops |= {asyncio.create_task(self.reader()) for _ in range(spec.readers)}
        if spec.context_rate > 0 and spec.context_sessions:
            loops.add(asyncio.create_task(self.context_loop(t0)))
        await asyncio.sleep(max(0.0, end - now()))
        deadline = now() + spec.retry_for_s + spec.timeout_s + 2.0
        pending: set[asyncio.Future[Any]] = set(loops)
        while (pending or self.ops) and now() < deadline:  # the open loop adds until ``end``
            _, pending = await asyncio.wait(pending | self.ops, timeout=deadline - now())
        unfinished = int(self.counters[OUTSTANDING]) + self.replaying
        for task in pending | self.ops:
            task.cancel()
        await asyncio.gather(*pending, *self.ops, return_exceptions=True)
        return unfinished

    def recorded(self) -> dict[str, LatencyHistogram]:
        """The histograms, with what the run only logged: the latencies of the logged acks of
        the window and the send lags (recording costs the client CPU, which on a shared machine
        is taken from the nodes: it is spent after the window instead)."""
        self.hist["append"].merge(window_histogram([self], self.measure, self.end))
        lags = self.hist["send_lag"]
        for lag in self.send_lags:
            lags.record_s(lag)
        return self.hist

    def result(self, unfinished: int) -> dict[str, Any]:
        """A plain dict (a class of this module pickles fine, but a dict is all the pipe needs)."""
        return {
            "index": self.spec.index,
            "pid": os.getpid(),
            "histograms": {k: h.encode() for k, h in self.recorded().items()},
            "errors": dict(self.errors),
            "failed": dict(self.failed),
            "retries": self.retries,
            "unfinished": unfinished,
            "ack_sess": self.ack_sess,
            "ack_n": self.ack_n,
            "ack_seq": self.ack_seq,
            "ack_start": self.ack_start,
            "ack_done": self.ack_done,
            "acks_unlogged": self.acks_unlogged,
            "error_t": self.error_t,
            "error_code": self.error_code,
            "error_codes": self.error_codes,
            "routes_refreshes": self.router.refreshes,
            "context_windows": self.context_windows,
        }


def worker_main(
    spec: WorkerSpec, counters: Any, conn: multiprocessing.connection.Connection
) -> None:
    """Entry point of a client process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    import uvloop

    async def main() -> None:
        worker = Worker(spec, counters)
        try:
            await worker.router.start()
            tune_collector()
            conn.send(("ready", os.getpid()))
            message = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            if message[0] != "go":
                return
            _, t0, measure, end = message
            unfinished = await worker.run(t0, measure, end)
            conn.send(("result", worker.result(unfinished)))
        finally:
            await worker.router.close()

    try:
        uvloop.run(main())
    except BaseException as e:
        with contextlib.suppress(OSError):
            conn.send(("error", repr(e)))
        raise


class Workers(ClientProcesses):
    """The parent's handle on the client processes of a load (one per spec)."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        super().__init__(worker_main, specs, counters=5)

    async def load_results(self, timeout_s: float) -> list[WorkerResult]:
        return [WorkerResult(**result) for result in await self.results(timeout_s)]


__all__ = ["WorkerError", "WorkerResult", "WorkerSpec", "Workers", "session_id"]
