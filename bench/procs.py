"""The parent's handle on a benchmark's client processes (``bench.load``, ``bench.raft_load``).

Each process is spawned with ``target(spec, counters, pipe)`` and talks over its pipe:
``("ready", pid)`` once it is connected, then it waits for ``("go", *times)`` (or
``("stop",)``), runs, and sends ``("result", dict)``; ``("error", repr)`` if it fails.  The
``counters`` (a shared array of ``counters`` 64-bit integers per process) are what the parent
reads while the processes run (progress lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Sequence
from multiprocessing.sharedctypes import RawArray
from typing import Any

START_TIMEOUT_S = 60.0
YOUNG_THRESHOLD = 10_000  # what a node runs with (ctxstore's gc_young_threshold); Python's: 700

Pipe = multiprocessing.connection.Connection


def tune_collector(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """A client process's cyclic garbage collector, tuned as a node's is: what start-up built is
    frozen out of the scans, and the young generation is collected every ``young_threshold``
    allocations.  The clients share the cores with the nodes: what the collector costs them
    (and its pauses, counted as latency) is taken from the nodes."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)


class WorkerError(Exception):
    """A client process died, failed, or said nothing in time."""


class ClientProcesses:
    """P spawned client processes, one per spec; ``pids`` names them ``<prefix><k + 1>``."""

    def __init__(
        self,
        target: Callable[[Any, Any, Pipe], None],
        specs: Sequence[Any],
        counters: int,
        prefix: str = "client",
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.prefix = prefix
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Pipe] = []
        self.counters: list[Any] = []
        self.pids: dict[str, int] = {}
        for k, spec in enumerate(specs):
            shared = RawArray("q", counters)
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=target, args=(spec, shared, child), name=f"bench-{prefix}{k}", daemon=True
            )
            self.procs.append(proc)
            self.pipes.append(parent)
            self.counters.append(shared)

    async def _recv(self, k: int, timeout_s: float) -> Any:
        pipe, proc = self.pipes[k], self.procs[k]
        deadline = time.monotonic() + timeout_s
        while not pipe.poll():
            if not proc.is_alive():
                raise WorkerError(f"client process {k} died (exit {proc.exitcode})")
            if time.monotonic() > deadline:
                raise WorkerError(f"client process {k}: no message in {timeout_s} s")
            await asyncio.sleep(0.02)
        message = pipe.recv()
        if message[0] == "error":
            raise WorkerError(f"client process {k} failed: {message[1]}")
        return message

    async def start(self) -> None:
        """Start every process; wait until each is ready."""
        for proc in self.procs:
            proc.start()
        for k in range(len(self.procs)):
            _, pid = await self._recv(k, START_TIMEOUT_S)
            self.pids[f"{self.prefix}{k + 1}"] = pid

    def go(self, *times: float) -> None:
        for pipe in self.pipes:
            pipe.send(("go", *times))

    def total(self, counter: int) -> int:
        return sum(int(c[counter]) for c in self.counters)

    async def results(self, timeout_s: float) -> list[dict[str, Any]]:
        out = []
        for k in range(len(self.procs)):
            _, result = await self._recv(k, timeout_s)
            out.append(result)
        for proc in self.procs:
            proc.join(5.0)
        return out

    def stop(self) -> None:
        """Ask the processes to stop; terminate, then kill, those that do not."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


__all__ = ["ClientProcesses", "WorkerError", "tune_collector"]
