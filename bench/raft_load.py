"""The load of the Raft benchmark (``bench.raft_node``): client processes running a closed loop
of proposals against the nodes' control ports.

C proposals are in flight in total, over the groups round-robin (slot j sends to groups j,
j + C, j + 2C, ...), spread over P processes; each is sent to its group's leader as last known
(``not_leader`` hints are followed, a lost connection moves to another node) until it is
acknowledged.  Its latency runs from the first send to the ack (quorum-fsync'd and applied on
the leader).  Each process logs every ack (time, latency, group) and every error for the
parent, which works out the figures once the run is over.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import multiprocessing.connection
import os
import signal
import time
from typing import Any

from .procs import ClientProcesses
from .raft_control import ControlClient, Propose

NODE_IDS = (1, 2, 3)
DOWN_RETRY_S = 0.5  # a node whose connection failed is not tried again before this
DRAIN_S = 15.0  # after the window, how long the clients wait for the requests still in flight
ACKS, ERRORS = range(2)  # the progress counters shared with the parent
now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    index: int
    slots: tuple[int, ...]  # global slot numbers: slot j sends to groups j, j + C, j + 2C, ...
    concurrency: int  # C, in all processes
    groups: int
    payload_bytes: int
    nodes: dict[int, tuple[str, int]]  # control addresses
    leaders: dict[int, int]  # group -> leader at start
    retry_s: float


@dataclasses.dataclass
class WorkerResult:
    index: int
    pid: int
    done: array.array[float]  # ack time (monotonic) of each acked request
    latency: array.array[float]  # seconds from the first send to the ack
    group: array.array[int]
    errors: list[tuple[float, str]]  # (time, code) of every error reply or connection failure
    unfinished: int  # requests still in flight after the drain


class ClosedLoop:
    """The closed loop of one client process."""

    def __init__(self, spec: WorkerSpec, counters: Any) -> None:
        self.spec = spec
        self.counters = counters  # ACKS, ERRORS (read by the parent)
        self.leaders = [
            spec.leaders.get(g, NODE_IDS[g % len(NODE_IDS)]) for g in range(spec.groups)
        ]
        self.links: dict[int, ControlClient] = {}
        self.connecting: dict[int, asyncio.Future[ControlClient]] = {}
        self.down_until: dict[int, float] = {}
        self.done: array.array[float] = array.array("d")
        self.latency: array.array[float] = array.array("d")
        self.group: array.array[int] = array.array("H")
        self.errors: list[tuple[float, str]] = []
        self.inflight = 0
        self.data = os.urandom(spec.payload_bytes)

    async def connect_all(self) -> None:
        for node_id in self.spec.nodes:
            await self.link(node_id)

    async def link(self, node_id: int) -> ControlClient:
        link = self.links.get(node_id)
        if link is not None and not link.closed:
            return link
        pending = self.connecting.get(node_id)
        if pending is not None:
            return await asyncio.shield(pending)
        if self.down_until.get(node_id, 0.0) > now():
            raise ConnectionError(f"node {node_id} is down")
        fut: asyncio.Future[ControlClient] = asyncio.get_running_loop().create_future()
        self.connecting[node_id] = fut
        try:
            link = await asyncio.wait_for(ControlClient.connect(*self.spec.nodes[node_id]), 2.0)
        except (OSError, TimeoutError) as e:
            self.down_until[node_id] = now() + DOWN_RETRY_S
            fut.set_exception(ConnectionError(f"node {node_id}: {e!r}"))
            fut.exception()  # retrieved: no "never retrieved" warning
            raise ConnectionError(f"node {node_id}: {e!r}") from None
        finally:
            del self.connecting[node_id]
        self.links[node_id] = link
        fut.set_result(link)
        return link

    def usable(self, node_id: int) -> bool:
        link = self.links.get(node_id)
        return (link is not None and not link.closed) or self.down_until.get(node_id, 0.0) <= now()

    def other_node(self, node_id: int) -> int:
        ids = sorted(self.spec.nodes)
        k = ids.index(node_id) if node_id in ids else -1
        for step in range(1, len(ids) + 1):
            candidate = ids[(k + step) % len(ids)]
            if self.usable(candidate):
                return candidate
        return ids[(k + 1) % len(ids)]

    def error(self, code: str) -> None:
        self.errors.append((now(), code))
        self.counters[ERRORS] += 1

    async def propose(self, group: int) -> None:
        """Propose until acked, following leader hints; record the latency."""
        sent = now()
        retry_s = self.spec.retry_s
        while True:
            node_id = self.leaders[group]
            try:
                link = await self.link(node_id)
                reply = await link.send(Propose, group, self.data)
            except ConnectionError:
                self.error("connection_lost")
                if self.down_until.get(node_id, 0.0) < now():
                    self.down_until[node_id] = now() + DOWN_RETRY_S
                self.leaders[group] = self.other_node(node_id)
                await asyncio.sleep(retry_s)
                continue
            if reply.ok:
                t = now()
                self.done.append(t)
                self.latency.append(t - sent)
                self.group.append(group)
                self.counters[ACKS] += 1
                return
            self.error(reply.code)
            if reply.code == "not_leader":
                hint = reply.leader
                if hint and hint != node_id and hint in self.spec.nodes and self.usable(hint):
                    self.leaders[group] = hint
                    continue
                self.leaders[group] = self.other_node(node_id)
            await asyncio.sleep(retry_s)

    async def slot(self, j: int, end: float) -> None:
        spec = self.spec
        i = 0
        while now() < end:
            group = (j + i * spec.concurrency) % spec.groups
            i += 1
            self.inflight += 1
            try:
                await self.propose(group)
            finally:
                self.inflight -= 1

    async def run(self, start: float, end: float) -> int:
        await asyncio.sleep(max(0.0, start - now()))
        tasks = [asyncio.create_task(self.slot(j, end)) for j in self.spec.slots]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - now()) + DRAIN_S)
        unfinished = self.inflight
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for link in self.links.values():
            link.close()
        return unfinished


def worker_main(
    spec: WorkerSpec, counters: Any, conn: multiprocessing.connection.Connection
) -> None:
    """Entry point of a client process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    import uvloop

    async def main() -> None:
        client = ClosedLoop(spec, counters)
        await client.connect_all()
        conn.send(("ready", os.getpid()))
        loop = asyncio.get_running_loop()
        message = await loop.run_in_executor(None, conn.recv)
        if message[0] != "go":
            return
        _, start, end = message
        unfinished = await client.run(start, end)
        # A plain dict: a class of this module pickles as __mp_main__.X in a spawned child.
        result = {
            "index": spec.index,
            "pid": os.getpid(),
            "done": client.done,
            "latency": client.latency,
            "group": client.group,
            "errors": client.errors,
            "unfinished": unfinished,
        }
        conn.send(("result", result))

    try:
        uvloop.run(main())
    except Exception as e:
        with contextlib.suppress(OSError):
            conn.send(("error", repr(e)))
        raise


class Clients(ClientProcesses):
    """P spawned client processes running the closed loop together."""

    def __init__(
        self, args: argparse.Namespace, nodes: dict[int, tuple[str, int]], groups: int,
        leaders: dict[int, int],
    ) -> None:  # fmt: skip
        c, p = args.concurrency, args.procs
        specs = [
            WorkerSpec(
                index=k,
                slots=tuple(range(k, c, p)),
                concurrency=c,
                groups=groups,
                payload_bytes=args.payload_bytes,
                nodes=nodes,
                leaders=leaders,
                retry_s=args.retry_ms / 1000,
            )
            for k in range(p)
        ]
        super().__init__(worker_main, specs, counters=2, prefix="c")

    def totals(self) -> tuple[int, int]:
        return self.total(ACKS), self.total(ERRORS)

    async def load_results(self, timeout_s: float) -> list[WorkerResult]:
        return [WorkerResult(**result) for result in await self.results(timeout_s)]
