"""A harness to run real ``python -m bench.raft_testnode`` processes on loopback.

- ``Cluster`` starts, stops (SIGTERM), kills (SIGKILL) and restarts node processes with fixed
  ports and one data directory per node, every peer link through a ``LinkProxy``
  (tests/cluster/proxy.py), so a test can cut or blackhole the links of one node.
- Topology: the transport dials from the lower id only, so for each pair ``a < b`` one proxy
  listens in front of ``b`` and node ``a`` is told that ``b`` lives at the proxy.  The proxies
  of all pairs containing ``x`` isolate ``x`` from both others (``isolate``, ``blackhole``).
- Every node writes its stderr (WARNING and above) to ``node-<id>.log``; the conftest attaches
  the logs to the report of a failed test.  Processes are SIGKILLed at teardown whatever
  happened, and a launcher sets ``PR_SET_PDEATHSIG`` so that a node cannot outlive the test
  process even if it is itself killed.
- Helpers: ``wait_leaders`` (one agreed leader per group), ``propose`` (to the leader, following
  ``not_leader`` hints with backoff; a fresh payload per attempt, so that a retry after an
  unknown outcome can never duplicate an entry), ``Load`` (many concurrent writers recording
  every acknowledgement), ``histories``, ``wait_converged``, ``wait_caught_up`` and
  ``assert_histories`` (every acknowledged entry once, at its position, on identical
  replicas).

Everything async runs on the test's own event loop (``run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import uvloop

from bench.raft_control import ControlClient, ControlError

from .proxy import LinkProxy

T = TypeVar("T")
Address = tuple[str, int]

HOST = "127.0.0.1"
CLUSTER_ID = "cluster-test"
SECRET = "cluster-test-secret"
READY_TIMEOUT_S = 30.0  # a node prints its ready line within this (slow CI: 6 interpreters)
STOP_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 15.0  # a control request; the node itself gives up after 10 s
REPO_ROOT = Path(__file__).resolve().parents[2]

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


# -- ports -----------------------------------------------------------------------------------------
_PORT_LOW, _PORT_HIGH = 20_000, 32_000  # below Linux's ephemeral range (32768-60999)
_PORT_SLICES = 8
_ports_lock = threading.Lock()
_ports_taken: set[int] = set()
_port_rng = random.Random(os.getpid() ^ time.time_ns())


def _port_slice() -> range:
    """This process's share of the port range: one slice per xdist worker (gw0, gw1, ...), so
    that two workers never pick the same port between checking it and a node binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    size = (_PORT_HIGH - _PORT_LOW) // _PORT_SLICES
    low = _PORT_LOW + (n % _PORT_SLICES) * size
    return range(low, low + size)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the ephemeral range, in this worker's slice, never
    handed out twice by this process.

    A node keeps its ports across restarts (its peers dial a fixed address), so a port from the
    ephemeral range could be taken meanwhile by any outgoing connection's local end; ports
    below it are only taken by someone binding them explicitly."""
    ports = _port_slice()
    eph_low, eph_high = _ephemeral_range()
    with _ports_lock:
        for attempt in range(2000):
            port = _port_rng.choice(ports)
            if port in _ports_taken or (attempt < 1000 and eph_low <= port <= eph_high):
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((HOST, port))  # no SO_REUSEADDR: also avoids ports in TIME_WAIT
                except OSError:
                    continue
            _ports_taken.add(port)
            return port
    raise RuntimeError("no free port found")


_SNAP_NAME = re.compile(r"^([0-9a-f]{8})-([0-9a-f]{16})-([0-9a-f]{8})\.snap$")


# -- statuses --------------------------------------------------------------------------------------
class GroupStatus(NamedTuple):
    group: int
    role: str
    term: int
    lead: int
    commit: int
    applied: int
    last_index: int
    quiescent: bool


def group_table(status: dict[str, Any]) -> dict[int, GroupStatus]:
    return {int(row[0]): GroupStatus(*row) for row in status["groups"]}


@dataclass(frozen=True)
class Ack:
    """An acknowledged proposal: ``data`` is at ``position`` (1-based) of ``group``'s history."""

    group: int
    data: bytes
    position: int
    node: int


class ProposeFailed(Exception):
    pass


# -- processes -------------------------------------------------------------------------------------
# Run the test node through a tiny launcher that asks the kernel to SIGKILL it when the test process
# dies (PR_SET_PDEATHSIG survives execve), then execs the node: the pid stays the same.
_LAUNCHER = """\
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        os._exit(1)  # the parent died before prctl
os.execv(sys.executable, [sys.executable, "-m", "bench.raft_testnode", *sys.argv[2:]])
"""


@dataclass
class NodeProcess:
    id: int
    peer: Address  # the node's own peer listen address (reached by the others via proxies)
    control: Address
    data_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    ready: dict[str, Any] = field(default_factory=dict)
    out_path: Path | None = None  # stdout of the latest start

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def spawn(self) -> None:
        assert not self.running, f"node {self.id} is already running"
        self.starts += 1
        self.data_dir.mkdir(parents=True, exist_ok=True)
        out_path = self.log_path.with_name(f"node-{self.id}.out{self.starts}")
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%H:%M:%S")
            log.write(f"=== harness: start #{self.starts} of node {self.id} at {stamp}\n".encode())
        with self.log_path.open("ab") as log, out_path.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                cwd=REPO_ROOT,
                start_new_session=True,  # a Ctrl-C in the terminal goes to pytest only
            )
        self.out_path = out_path

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the node's ``{"event": "ready"}`` line on stdout."""
        assert self.popen is not None and self.out_path is not None
        deadline = time.monotonic() + timeout
        while True:
            for line in self.out_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and msg.get("event") == "ready":
                        assert msg["pid"] == self.popen.pid, (msg, self.popen.pid)
                        assert msg["node"] == self.id, msg
                        self.ready = msg
                        return msg
            rc = self.popen.poll()
            if rc is not None:
                raise RuntimeError(
                    f"node {self.id} exited with {rc} before it was ready:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.id} not ready in {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL and reap (idempotent)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
        if self.popen is not None:
            self.popen.wait()

    async def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM; wait for the exit and return its status (SIGKILL after ``timeout``)."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"node {self.id} did not stop in {timeout} s on SIGTERM")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _proposer(group: int, data: bytes) -> Callable[[ControlClient], Awaitable[int]]:
    return lambda c: c.propose(group, data)


# -- the cluster -----------------------------------------------------------------------------------
class Cluster:
    """``n`` node processes (ids 1..n) with proxied peer links; use ``async with``."""

    def __init__(
        self,
        base: Path,
        n: int = 3,
        groups: int = 256,
        tick_ms: int = 50,
        election_ticks: int = 10,
        snapshot_entries: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.ids = list(range(1, n + 1))
        self.groups = groups
        self.tick_ms = tick_ms
        self.election_ticks = election_ticks
        self.nodes: dict[int, NodeProcess] = {}
        self.proxies: dict[tuple[int, int], LinkProxy] = {}
        self._clients: dict[int, ControlClient] = {}
        self._client_locks: dict[int, asyncio.Lock] = {}
        self._leader_hint: dict[int, int] = {}
        self._rng = random.Random(0)
        self.loads: list[Load] = []  # stopped on close
        base.mkdir(parents=True, exist_ok=True)
        args = [
            "--groups", str(groups), "--tick-ms", str(tick_ms),
            "--election-ticks", str(election_ticks), "--cluster-id", CLUSTER_ID,
            "--secret", SECRET, "--log-level", "WARNING",
        ]  # fmt: skip
        if snapshot_entries is not None:
            args += ["--snapshot-entries", str(snapshot_entries)]
        self._common_args = [*args, *extra_args]
        for i in self.ids:
            self.nodes[i] = NodeProcess(
                id=i,
                peer=(HOST, free_port()),
                control=(HOST, free_port()),
                data_dir=base / f"n{i}",
                log_path=base / f"node-{i}.log",
            )

    # lifecycle ------------------------------------------------------------------------------------
    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the proxies, then every node; wait until all are ready.

        If a node cannot bind its port (someone else took it between our check and the bind),
        every node is killed, its data directory wiped and the start tried again on new
        ports, once."""
        for a in self.ids:
            for b in self.ids:
                if a < b:
                    proxy = LinkProxy(self.nodes[b].peer, name=f"link {a}->{b}")
                    await proxy.start(HOST)
                    self.proxies[(a, b)] = proxy
        for attempt in range(2):
            self._set_args()
            try:
                await self.start_nodes(self.ids)
                return
            except RuntimeError as e:
                if attempt == 1 or "address already in use" not in str(e).lower():
                    raise
            self.kill_all()
            for node in self.nodes.values():
                shutil.rmtree(node.data_dir, ignore_errors=True)
                node.peer, node.control = (HOST, free_port()), (HOST, free_port())
            for (_, b), proxy in self.proxies.items():
                proxy.upstream = self.nodes[b].peer

    def _set_args(self) -> None:
        for i in self.ids:
            node = self.nodes[i]
            node.args = [
                "--id", str(i), "--peers", self._peers_arg(i),
                "--control", f"{HOST}:{node.control[1]}", "--data", str(node.data_dir),
                *self._common_args,
            ]  # fmt: skip

    def _peers_arg(self, i: int) -> str:
        parts = []
        for j in self.ids:
            if j == i:
                addr = self.nodes[i].peer  # where i listens
            elif i < j:
                addr = self.proxies[(i, j)].address  # i dials j through the link's proxy
            else:
                addr = self.nodes[j].peer  # never dialled: j dials i
            parts.append(f"{j}={addr[0]}:{addr[1]}")
        return ",".join(parts)

    async def start_nodes(self, ids: Iterable[int]) -> float:
        """Spawn the nodes (at once) and wait until each is ready; the seconds it took."""
        t0 = time.monotonic()
        ids = list(ids)
        for i in ids:
            self.nodes[i].spawn()
        waits = [asyncio.ensure_future(self.nodes[i].wait_ready()) for i in ids]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
        for w in pending:
            w.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for w in waits:
            if w in done and w.exception() is not None:
                raise cast(BaseException, w.exception())
        return time.monotonic() - t0

    async def restart(self, i: int) -> float:
        return await self.start_nodes([i])

    async def kill(self, *ids: int) -> None:
        """kill -9 the nodes ``ids``, all signalled before any is reaped."""
        for i in ids:
            await self._drop_client(i)
        for i in ids:
            popen = self.nodes[i].popen
            if popen is not None and popen.poll() is None:
                popen.kill()
        for i in ids:
            self.nodes[i].kill()

    async def stop(self, i: int) -> int:
        """SIGTERM node ``i``; its exit status."""
        await self._drop_client(i)
        return await self.nodes[i].terminate()

    async def stop_all(self) -> dict[int, int]:
        """SIGTERM every running node at once; ``{id: exit status}``."""
        ids = self.running()
        codes = await asyncio.gather(*(self.stop(i) for i in ids))
        return dict(zip(ids, codes, strict=True))

    def kill_all(self) -> None:
        """SIGKILL whatever still runs (synchronous: safe in any teardown)."""
        for node in self.nodes.values():
            node.kill()

    async def close(self) -> None:
        for load in self.loads:
            await load.stop()
        self.kill_all()
        for i in list(self._clients):
            await self._drop_client(i)
        for proxy in self.proxies.values():
            await proxy.close()

    def running(self) -> list[int]:
        return [i for i in self.ids if self.nodes[i].running]

    def snapshot_indexes(self, i: int) -> dict[int, int]:
        """``{group: index}`` of node ``i``'s durable snapshots, from the file names of its WAL
        directory (``{group:08x}-{index:016x}-{n:08x}.snap``, docs/raft.md "WAL"): the control
        port's ``compact`` answers before the snapshot is taken, and nothing in ``status``
        tells where a group's log starts."""
        out: dict[int, int] = {}
        for path in (self.nodes[i].data_dir / "wal").glob("*.snap"):
            m = _SNAP_NAME.match(path.name)
            if m:
                group, index = int(m[1], 16), int(m[2], 16)
                out[group] = max(out.get(group, 0), index)
        return out

    def logs(self, lines: int = 200) -> str:
        out = []
        for i in self.ids:
            node = self.nodes[i]
            out.append(f"----- node {i} (pid {node.ready.get('pid')}, {node.log_path}) -----")
            out.append(node.log_tail(lines))
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

    # control clients ------------------------------------------------------------------------------
    async def client(self, i: int) -> ControlClient:
        lock = self._client_locks.setdefault(i, asyncio.Lock())
        async with lock:
            c = self._clients.get(i)
            if c is not None and not c.closed:
                return c
            if c is not None:
                await self._drop_client(i)
            if not self.nodes[i].running:
                raise ConnectionError(f"node {i} is not running")
            host, port = self.nodes[i].control
            async with asyncio.timeout(5.0):
                c = await ControlClient.connect(host, port)
            self._clients[i] = c
            return c

    async def _drop_client(self, i: int) -> None:
        c = self._clients.pop(i, None)
        if c is not None:
            c.close()

    async def call(
        self, i: int, fn: Callable[[ControlClient], Awaitable[T]], timeout: float = CALL_TIMEOUT_S
    ) -> T:
        c = await self.client(i)
        try:
            async with asyncio.timeout(timeout):
                return await fn(c)
        except RuntimeError as e:  # uvloop: a write on a transport closed meanwhile
            raise ConnectionError(f"node {i}: {e}") from e

    async def status(self, i: int) -> dict[str, Any]:
        return await self.call(i, lambda c: c.status())

    async def statuses(self, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
        ids = list(self.running() if ids is None else ids)
        got = await asyncio.gather(*(self.status(i) for i in ids))
        return dict(zip(ids, got, strict=True))

    # leaders --------------------------------------------------------------------------------------
    async def leaders(self, ids: Iterable[int] | None = None) -> tuple[dict[int, int], list[str]]:
        """``({group: leader}, problems)``: a group is settled when every node of ``ids``
        (default: the running ones) reports the same term and the same leader, that leader is
        one of ``ids`` and the only one of them in the leader role."""
        ids = list(self.running() if ids is None else ids)
        tables = {i: group_table(s) for i, s in (await self.statuses(ids)).items()}
        settled: dict[int, int] = {}
        problems: list[str] = []
        for g in range(self.groups):
            rows = {i: tables[i][g] for i in ids}
            leads = {r.lead for r in rows.values()}
            terms = {r.term for r in rows.values()}
            leaders = [i for i, r in rows.items() if r.role == "leader"]
            lead = next(iter(leads))
            if len(leads) == 1 and len(terms) == 1 and lead in ids and leaders == [lead]:
                settled[g] = lead
            else:
                view = ", ".join(f"n{i}:{r.role}/t{r.term}/lead={r.lead}" for i, r in rows.items())
                problems.append(f"group {g}: {view}")
        return settled, problems

    async def wait_leaders(
        self, ids: Iterable[int] | None = None, timeout: float = 30.0
    ) -> dict[int, int]:
        """Wait until every group has exactly one leader among ``ids``, known to all of them."""
        ids = list(self.running() if ids is None else ids)
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        while time.monotonic() < deadline:
            try:
                settled, problems = await self.leaders(ids)
            except (ConnectionError, OSError, TimeoutError, ControlError) as e:
                problems = [f"status failed: {e!r}"]
            else:
                if not problems:
                    self._leader_hint.update(settled)
                    return settled
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"not every group has one agreed leader among nodes {ids} after {timeout} s: "
            f"{len(problems)} unsettled, e.g.\n  " + "\n  ".join(problems[:10])
        )

    async def leader_of(self, group: int, ids: Iterable[int] | None = None) -> int:
        settled, problems = await self.leaders(ids)
        if group not in settled:
            raise AssertionError(f"group {group} has no settled leader: {problems[:3]}")
        return settled[group]

    async def leader_counts(self, ids: Iterable[int] | None = None) -> Counter[int]:
        settled, _ = await self.leaders(ids)
        return Counter(settled.values())

    def leader_hint(self, group: int) -> int:
        """The node last seen leading ``group`` if it runs, else any running node."""
        hint = self._leader_hint.get(group, 0)
        return hint if hint and self.nodes[hint].running else self._next_running(0)

    # proposals ------------------------------------------------------------------------------------
    def _next_running(self, after: int) -> int:
        running = self.running()
        if not running:
            raise ConnectionError("no node is running")
        later = [i for i in running if i > after]
        return later[0] if later else running[0]

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

    async def wait_caught_up(self, i: int, ids: Iterable[int], timeout: float = 60.0) -> float:
        """Wait until node ``i`` has applied, in every group, everything the nodes ``ids`` had
        committed when called (writes may go on meanwhile); the seconds it took."""
        t0 = time.monotonic()
        tables = [group_table(s) for s in (await self.statuses(ids)).values()]
        target = {g: max(t[g].commit for t in tables) for g in range(self.groups)}
        behind: list[int] = []
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(ConnectionError, OSError, TimeoutError, ControlError):
                mine = group_table(await self.status(i))
                behind = [g for g in range(self.groups) if mine[g].applied < target[g]]
                if not behind:
                    return time.monotonic() - t0
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"node {i} did not catch up in {timeout} s: {len(behind)} groups behind, e.g. "
            f"{[(g, target[g]) for g in behind[:5]]}"
        )

    async def wait_quiescent(self, ids: Iterable[int] | None = None, timeout: float = 30.0) -> None:
        """Wait until no group is awake on any node of ``ids`` (every group quiescent)."""
        ids = list(self.running() if ids is None else ids)
        deadline = time.monotonic() + timeout
        awake: dict[int, int] = {}
        while time.monotonic() < deadline:
            sts = await self.statuses(ids)
            awake = {i: s["awake"] for i, s in sts.items()}
            quiet = all(r.quiescent for s in sts.values() for r in group_table(s).values())
            if quiet and not any(awake.values()):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"groups still awake after {timeout} s: {awake}")


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
