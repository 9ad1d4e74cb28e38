"""The shell a simulated node gives ctxstore's ``Router`` (ctxstore/router.py), in place of
asyncio and TCP: the router's own code runs unchanged above the node's pipeline.

- ``SimLoop``: the router's clock and timers (``time``, ``call_later``, ``call_soon``), on the
  simulated clock; the cluster runs the timers due in each of the node's rounds (before its
  pass: a ``call_soon`` made in a pass runs in the next round, as in the next loop
  iteration).  Nothing else of an event loop is there: a router path that needs one fails.
- ``SimDriver``: what the router asks of ``raft.driver.Driver`` (``propose_then``,
  ``read_index_then``, ``leader``, ``kick``, ``host``), each the one pipeline call the driver
  makes; ``kick`` asks the cluster for a pass, whose start proposes the router's append
  batches (the driver's ``before_pass``).
- ``SimTransport``: the peer connection's application lane (``send_app``, ``is_connected``,
  ``connected_peers``): a payload travels over the simulated network like a Raft message (it
  may be delayed, reordered, duplicated, dropped, cut by a partition), and only while the
  node's transport reports the peer up (``SimNode.connected``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from contextvars import Context
from typing import TYPE_CHECKING, Any

from raft.multi import MultiRaft
from raft.pipeline import Pipeline, ResultCallback

if TYPE_CHECKING:
    from .cluster import SimNode


class SimLoop(asyncio.AbstractEventLoop):
    """Time and timers on the simulated clock (the rest of ``AbstractEventLoop`` raises)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._clock()

    def get_debug(self) -> bool:
        return False

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.TimerHandle:
        return self.call_at(self.time(), callback, *args, context=context)  # (the next round)

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._timers, (when, next(self._order), handle))
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # (a cancelled handle is skipped when it comes due)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        raise context["exception"]  # a router callback raised: the run fails

    def run_due(self) -> int:
        """Run the timers due by now, in order (those they set that are due too); how many."""
        ran = 0
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            handle = heapq.heappop(self._timers)[2]
            if not handle.cancelled():
                handle._run()
                ran += 1
        return ran


class SimDriver:
    """The driver's calls the router makes, on the node's pipeline (raft/driver.py's own)."""

    def __init__(self, pipeline: Pipeline, kick: Callable[[], None]) -> None:
        self.pipeline = pipeline
        self.host: MultiRaft = pipeline.host
        self.kick = kick

    def leader(self, group: int) -> int:
        return self.host.leader(group)

    def propose_then(self, group: int, data: bytes, done: ResultCallback) -> None:
        self.pipeline.propose(group, data, done)

    def read_index_then(
        self, group: int, done: ResultCallback, abandoned: Callable[[], bool] | None = None
    ) -> None:
        self.pipeline.read_index(group, done, abandoned)


APP_LANE = -1  # a Packet's group for an application payload (router envelopes)


class SimTransport:
    """The application lane of one node's peer connections, over the simulated network."""

    def __init__(self, node: SimNode) -> None:
        self.node = node

    def is_connected(self, peer: int) -> bool:
        return peer in self.node.connected

    def connected_peers(self) -> list[int]:
        return sorted(self.node.connected)

    def send_app(self, to: int, payload: bytes) -> bool:
        if to not in self.node.connected:
            return False  # (a transport refuses a payload for a peer that is down)
        c = self.node.cluster
        c.net.send_app(c.now, self.node.id, to, payload, c.links.connection(self.node.id, to))
        return True
