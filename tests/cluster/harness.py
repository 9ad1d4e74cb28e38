"""The cluster tests' harness: ``bench.raft_cluster``'s clusters of real
``python -m bench.raft_testnode`` processes, plus what tests need.

- Every peer link goes through a ``LinkProxy`` (tests/cluster/proxy.py), so a test can cut or
  blackhole the links of one node.  Topology: the transport dials from the lower id only, so
  for each pair ``a < b`` one proxy listens in front of ``b`` and node ``a`` is told that ``b``
  lives at the proxy.  The proxies of all pairs containing ``x`` isolate ``x`` from both others
  (``isolate``, ``blackhole``).
- The conftest attaches the node logs to the report of a failed test, and SIGKILLs the
  processes at teardown whatever happened.
- Helpers: ``propose`` (to the leader, following ``not_leader`` hints with backoff; a fresh
  payload per attempt, so that a retry after an unknown outcome can never duplicate an entry),
  ``Load`` (many concurrent writers recording every acknowledgement), ``histories``,
  ``wait_converged`` and ``assert_histories`` (every acknowledged entry once, at its position,
  on identical replicas).

Everything async runs on the test's own event loop (``run``).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from bench import raft_cluster
from bench.raft_cluster import (
    CALL_TIMEOUT_S,
    HOST,
    Address,
    group_table,
)
from bench.raft_control import ControlClient, ControlError

from .proxy import LinkProxy

T = TypeVar("T")

# Outcomes of a proposal attempt that say nothing about whether the entry will be applied.
UNKNOWN_CODES = frozenset({"timeout", "outcome_unknown", "node_stopped", "proposal_dropped"})


def run(body: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
    """Run a test coroutine on a fresh uvloop with a hard timeout.

    Just before the timeout the stack of every task is printed (to stderr, so it lands in the
    report of the failing test): a hang says where it hangs.

    The harness uses ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11,
    ``wait_for`` loses a cancellation that arrives as its inner task finishes (CPython
    gh-86296), which once left a writer running after ``Load.stop`` and hung a test."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        watchdog = loop.call_later(max(timeout - 1.0, 0.5), _dump_tasks, timeout)
        try:
            async with asyncio.timeout(timeout):
                return await body()
        finally:
            watchdog.cancel()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(guarded())


def _dump_tasks(timeout: float) -> None:
    print(f"--- the test is about to hit its {timeout} s timeout; tasks:", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(limit=12, file=sys.stderr)


@dataclass(frozen=True)
class Ack:
    """An acknowledged proposal: ``data`` is at ``position`` (1-based) of ``group``'s history."""

    group: int
    data: bytes
    position: int
    node: int


class ProposeFailed(Exception):
    pass


def _proposer(group: int, data: bytes) -> Callable[[ControlClient], Awaitable[int]]:
    return lambda c: c.propose(group, data)


# -- the cluster -----------------------------------------------------------------------------------
class Cluster(raft_cluster.Cluster):
    """``n`` node processes (ids 1..n) with proxied peer links; use ``async with``."""

    def __init__(self, base: Path, n: int = 3, **kw: Any) -> None:
        super().__init__(base, n, **kw)
        self.proxies: dict[tuple[int, int], LinkProxy] = {}
        self._rng = random.Random(0)
        self.loads: list[Load] = []  # stopped on close

    async def start(self) -> None:
        """Start the proxies, then every node (``raft_cluster.Cluster.start``)."""
        for a in self.ids:
            for b in self.ids:
                if a < b:
                    proxy = LinkProxy(self.nodes[b].peer, name=f"link {a}->{b}")
                    await proxy.start(HOST)
                    self.proxies[(a, b)] = proxy
        await super().start()

    def peer_address(self, i: int, j: int) -> Address:
        if i < j:
            return self.proxies[(i, j)].address  # i dials j through the link's proxy
        return self.nodes[j].peer  # never dialled: j dials i

    def ports_changed(self) -> None:
        for (_, b), proxy in self.proxies.items():
            proxy.upstream = self.nodes[b].peer

    async def close(self) -> None:
        for load in self.loads:
            await load.stop()
        await super().close()
        for proxy in self.proxies.values():
            await proxy.close()

    def logs(self, lines: int = 200) -> str:
        out = [super().logs(lines)]
        for (a, b), p in self.proxies.items():
            out.append(
                f"----- proxy {a}->{b}: mode={p.mode.value} accepted={p.accepted} "
                f"aborted={p.aborted} forwarded={p.forwarded_bytes} dropped={p.dropped_bytes}"
            )
        return "\n".join(out)

    # faults ---------------------------------------------------------------------------------------
    def links_of(self, i: int) -> list[LinkProxy]:
        return [p for (a, b), p in self.proxies.items() if i in (a, b)]

    def isolate(self, i: int) -> None:
        """Cut both links of node ``i`` (connections reset, new ones refused)."""
        for p in self.links_of(i):
            p.cut()

    def blackhole(self, i: int) -> None:
        """Drop every byte on both links of node ``i``; connections stay open."""
        for p in self.links_of(i):
            p.blackhole()

    def heal(self) -> None:
        for p in self.proxies.values():
            p.heal()

    # proposals ------------------------------------------------------------------------------------
    async def propose(
        self,
        group: int,
        make_data: Callable[[int], bytes],
        *,
        timeout: float = 60.0,
        on_attempt: Callable[[bytes], None] = lambda data: None,
        errors: Counter[str] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        call_timeout: float = CALL_TIMEOUT_S,
    ) -> Ack:
        """Propose to ``group``'s leader until one attempt is acknowledged.

        Each attempt proposes ``make_data(attempt)`` (a payload the caller makes unique), so an
        attempt whose outcome is unknown (timeout, lost connection) may still be applied but is
        never applied twice.  ``not_leader`` hints are followed at once (twice in a row at
        most), anything else backs off (20 ms doubling to 500 ms) and tries the next node.
        An attempt unanswered after ``call_timeout`` is abandoned (an unknown outcome too)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        target = self._leader_hint.get(group) or self._next_running(0)
        if not self.nodes[target].running:
            target = self._next_running(target)
        backoff, followed, attempt = 0.02, 0, 0
        last: BaseException | None = None
        while loop.time() < deadline and not stopping():
            data = make_data(attempt)
            attempt += 1
            on_attempt(data)
            try:
                position = await self.call(target, _proposer(group, data), call_timeout)
            except ControlError as e:
                last = e
                if errors is not None:
                    errors[e.code] += 1
                if e.code == "bad_request":
                    raise
                hint = e.leader
                if hint and hint != target and self.nodes[hint].running and followed < 2:
                    target = self._leader_hint[group] = hint
                    followed += 1
                    continue
                if e.code == "not_leader" or e.code in UNKNOWN_CODES:
                    target = self._next_running(target)
            except (ConnectionError, OSError, TimeoutError) as e:
                last = e
                if errors is not None:
                    errors[type(e).__name__] += 1
                target = self._next_running(target)
            else:
                self._leader_hint[group] = target
                return Ack(group, data, position, target)
            followed = 0
            await asyncio.sleep(backoff * self._rng.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 0.5)
        raise ProposeFailed(f"group {group}: no acknowledgement (last error: {last!r})")

    async def propose_everywhere(
        self, tag: str, attempted: set[bytes], groups: Iterable[int] | None = None
    ) -> list[Ack]:
        """One acknowledged proposal on every group (all at once); every payload sent is added
        to ``attempted``."""
        groups = list(range(self.groups) if groups is None else groups)

        def payloads(group: int) -> Callable[[int], bytes]:
            return lambda attempt: f"{tag}/{group}/{attempt}".encode()

        return list(
            await asyncio.gather(
                *(self.propose(g, payloads(g), on_attempt=attempted.add) for g in groups)
            )
        )

    # histories ------------------------------------------------------------------------------------
    async def history(self, i: int, group: int) -> list[bytes]:
        applied, items = await self.call(i, lambda c: c.read(group))
        assert applied == len(items), (i, group, applied, len(items))
        return items

    async def histories(
        self, ids: Iterable[int] | None = None, groups: Iterable[int] | None = None
    ) -> dict[int, dict[int, list[bytes]]]:
        """``{node: {group: [data, ...]}}``: each node's full applied history of each group."""
        ids = list(self.running() if ids is None else ids)
        groups = list(range(self.groups) if groups is None else groups)
        out: dict[int, dict[int, list[bytes]]] = {}
        for i in ids:
            got = await asyncio.gather(*(self.history(i, g) for g in groups))
            out[i] = dict(zip(groups, got, strict=True))
        return out

    async def wait_converged(
        self, ids: Iterable[int] | None = None, timeout: float = 60.0
    ) -> dict[int, dict[int, list[bytes]]]:
        """Wait until, for every group, the nodes of ``ids`` have applied the same log (same
        applied index, nothing uncommitted or unapplied) and hold identical histories."""
        ids = list(self.running() if ids is None else ids)
        deadline = time.monotonic() + timeout
        why = "never checked"
        while time.monotonic() < deadline:
            try:
                tables = {i: group_table(s) for i, s in (await self.statuses(ids)).items()}
            except (ConnectionError, OSError, TimeoutError, ControlError) as e:
                why = f"status failed: {e!r}"
                await asyncio.sleep(0.1)
                continue
            lagging = []
            for g in range(self.groups):
                rows = [tables[i][g] for i in ids]
                applied = {r.applied for r in rows}
                if len(applied) > 1 or any(r.commit != r.last_index for r in rows):
                    lagging.append(g)
            if lagging:
                g = lagging[0]
                rows_text = ", ".join(
                    f"n{i}: commit={tables[i][g].commit} applied={tables[i][g].applied} "
                    f"last={tables[i][g].last_index}"
                    for i in ids
                )
                why = f"{len(lagging)} groups lag, e.g. group {g}: {rows_text}"
                await asyncio.sleep(0.1)
                continue
            hists = await self.histories(ids)
            diverged = [g for g in range(self.groups) if len({tuple(hists[i][g]) for i in ids}) > 1]
            if not diverged:
                return hists
            why = f"{len(diverged)} groups have different histories, e.g. {diverged[:5]}"
            await asyncio.sleep(0.1)
        raise AssertionError(f"nodes {ids} did not converge in {timeout} s: {why}")


# -- load ------------------------------------------------------------------------------------------
class Load:
    """``writers`` concurrent writers, each proposing one entry at a time to its share of
    ``groups`` (writer w takes groups[w::writers]) through ``Cluster.propose``.

    Records every acknowledgement (``acks``) and every payload ever sent (``attempted``).
    A writer gives up on an attempt after ``call_timeout`` (default 3 s) and retries with a
    fresh payload: a proposal left on a deposed leader is only answered by the node's own
    10 s request timeout, and waiting for it would stall most writers after a partition."""

    def __init__(
        self,
        cluster: Cluster,
        groups: Sequence[int],
        writers: int = 50,
        tag: str = "load",
        call_timeout: float = 3.0,
    ) -> None:
        self.cluster = cluster
        self.call_timeout = call_timeout
        self.groups = list(groups)
        self.writers = writers
        self.tag = tag
        self.acks: list[Ack] = []
        self.attempted: set[bytes] = set()
        self.errors: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0
        self._stopping = False

    def start(self) -> Load:
        loop = asyncio.get_running_loop()
        self.cluster.loads.append(self)
        self._tasks = [loop.create_task(self._writer(w)) for w in range(self.writers)]
        return self

    async def _writer(self, w: int) -> None:
        mine = self.groups[w :: self.writers] or [self.groups[w % len(self.groups)]]
        k = 0
        while not self._stopping:
            group = mine[k % len(mine)]
            k += 1

            def make(attempt: int, group: int = group) -> bytes:
                self._seq += 1
                return f"{self.tag}/{group}/{w}/{self._seq}".encode()

            try:
                ack = await self.cluster.propose(
                    group,
                    make,
                    on_attempt=self.attempted.add,
                    errors=self.errors,
                    timeout=120,
                    stopping=lambda: self._stopping,
                    call_timeout=self.call_timeout,
                )
            except ProposeFailed:
                self.errors["gave_up"] += 1
                continue
            self.acks.append(ack)  # even while stopping: it is acknowledged

    async def stop(self) -> None:
        """Stop every writer now; a proposal in flight is abandoned (its outcome unknown)."""
        self._stopping = True  # in case a cancellation is lost anyway
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise AssertionError("a writer failed") from r

    def check_running(self) -> None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise AssertionError("a writer failed") from t.exception()

    async def wait_written(self, since: int, timeout: float = 60.0) -> None:
        """Wait until every group of the load has an acknowledgement after ``acks[since]``."""
        deadline = time.monotonic() + timeout
        missing = set(self.groups)
        while True:
            self.check_running()
            missing -= {a.group for a in self.acks[since:]}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(missing)} groups not written in {timeout} s, e.g. {sorted(missing)[:10]}"
                    f"; errors so far: {dict(self.errors)}"
                )
            await asyncio.sleep(0.05)

    async def wait_acks(
        self, count: int, timeout: float = 60.0, groups: Iterable[int] | None = None
    ) -> None:
        """Wait until ``count`` more acknowledgements (on ``groups`` if given) arrive."""
        wanted = None if groups is None else set(groups)

        def n() -> int:
            if wanted is None:
                return len(self.acks)
            return sum(1 for a in self.acks if a.group in wanted)

        target = n() + count
        deadline = time.monotonic() + timeout
        while n() < target:
            self.check_running()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {n() - target + count}/{count} acknowledgements in {timeout} s; "
                    f"errors so far: {dict(self.errors)}"
                )
            await asyncio.sleep(0.02)


# -- checks ----------------------------------------------------------------------------------------
def history_problems(
    hists: dict[int, dict[int, list[bytes]]], acks: Iterable[Ack], attempted: set[bytes]
) -> list[str]:
    """Everything wrong with the replicas' histories given what was acknowledged:

    - the replicas of a group differ;
    - an entry is in a history twice, or was never proposed by the test;
    - an acknowledged entry is not at its acknowledged position in every replica."""
    problems: list[str] = []
    nodes = sorted(hists)
    groups = sorted(hists[nodes[0]])
    for g in groups:
        first = hists[nodes[0]][g]
        for i in nodes[1:]:
            other = hists[i][g]
            if other != first:
                at = next(
                    (k for k, (x, y) in enumerate(zip(first, other, strict=False)) if x != y),
                    min(len(first), len(other)),
                )
                problems.append(
                    f"group {g}: node {nodes[0]} ({len(first)} entries) and node {i} "
                    f"({len(other)} entries) differ from position {at + 1}"
                )
        for i in nodes:
            h = hists[i][g]
            dup = [d for d, c in Counter(h).items() if c > 1]
            if dup:
                problems.append(f"group {g} on node {i}: duplicated entries {dup[:3]}")
            alien = [d for d in h if d not in attempted]
            if alien:
                problems.append(f"group {g} on node {i}: entries never proposed {alien[:3]}")
    for a in acks:
        for i in nodes:
            h = hists[i][a.group]
            got = h[a.position - 1] if 0 < a.position <= len(h) else None
            if got != a.data:
                where = [k + 1 for k, d in enumerate(h) if d == a.data]
                problems.append(
                    f"ack {a.data!r} (group {a.group}, position {a.position}, via node {a.node})"
                    f": node {i} has {got!r} there; the entry is at {where or 'no position'}"
                )
    return problems


def assert_histories(
    hists: dict[int, dict[int, list[bytes]]], acks: Iterable[Ack], attempted: set[bytes]
) -> None:
    problems = history_problems(hists, acks, attempted)
    assert not problems, f"{len(problems)} history problems:\n  " + "\n  ".join(problems[:20])
