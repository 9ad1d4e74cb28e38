"""Clusters of ``python -m bench.raft_testnode`` processes on loopback: the one harness of the
Raft benchmark (``bench.raft_node``) and of the cluster tests (tests/cluster/harness.py, which
adds fault-injecting proxies, proposals that check histories, and loads).

- ``Cluster`` starts, stops (SIGTERM), kills (SIGKILL) and restarts node processes with fixed
  ports and one data directory per node; ``peer_address`` says where a node dials a peer (a
  subclass may put a proxy there).  A launcher sets ``PR_SET_PDEATHSIG``, so a node cannot
  outlive the process that started it, even one killed by SIGKILL.
- Each node writes its stderr to ``node-<id>.log`` and its stdout, where it prints its ready
  line, to ``node-<id>.out<start>``.
- Control: ``client``/``call`` (one ``ControlClient`` per node, reconnected as needed),
  ``status``/``statuses``, ``leaders``/``wait_leaders`` (one agreed leader per group),
  ``wait_caught_up``, ``wait_quiescent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar, cast

from ctxstore.launcher import free_port

from .raft_control import ControlClient, ControlError

T = TypeVar("T")
Address = tuple[str, int]

HOST = "127.0.0.1"
CLUSTER_ID = "cluster-test"
SECRET = "cluster-test-secret"
READY_TIMEOUT_S = 30.0  # a node prints its ready line within this (slow CI: 6 interpreters)
STOP_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 15.0  # a control request; the node itself gives up after 10 s
REPO_ROOT = Path(__file__).resolve().parents[1]
NODE_MODULE = ("-m", "bench.raft_testnode")


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


# -- processes -------------------------------------------------------------------------------------
# Run the node through a tiny launcher that asks the kernel to SIGKILL it when the test process
# dies (PR_SET_PDEATHSIG survives execve), then execs the node: the pid stays the same.
_LAUNCHER = """\
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        os._exit(1)  # the parent died before prctl
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@dataclass
class NodeProcess:
    id: int
    peer: Address  # the node's own peer listen address (reached by the others via proxies)
    control: Address
    data_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)  # the interpreter's: ``-m module ...``
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


# -- the cluster -----------------------------------------------------------------------------------
class Cluster:
    """``n`` node processes (ids 1..n) of ``groups`` groups each; use ``async with``.

    ``node_args``: the interpreter's arguments that run a node (``-m bench.raft_testnode``, or a
    launcher of it); ``extra_args``: more of the node's flags (later flags win)."""

    def __init__(
        self,
        base: Path,
        n: int = 3,
        groups: int = 256,
        tick_ms: int = 50,
        election_ticks: int = 10,
        snapshot_entries: int | None = None,
        extra_args: Sequence[str] = (),
        node_args: Sequence[str] = NODE_MODULE,
    ) -> None:
        self.base = base
        self.ids = list(range(1, n + 1))
        self.groups = groups
        self.tick_ms = tick_ms
        self.election_ticks = election_ticks
        self.nodes: dict[int, NodeProcess] = {}
        self._node_args = list(node_args)
        self._clients: dict[int, ControlClient] = {}
        self._client_locks: dict[int, asyncio.Lock] = {}
        self._leader_hint: dict[int, int] = {}
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
    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every node; wait until all are ready.

        If a node cannot bind its port (someone else took it between our check and the bind),
        every node is killed, its data directory wiped and the start tried again on new
        ports, once."""
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
            self.ports_changed()

    def ports_changed(self) -> None:
        """Called when ``start`` moved the nodes to new ports (before it starts them again)."""

    def peer_address(self, i: int, j: int) -> Address:
        """Where node ``i`` reaches node ``j`` (``j``'s own peer address)."""
        return self.nodes[j].peer

    def _set_args(self) -> None:
        for i in self.ids:
            node = self.nodes[i]
            peers = ",".join(
                f"{j}={host}:{port}"
                for j in self.ids
                for host, port in [node.peer if j == i else self.peer_address(i, j)]
            )
            node.args = [
                *self._node_args,
                "--id", str(i), "--peers", peers,
                "--control", f"{HOST}:{node.control[1]}", "--data", str(node.data_dir),
                *self._common_args,
            ]  # fmt: skip

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
            self._drop_client(i)
        for i in ids:
            popen = self.nodes[i].popen
            if popen is not None and popen.poll() is None:
                popen.kill()
        for i in ids:
            self.nodes[i].kill()

    async def stop(self, i: int) -> int:
        """SIGTERM node ``i``; its exit status."""
        self._drop_client(i)
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
        self.kill_all()
        for i in list(self._clients):
            self._drop_client(i)

    def running(self) -> list[int]:
        return [i for i in self.ids if self.nodes[i].running]

    def _next_running(self, after: int) -> int:
        running = self.running()
        if not running:
            raise ConnectionError("no node is running")
        later = [i for i in running if i > after]
        return later[0] if later else running[0]

    def check_running(self, ids: Iterable[int] | None = None) -> None:
        """Raise if a node of ``ids`` (default: every started one) is no longer running."""
        for i in self.ids if ids is None else ids:
            node = self.nodes[i]
            if node.popen is not None and not node.running:
                raise RuntimeError(
                    f"node {i} exited with {node.popen.returncode}:\n{node.log_tail(20)}"
                )

    def pids(self) -> dict[str, int]:
        """``{"n<id>": pid}`` of the running nodes."""
        return {f"n{i}": self.nodes[i].pid for i in self.running()}

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
        return "\n".join(out)

    # control clients ------------------------------------------------------------------------------
    async def client(self, i: int) -> ControlClient:
        lock = self._client_locks.setdefault(i, asyncio.Lock())
        async with lock:
            c = self._clients.get(i)
            if c is not None and not c.closed:
                return c
            self._drop_client(i)
            if not self.nodes[i].running:
                raise ConnectionError(f"node {i} is not running")
            host, port = self.nodes[i].control
            async with asyncio.timeout(5.0):
                c = await ControlClient.connect(host, port)
            self._clients[i] = c
            return c

    def _drop_client(self, i: int) -> None:
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

    async def status(self, i: int, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        return await self.call(i, lambda c: c.status(), timeout)

    async def statuses(
        self, ids: Iterable[int] | None = None, *, answered_only: bool = False
    ) -> dict[int, dict[str, Any]]:
        """The status of each node of ``ids`` (default: the running ones); ``answered_only``:
        of those that answer (the others are left out instead of raising)."""
        ids = list(self.running() if ids is None else ids)
        got = await asyncio.gather(*(self.status(i) for i in ids), return_exceptions=answered_only)
        return {i: s for i, s in zip(ids, got, strict=True) if isinstance(s, dict)}

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
