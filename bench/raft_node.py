"""Benchmark of ``raft/`` on a local 3-node cluster of ``python -m bench.raft_testnode`` processes.

    python -m bench.raft_node throughput --concurrency 256 --duration 20 [--json out.json]
    python -m bench.raft_node idle --duration 60
    python -m bench.raft_node failover --concurrency 64 --duration 20

Every run starts its own cluster (free local ports, a temporary data directory that is removed
afterwards, the node processes killed on exit or Ctrl-C), waits until every group has a leader
and then runs one scenario:

- ``throughput``: a closed loop of C proposals in flight in total, over the groups round-robin,
  each sent to the group's leader (``not_leader`` hints are followed) from P client processes;
  latency is from the first send to the ack (quorum-fsync'd and applied on the leader).
- ``idle``: once every group is quiescent, the nodes' CPU, awake groups and peer messages.
- ``failover``: the throughput loop; at mid-run the node leading the most groups is killed with
  SIGKILL; time until every group has a leader again, the longest gap between acks on the groups
  it led, p99 before/after; then the node is restarted and must catch up.

One progress line per second goes to stderr; the results table to stdout; ``--json FILE`` writes
every figure with the command line, the git commit, the machine and the date.  See
docs/raft-bench.md.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from multiprocessing.sharedctypes import RawArray
from typing import Any

from bench import sysinfo
from bench.load import stop_workers
from bench.raft_control import ControlClient, ControlError, Propose, Status
from bench.sysinfo import CpuSample, cpu_seconds, run_command

HOST = "127.0.0.1"
NODE_IDS = (1, 2, 3)
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 5.0
DOWN_RETRY_S = 0.5  # a node whose connection failed is not tried again before this
DRAIN_S = 15.0  # after the window, how long the clients wait for the requests still in flight
ROLE_LEADER = "leader"
now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine


# -- measurements from /proc and elsewhere -------------------------------------------------------


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, over every core, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    values = [int(v) for v in parts[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def sample_cpu(pids: dict[str, int]) -> CpuSample:
    return CpuSample(now(), {k: cpu_seconds(p) for k, p in pids.items()}, machine_busy_seconds())


def cpu_between(a: CpuSample, b: CpuSample) -> dict[str, Any]:
    """CPU use over [a, b]: per process as % of one core, and the machine's busy %."""
    span = b.t - a.t
    out: dict[str, Any] = {"seconds": span, "processes": {}}
    for key, before in a.pids.items():
        after = b.pids.get(key)
        if before is None or after is None:
            out["processes"][key] = None
            continue
        out["processes"][key] = {
            "cpu_seconds": after - before,
            "pct_of_core": 100.0 * (after - before) / span if span > 0 else 0.0,
        }
    busy = b.machine[0] - a.machine[0]
    total = b.machine[1] - a.machine[1]
    ours = sum(p["cpu_seconds"] for p in out["processes"].values() if p)
    out["machine_busy_pct"] = 100.0 * busy / total if total > 0 else 0.0
    out["machine_cores"] = os.cpu_count() or 1
    # CPU of every other process of the machine (other work on the box skews the figures):
    out["others_pct_of_core"] = 100.0 * max(0.0, busy - ours) / span if span > 0 else 0.0
    return out


def background_load(seconds: float = 1.0) -> float:
    """The machine's busy CPU before the run, in % of one core."""
    a = machine_busy_seconds()
    time.sleep(seconds)
    b = machine_busy_seconds()
    return 100.0 * (b[0] - a[0]) / seconds


def machine_info(data_parent: str) -> dict[str, Any]:
    # The nodes and clients inherit the bench's nice value.
    return {**sysinfo.machine_info(data_parent), "nice": os.getpriority(os.PRIO_PROCESS, 0)}


def run_info(argv: Sequence[str], data_parent: str) -> dict[str, Any]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "command": shlex.join([sys.executable, "-m", "bench.raft_node", *argv]),
        "git_commit": run_command(["git", "-C", root, "rev-parse", "HEAD"]),
        "git_dirty": bool(run_command(["git", "-C", root, "status", "--porcelain", "--", "raft"])),
        "machine": machine_info(data_parent),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    """Exact nearest-rank percentiles of ``values`` (seconds) in milliseconds."""
    if not values:
        return {}
    s = sorted(values)
    n = len(s)

    def rank(q: float) -> float:
        return 1000.0 * s[max(0, math.ceil(q * n) - 1)]

    return {
        "count": n,
        "mean": 1000.0 * sum(s) / n,
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p99.9": rank(0.999),
        "max": 1000.0 * s[-1],
    }


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the cluster ---------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclasses.dataclass
class NodeProc:
    id: int
    peer_port: int
    control_port: int
    data: str
    log_path: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


_SWITCH_LAUNCHER = (
    "import runpy, sys; sys.setswitchinterval(float(sys.argv.pop(1)) / 1000); "
    "runpy.run_module('bench.raft_testnode', run_name='__main__', alter_sys=True)"
)


class ClusterError(Exception):
    pass


class Cluster:
    """Three ``bench.raft_testnode`` processes in their own sessions (a Ctrl-C reaches only the
    bench, which stops them: SIGTERM, then SIGKILL after 10 s)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.groups: int = args.groups
        self.extra: list[str] = [
            f"--tick-ms={args.tick_ms}",
            f"--election-ticks={args.election_ticks}",
            f"--heartbeat-ticks={args.heartbeat_ticks}",
            f"--snapshot-entries={args.snapshot_entries}",
            f"--log-level={args.node_log_level}",
        ]
        if args.lazy_commit:
            self.extra.append("--lazy-commit")
        if args.skip_busy_heartbeats:
            self.extra.append("--skip-busy-heartbeats")
        self.launcher = [sys.executable, "-m", "bench.raft_testnode"]
        if args.switch_interval_ms:  # an experiment: the GIL hand-over period of the nodes
            self.launcher = [sys.executable, "-c", _SWITCH_LAUNCHER, str(args.switch_interval_ms)]
        self.keep = args.keep_data
        self.dir = tempfile.mkdtemp(prefix="raft-bench-", dir=args.data_parent)
        ports = free_ports(2 * len(NODE_IDS))
        self.nodes = {
            i: NodeProc(
                i,
                ports[k],
                ports[len(NODE_IDS) + k],
                os.path.join(self.dir, f"n{i}"),
                os.path.join(self.dir, f"n{i}.log"),
            )
            for k, i in enumerate(NODE_IDS)
        }
        self.links: dict[int, ControlClient] = {}

    def peers_arg(self) -> str:
        return ",".join(f"{n.id}={HOST}:{n.peer_port}" for n in self.nodes.values())

    def controls(self) -> dict[int, tuple[str, int]]:
        return {n.id: (HOST, n.control_port) for n in self.nodes.values()}

    def pids(self) -> dict[str, int]:
        return {f"n{n.id}": n.pid for n in self.nodes.values() if n.alive()}

    def alive_ids(self) -> list[int]:
        return [n.id for n in self.nodes.values() if n.alive()]

    async def start_node(self, node_id: int) -> float:
        """Start a node; return the seconds until its ready line."""
        n = self.nodes[node_id]
        os.makedirs(n.data, exist_ok=True)
        cmd = [
            *self.launcher,
            f"--id={n.id}",
            f"--peers={self.peers_arg()}",
            f"--control={HOST}:{n.control_port}",
            f"--data={n.data}",
            f"--groups={self.groups}",
            *self.extra,
        ]
        started = now()
        with open(n.log_path, "ab") as err:
            n.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
            )
        n.starts += 1
        assert n.proc.stdout is not None
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(
                loop.run_in_executor(None, n.proc.stdout.readline), READY_TIMEOUT_S
            )
        except TimeoutError:
            raise ClusterError(f"node {n.id}: no ready line in {READY_TIMEOUT_S} s") from None
        try:
            ready = json.loads(line)
        except ValueError:
            raise ClusterError(f"node {n.id} did not start:\n{self.log_tail(n.id)}") from None
        if ready.get("event") != "ready" or ready.get("pid") != n.proc.pid:
            raise ClusterError(f"node {n.id}: unexpected first line {line!r}")
        return now() - started

    async def start(self) -> None:
        await asyncio.gather(*(self.start_node(i) for i in self.nodes))

    def log_tail(self, node_id: int, lines: int = 20) -> str:
        with contextlib.suppress(OSError), open(self.nodes[node_id].log_path, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        return ""

    async def link(self, node_id: int) -> ControlClient:
        link = self.links.get(node_id)
        if link is None or link.closed:
            link = await asyncio.wait_for(
                ControlClient.connect(HOST, self.nodes[node_id].control_port), STATUS_TIMEOUT_S
            )
            self.links[node_id] = link
        return link

    async def status(self, node_id: int) -> dict[str, Any]:
        link = await self.link(node_id)
        return dict(await asyncio.wait_for(link.call(Status), STATUS_TIMEOUT_S))

    async def statuses(self, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
        """The status of each node given (default: the live ones) that answers."""
        ids = list(self.alive_ids() if ids is None else ids)
        got = await asyncio.gather(*(self.status(i) for i in ids), return_exceptions=True)
        return {i: s for i, s in zip(ids, got, strict=True) if isinstance(s, dict)}

    def leaders(self, statuses: dict[int, dict[str, Any]]) -> dict[int, int]:
        """group -> the node that reports itself leader with the highest term (if any)."""
        best: dict[int, tuple[int, int]] = {}
        for node_id, st in statuses.items():
            for g, role, term, *_ in st["groups"]:
                if role == ROLE_LEADER and term > best.get(g, (-1, 0))[0]:
                    best[g] = (term, node_id)
        return {g: node for g, (_, node) in best.items()}

    async def wait_leaders(self, timeout: float) -> dict[int, int]:
        """Until every group has a leader that every live node knows."""
        deadline = now() + timeout
        while True:
            self.check_alive()
            sts = await self.statuses()
            leaders = self.leaders(sts)
            agreed = len(sts) == len(self.alive_ids()) and all(
                leaders.get(g) == lead and lead != 0
                for st in sts.values()
                for g, _, _, lead, *_ in st["groups"]
            )
            if agreed and len(leaders) == self.groups:
                return leaders
            if now() > deadline:
                raise ClusterError(f"only {len(leaders)}/{self.groups} groups have a leader")
            await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is not None and n.proc.returncode != -9:
                raise ClusterError(
                    f"node {n.id} exited with {n.proc.returncode}:\n{self.log_tail(n.id)}"
                )

    def kill(self, node_id: int) -> None:
        n = self.nodes[node_id]
        assert n.proc is not None
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait()
        link = self.links.pop(node_id, None)
        if link is not None:
            link.close()

    def close_links(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()

    def stop(self) -> None:
        """Synchronous, idempotent: stop every node, remove the data unless --keep-data."""
        procs = [n.proc for n in self.nodes.values() if n.proc is not None]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        deadline = now() + 10.0
        for p in procs:
            try:
                p.wait(max(0.0, deadline - now()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        if self.keep:
            log(f"data kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


# -- the client processes ------------------------------------------------------------------------
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


class LoadClient:
    """The closed loop of one client process."""

    def __init__(self, spec: WorkerSpec, counters: Any) -> None:
        self.spec = spec
        self.counters = counters  # RawArray('q', 2): acks, errors (read by the parent)
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
        self.counters[1] += 1

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
                self.counters[0] += 1
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
        client = LoadClient(spec, counters)
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


class Clients:
    """P spawned client processes running the closed loop together."""

    def __init__(self, spec_args: argparse.Namespace, cluster: Cluster, leaders: dict[int, int]):
        c, p = spec_args.concurrency, spec_args.procs
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.counters: list[Any] = []
        self.pids: dict[str, int] = {}
        for k in range(p):
            spec = WorkerSpec(
                index=k,
                slots=tuple(range(k, c, p)),
                concurrency=c,
                groups=cluster.groups,
                payload_bytes=spec_args.payload_bytes,
                nodes=cluster.controls(),
                leaders=leaders,
                retry_s=spec_args.retry_ms / 1000,
            )
            counters = RawArray("q", 2)
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=worker_main, args=(spec, counters, child), name=f"client{k}", daemon=True
            )
            self.procs.append(proc)
            self.pipes.append(parent)
            self.counters.append(counters)

    async def _recv(self, k: int, timeout: float) -> Any:
        pipe = self.pipes[k]
        loop = asyncio.get_running_loop()
        deadline = now() + timeout
        while not pipe.poll():
            if not self.procs[k].is_alive():
                raise ClusterError(f"client process {k} died (exit {self.procs[k].exitcode})")
            if now() > deadline:
                raise ClusterError(f"client process {k}: no message in {timeout} s")
            await asyncio.sleep(0.02)
        message = await loop.run_in_executor(None, pipe.recv)
        if message[0] == "error":
            raise ClusterError(f"client process {k} failed: {message[1]}")
        return message

    async def start(self) -> None:
        for proc in self.procs:
            proc.start()
        for k in range(len(self.procs)):
            _, pid = await self._recv(k, 60.0)
            self.pids[f"c{k + 1}"] = pid

    def go(self, start: float, end: float) -> None:
        for pipe in self.pipes:
            pipe.send(("go", start, end))

    def totals(self) -> tuple[int, int]:
        return sum(c[0] for c in self.counters), sum(c[1] for c in self.counters)

    async def results(self, timeout: float) -> list[WorkerResult]:
        out = []
        for k in range(len(self.procs)):
            _, result = await self._recv(k, timeout)
            out.append(WorkerResult(**result))
        for proc in self.procs:
            proc.join(5.0)
        return out

    def stop(self) -> None:
        stop_workers(self.pipes, self.procs)


# -- runs ----------------------------------------------------------------------------------------
WAL_KEYS = ("fsyncs", "rounds", "batches", "records", "bytes", "fsync_seconds_total")
DRIVER_KEYS = ("passes", "readies", "submits", "proposals", "applied_entries", "messages_sent")
HOST_KEYS = ("ticks", "quiesced", "woken", "campaigns", "early_campaigns")


@dataclasses.dataclass
class Snapshot:
    cpu: CpuSample
    statuses: dict[int, dict[str, Any]]


async def snapshot(cluster: Cluster, pids: dict[str, int]) -> Snapshot:
    cpu = sample_cpu(pids)
    return Snapshot(cpu, await cluster.statuses())


def node_figures(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """Per node, over [a, b]: the WAL, driver and host counters' deltas and rates."""
    span = b.cpu.t - a.cpu.t
    out: dict[str, Any] = {}
    for node_id, sb in b.statuses.items():
        sa = a.statuses.get(node_id)
        if sa is None:
            continue
        wal = {k: sb["wal"][k] - sa["wal"][k] for k in WAL_KEYS}
        drv = {k: sb["driver"][k] - sa["driver"][k] for k in DRIVER_KEYS}
        hst = {k: sb["host"][k] - sa["host"][k] for k in HOST_KEYS}
        fsyncs = wal["fsyncs"]

        def per(v: float, fsyncs: int = fsyncs) -> float:
            return v / fsyncs if fsyncs else 0.0

        out[f"n{node_id}"] = {
            "leads": sum(1 for g in sb["groups"] if g[1] == ROLE_LEADER),
            "awake_end": sb["awake"],
            "wal": wal,
            "driver": drv,
            "host": hst,
            "fsyncs_per_s": fsyncs / span,
            "batches_per_fsync": per(wal["batches"]),
            "records_per_fsync": per(wal["records"]),
            "bytes_per_fsync": per(wal["bytes"]),
            "fsync_ms_avg": 1000.0 * per(wal["fsync_seconds_total"]),
            "wal_busy_pct": 100.0 * wal["fsync_seconds_total"] / span,
            "messages_per_s": drv["messages_sent"] / span,
            "passes_per_s": drv["passes"] / span,
        }
    return out


class Progress:
    """One stderr line per second: elapsed, acks/s in the last second and in the window, errors."""

    def __init__(self, clients: Clients, t0: float, measure: float, end: float) -> None:
        self.clients, self.t0, self.measure, self.end = clients, t0, measure, end
        self.task: asyncio.Task[None] | None = None
        self.acks_at_measure: int | None = None
        self.note = ""

    async def run(self) -> None:
        last_acks, tick = 0, self.t0 + 1.0
        while True:
            await asyncio.sleep(max(0.0, tick - now()))
            acks, errors = self.clients.totals()
            t = now()
            if t < self.measure:
                phase, window = "warmup ", ""
            elif t <= self.end + 0.5 and self.acks_at_measure is not None:
                span = min(t, self.end) - self.measure
                avg = f"{(acks - self.acks_at_measure) / span:7.0f}" if span >= 0.5 else "      -"
                phase, window = "measure", f" window avg {avg}/s"
            else:
                phase, window = "drain  ", ""
            note, self.note = self.note, ""
            log(
                f"[{t - self.t0:5.1f}s] {phase} {acks - last_acks:6d} acks/s{window}"
                f"  acks {acks}  errors {errors}{note}"
            )
            last_acks, tick = acks, tick + 1.0

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclasses.dataclass
class LoadRun:
    t0: float
    measure: float
    end: float
    acks: list[tuple[float, float, int]]  # (done, latency, group), sorted by done
    errors: list[tuple[float, str]]
    unfinished: int
    window: tuple[Snapshot, Snapshot]
    client_pids: dict[str, int]


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - now()))


async def run_load(
    args: argparse.Namespace,
    cluster: Cluster,
    leaders: dict[int, int],
    during: Callable[[float, float, Progress], Coroutine[Any, Any, None]] | None = None,
) -> LoadRun:
    """The closed loop: start the clients, warm up, measure [measure, end], drain, collect."""
    clients = Clients(args, cluster, leaders)
    progress: Progress | None = None
    side: asyncio.Task[None] | None = None
    profile: asyncio.Task[None] | None = None
    try:
        await clients.start()
        t0 = now() + 0.2
        measure = t0 + args.warmup
        end = measure + args.duration
        clients.go(t0, end)
        progress = Progress(clients, t0, measure, end)
        progress.start()
        pids = {**cluster.pids(), **clients.pids, "bench": os.getpid()}
        await sleep_until(measure)
        progress.acks_at_measure = clients.totals()[0]
        first = await snapshot(cluster, pids)
        if during is not None:
            side = asyncio.create_task(during(measure, end, progress))
        if args.profile_node:
            profile = asyncio.create_task(run_profile(args, cluster, end - now()))
        await sleep_until(end)
        last = await snapshot(cluster, pids)
        if side is not None:
            await side
        results = await clients.results(DRAIN_S + 30.0)
        if profile is not None:
            await profile
    finally:
        for task in (side, profile):
            if task is not None and not task.done():
                task.cancel()
        if progress is not None:
            await progress.stop()
        clients.stop()
    acks = sorted(
        (d, lat, g) for r in results for d, lat, g in zip(r.done, r.latency, r.group, strict=True)
    )
    errors = sorted(e for r in results for e in r.errors)
    return LoadRun(
        t0,
        measure,
        end,
        acks,
        errors,
        sum(r.unfinished for r in results),
        (first, last),
        clients.pids,
    )


def load_figures(run: LoadRun, t_from: float, t_to: float) -> dict[str, Any]:
    lat = [lat for d, lat, _ in run.acks if t_from <= d < t_to]
    errors = Counter(code for t, code in run.errors if t_from <= t < t_to)
    return {
        "seconds": t_to - t_from,
        "acks": len(lat),
        "acks_per_s": len(lat) / (t_to - t_from) if t_to > t_from else 0.0,
        "latency_ms": percentiles(lat),
        "errors": dict(sorted(errors.items())),
    }


def window_figures(args: argparse.Namespace, run: LoadRun) -> dict[str, Any]:
    first, last = run.window
    cpu = cpu_between(first.cpu, last.cpu)
    return {
        "config": {
            "concurrency": args.concurrency,
            "procs": args.procs,
            "groups": args.groups,
            "payload_bytes": args.payload_bytes,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "profiled_node": args.profile_node or None,
            "node_switch_interval_ms": args.switch_interval_ms or None,
        },
        **load_figures(run, run.measure, run.end),
        "unfinished_after_drain": run.unfinished,
        "cpu": cpu,
        "nodes": node_figures(first, last),
    }


# -- profiling (py-spy) --------------------------------------------------------------------------
def _py_spy() -> str | None:
    near = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return near if os.access(near, os.X_OK) else shutil.which("py-spy")


async def run_profile(args: argparse.Namespace, cluster: Cluster, seconds: float) -> None:
    exe = _py_spy()
    node = cluster.nodes[args.profile_node]
    if exe is None:
        log("py-spy not found (pip install py-spy): no profile")
        return
    out = args.profile_out or os.path.join(os.getcwd(), f"raft-profile-n{node.id}.txt")
    cmd = [
        exe,
        "record",
        "--pid",
        str(node.pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        str(args.profile_rate),
        "--format",
        "raw",
        "--function",
        "--threads",
        "--output",
        out,
        *(["--native"] if args.profile_native else []),
        *(["--gil"] if args.profile_gil else []),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        log(f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
        return
    report = profile_report(out, args.profile_top, seconds * args.profile_rate)
    print(report)
    with open(out + ".top.txt", "w") as f:
        f.write(report + "\n")
    log(f"profile: {out} (collapsed stacks), {out}.top.txt")


@dataclasses.dataclass
class _ThreadProfile:
    samples: int = 0
    self_: Counter[str] = dataclasses.field(default_factory=Counter)
    incl: Counter[str] = dataclasses.field(default_factory=Counter)


def profile_report(path: str, top: int, instants: float) -> str:
    """Per thread: its samples, and its top functions by self and by inclusive samples (as % of
    the thread's samples), from py-spy's collapsed stacks (``--threads --function``)."""
    threads: dict[str, _ThreadProfile] = {}
    with open(path) as f:
        for line in f:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_s)
            frames = [fr.strip() for fr in stack.split(";") if fr.strip()]
            name = "?"
            if frames and frames[0].startswith("thread "):
                name = frames.pop(0).split(": ", 1)[-1]
            if not frames:
                continue
            tp = threads.setdefault(name, _ThreadProfile())
            tp.samples += count
            tp.self_[frames[-1]] += count
            for fr in set(frames):
                tp.incl[fr] += count
    lines = [
        f"profile: {instants:.0f} sampling instants; a thread is sampled when it is not idle"
        " (running, runnable or in a blocking system call such as fdatasync)"
    ]
    for name, tp in sorted(threads.items(), key=lambda kv: -kv[1].samples):
        n = max(tp.samples, 1)
        lines.append(
            f"thread {name}: {tp.samples} samples ({100.0 * tp.samples / max(instants, 1):.0f} %"
            " of the instants)"
        )
        k = top if tp.samples * 3 >= sum(t.samples for t in threads.values()) else 5
        lines.append(f"  top {k} by self samples (% of the thread's samples):")
        for fr, c in tp.self_.most_common(k):
            lines.append(f"    {100.0 * c / n:6.2f} %  {fr}")
        lines.append(f"  top {k} by inclusive samples (frames present in every sample omitted):")
        for fr, c in [(fr, c) for fr, c in tp.incl.most_common() if c < tp.samples][:k]:
            lines.append(f"    {100.0 * c / n:6.2f} %  {fr}")
    return "\n".join(lines)


# -- the scenarios -------------------------------------------------------------------------------
async def prepare(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    started = now()
    await cluster.start()
    ready = now() - started
    leaders = await cluster.wait_leaders(args.leader_timeout)
    counts = Counter(leaders.values())
    log(
        f"cluster up in {ready:.2f} s, every group led after {now() - started:.2f} s "
        f"(leaders: {', '.join(f'n{n}={c}' for n, c in sorted(counts.items()))})"
    )
    return {"leaders": leaders, "ready_s": ready, "all_led_s": now() - started}


async def scenario_throughput(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    setup = await prepare(cluster, args)
    run = await run_load(args, cluster, setup["leaders"])
    return {"scenario": "throughput", **window_figures(args, run)}


async def scenario_idle(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    await prepare(cluster, args)
    started = now()
    awake: dict[int, int] = {}
    while True:
        sts = await cluster.statuses()
        awake = {i: st["awake"] for i, st in sts.items()}
        if all(v == 0 for v in awake.values()) and len(awake) == len(NODE_IDS):
            break
        if now() - started > args.quiesce_timeout:
            log(f"not quiescent after {args.quiesce_timeout} s (awake: {awake}); measuring anyway")
            break
        await asyncio.sleep(0.2)
    quiescent_after = now() - started
    log(f"quiescent after {quiescent_after:.2f} s; measuring {args.duration} s")
    pids = {**cluster.pids(), "bench": os.getpid()}
    first = await snapshot(cluster, pids)
    awake_max = dict.fromkeys(awake, 0)
    t_end = first.cpu.t + args.duration
    next_status = first.cpu.t + args.status_every
    last = first.cpu
    while now() < t_end:
        await sleep_until(min(last.t + 1.0, t_end))
        cur = sample_cpu(pids)
        pct = cpu_between(last, cur)["processes"]
        log(
            f"[{cur.t - first.cpu.t:5.1f}s] idle  "
            + "  ".join(f"{k} {v['pct_of_core']:4.1f}%" for k, v in pct.items() if v)
        )
        last = cur
        if now() >= next_status and now() < t_end - 0.5:
            next_status += args.status_every
            for i, st in (await cluster.statuses()).items():
                awake_max[i] = max(awake_max.get(i, 0), st["awake"])
    final = await snapshot(cluster, pids)
    for i, st in final.statuses.items():
        awake_max[i] = max(awake_max.get(i, 0), st["awake"])
    cpu = cpu_between(first.cpu, final.cpu)
    nodes = node_figures(first, final)
    for i in final.statuses:
        nodes[f"n{i}"]["awake_start"] = first.statuses[i]["awake"]
        nodes[f"n{i}"]["awake_max_sampled"] = awake_max.get(i, 0)
    return {
        "scenario": "idle",
        "config": {"duration_s": args.duration, "groups": args.groups},
        "quiescent_after_s": quiescent_after,
        "cpu": cpu,
        "nodes": nodes,
    }


async def scenario_failover(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    setup = await prepare(cluster, args)
    kill: dict[str, Any] = {}

    async def during(measure: float, end: float, progress: Progress) -> None:
        await sleep_until(measure + args.duration / 2)
        sts = await cluster.statuses()
        led = {i: [g[0] for g in st["groups"] if g[1] == ROLE_LEADER] for i, st in sts.items()}
        victim = max(led, key=lambda i: len(led[i]))
        survivors = [i for i in cluster.alive_ids() if i != victim]
        t_kill = now()  # before the signal: the clients may see the connections drop at once
        cluster.kill(victim)
        progress.note = f"  << killed n{victim} (leader of {len(led[victim])} groups)"
        kill.update(victim=victim, t_kill=t_kill, groups=led[victim], survivors=survivors)
        first_led: dict[int, float] = {}
        polls = 0
        while now() < end:
            await asyncio.sleep(args.poll_ms / 1000)
            sts = await cluster.statuses(survivors)
            t = now()
            polls += 1
            for g in cluster.leaders(sts):
                first_led.setdefault(g, t)
            if len(first_led) == cluster.groups:
                break
        kill.update(first_led=first_led, polls=polls)
        if len(first_led) == cluster.groups:
            log(
                f"every group led again {first_led and max(first_led.values()) - t_kill:.3f} s"
                " after the kill"
            )

    run = await run_load(args, cluster, setup["leaders"], during)
    if not kill:
        raise ClusterError("the kill did not happen")
    victim, t_kill, victim_groups = kill["victim"], kill["t_kill"], set(kill["groups"])
    first_led: dict[int, float] = kill["first_led"]
    all_led = max(first_led.values()) if len(first_led) == cluster.groups else None
    victim_led = sorted(first_led[g] - t_kill for g in victim_groups if g in first_led)

    # Gaps between acks, per group whose leader died: the gap that spans the kill.
    per_group: dict[int, list[float]] = {g: [] for g in victim_groups}
    for d, _, g in run.acks:
        if g in per_group:
            per_group[g].append(d)
    spans, first_ack = [], []
    for times in per_group.values():
        before = [d for d in times if d <= t_kill]
        after = [d for d in times if d > t_kill]
        if before and after:
            spans.append(after[0] - before[-1])
        if after:
            first_ack.append(after[0] - t_kill)
    baseline_gaps = []
    for times in per_group.values():
        w = [d for d in times if run.measure <= d <= t_kill]
        baseline_gaps += [b - a for a, b in itertools.pairwise(w)]
    baseline_gaps.sort()

    # Restart the killed node; it must catch up with the leaders' commit indexes.
    sts = await cluster.statuses()
    leaders = cluster.leaders(sts)
    target = {  # group -> commit index on its leader
        g: commit
        for node_id, st in sts.items()
        for g, _, _, _, commit, *_ in st["groups"]
        if leaders.get(g) == node_id
    }
    restart_ready = await cluster.start_node(victim)
    started = now()
    caught_up = None
    st: dict[str, Any] = {}
    while now() - started < args.rejoin_timeout:
        with contextlib.suppress(OSError, TimeoutError, ControlError, ConnectionError):
            st = await cluster.status(victim)
            behind = [
                g
                for g, _, _, lead, _, applied, *_ in st["groups"]
                if lead == 0 or applied < target.get(g, 0)
            ]
            if not behind and len(st["live_peers"]) == len(NODE_IDS) - 1:
                caught_up = now() - started
                break
        await asyncio.sleep(0.1)
    if caught_up is None:
        log(f"n{victim} did not catch up in {args.rejoin_timeout} s")

    figures = window_figures(args, run)
    return {
        "scenario": "failover",
        **figures,
        "killed_node": victim,
        "killed_at_s": t_kill - run.measure,
        "killed_node_led_groups": len(victim_groups),
        "all_groups_led_after_s": None if all_led is None else all_led - t_kill,
        "victim_groups_led_after_ms": percentiles(victim_led),
        "status_polls": kill["polls"],
        "max_ack_gap_on_victim_groups_ms": 1000.0 * max(spans) if spans else None,
        "ack_gap_on_victim_groups_ms": percentiles(spans),
        "first_ack_after_kill_on_victim_groups_ms": percentiles(first_ack),
        "baseline_ack_gap_on_victim_groups_ms": percentiles(baseline_gaps),
        "before_kill": load_figures(run, run.measure, t_kill),
        "after_kill": load_figures(run, t_kill, run.end),
        "after_all_led": load_figures(run, all_led, run.end) if all_led else None,
        "restart": {
            "ready_s": restart_ready,
            "caught_up_s": caught_up,
            "live_peers": st.get("live_peers"),
        },
    }


# -- reporting -----------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if k else c.ljust(w)
                for k, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _latency_row(name: str, fig: dict[str, Any] | None) -> list[Any]:
    if not fig:
        return [name, "-", "-", "-", "-", "-", "-", "-", "-"]
    lat = fig["latency_ms"] or {}
    errors = ", ".join(f"{k}={v}" for k, v in fig["errors"].items()) or "none"
    return [
        name,
        fig["acks_per_s"],
        lat.get("p50"),
        lat.get("p90"),
        lat.get("p99"),
        lat.get("p99.9"),
        lat.get("max"),
        fig["acks"],
        errors,
    ]


LATENCY_HEADERS = (
    "window",
    "acks/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "acks",
    "errors",
)


def report_nodes(res: dict[str, Any]) -> str:
    procs = res["cpu"]["processes"]
    rows = []
    for name, n in res["nodes"].items():
        cpu = procs.get(name)
        rows.append(
            [
                name,
                n["leads"],
                cpu["pct_of_core"] if cpu else None,
                n["fsyncs_per_s"],
                n["batches_per_fsync"],
                n["records_per_fsync"],
                n["bytes_per_fsync"] / 1024,
                n["fsync_ms_avg"],
                n["wal_busy_pct"],
                n["messages_per_s"],
                n["passes_per_s"],
            ]
        )
    headers = (
        "node",
        "leads",
        "CPU %core",
        "fsyncs/s",
        "batches/fsync",
        "records/fsync",
        "KiB/fsync",
        "fsync ms",
        "fsync busy %",
        "msgs sent/s",
        "passes/s",
    )
    clients = [
        f"{k} {v['pct_of_core']:.1f} %"
        for k, v in procs.items()
        if (k.startswith("c") or k == "bench") and v
    ]
    text = table(headers, rows)
    if clients:
        text += "\nclient CPU (% of one core): " + ", ".join(clients)
    return text + "\n" + machine_line(res["cpu"])


def machine_line(cpu: dict[str, Any]) -> str:
    return (
        f"machine busy: {cpu['machine_busy_pct']:.1f} % of {cpu['machine_cores']} cores, shared"
        f" by nodes and clients; other processes: {cpu['others_pct_of_core']:.1f} % of one core"
    )


def report(res: dict[str, Any]) -> str:
    out = []
    if res["scenario"] in ("throughput", "failover"):
        c = res["config"]
        out.append(
            f"{res['scenario']}: concurrency {c['concurrency']} in {c['procs']} client process(es),"
            f" {c['groups']} groups, {c['payload_bytes']} B payload, {c['duration_s']} s window"
            f" after {c['warmup_s']} s warm-up"
            + (f"  [node {c['profiled_node']} profiled]" if c["profiled_node"] else "")
            + (
                f"  [nodes: switch interval {c['node_switch_interval_ms']} ms]"
                if c["node_switch_interval_ms"]
                else ""
            )
        )
        rows = [_latency_row("window", res)]
        if res["scenario"] == "failover":
            rows += [
                _latency_row("before kill", res["before_kill"]),
                _latency_row("after kill", res["after_kill"]),
                _latency_row("after all led", res["after_all_led"]),
            ]
        out += ["", table(LATENCY_HEADERS, rows), "", report_nodes(res)]
        if res["unfinished_after_drain"]:
            out.append(f"requests unfinished after the drain: {res['unfinished_after_drain']}")
    if res["scenario"] == "failover":
        led = res["victim_groups_led_after_ms"]
        gap = res["ack_gap_on_victim_groups_ms"]
        base = res["baseline_ack_gap_on_victim_groups_ms"]
        first = res["first_ack_after_kill_on_victim_groups_ms"]
        r = res["restart"]
        out += [
            "",
            f"killed n{res['killed_node']} (leader of {res['killed_node_led_groups']} groups) "
            f"{res['killed_at_s']:.2f} s into the window",
            f"every group led again after: {_fmt(res['all_groups_led_after_s'], 3)} s "
            f"(its groups: p50 {_fmt(led.get('p50'))} ms, max {_fmt(led.get('max'))} ms;"
            f" {res['status_polls']} polls)",
            f"ack gap across the kill on its groups: max {_fmt(gap.get('max'))} ms, "
            f"p50 {_fmt(gap.get('p50'))} ms (before the kill: p50 {_fmt(base.get('p50'))} ms, "
            f"max {_fmt(base.get('max'))} ms); first ack after the kill: p50 "
            f"{_fmt(first.get('p50'))} ms, max {_fmt(first.get('max'))} ms",
            f"restart: ready after {_fmt(r['ready_s'], 2)} s, caught up "
            f"{_fmt(r['caught_up_s'], 2)} s later (live peers {r['live_peers']})",
        ]
    if res["scenario"] == "idle":
        procs = res["cpu"]["processes"]
        rows = []
        for name, n in res["nodes"].items():
            cpu = procs.get(name)
            rows.append(
                [
                    name,
                    cpu["pct_of_core"] if cpu else None,
                    n["awake_start"],
                    n["awake_max_sampled"],
                    n["awake_end"],
                    n["driver"]["messages_sent"],
                    n["messages_per_s"],
                    n["host"]["ticks"],
                    n["host"]["woken"],
                    n["wal"]["fsyncs"],
                ]
            )
        headers = (
            "node",
            "CPU %core",
            "awake start",
            "awake max",
            "awake end",
            "msgs sent",
            "msgs/s",
            "ticks",
            "woken",
            "fsyncs",
        )
        out += [
            f"idle: {res['config']['duration_s']} s, {res['config']['groups']} groups, quiescent "
            f"{res['quiescent_after_s']:.2f} s after every group had a leader",
            "",
            table(headers, rows),
            "goal: each node < 2 % of one core; bench process "
            f"{_fmt((procs.get('bench') or {}).get('pct_of_core'))} %",
            machine_line(res["cpu"]),
        ]
    return "\n".join(out)


# -- the command line ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.raft_node", description=(__doc__ or "").split("\n")[0]
    )
    sub = p.add_subparsers(dest="scenario", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--groups", type=int, default=256)
        s.add_argument("--tick-ms", type=int, default=50)
        s.add_argument("--election-ticks", type=int, default=10)
        s.add_argument("--heartbeat-ticks", type=int, default=1)
        s.add_argument(
            "--lazy-commit",
            action="store_true",
            help="no commit broadcast: followers learn commits from the next message",
        )
        s.add_argument(
            "--skip-busy-heartbeats",
            action="store_true",
            help="no heartbeats (or empty appends) to followers busy with appends",
        )
        s.add_argument("--snapshot-entries", type=int, default=100_000)
        s.add_argument("--node-log-level", default="WARNING")
        s.add_argument("--json", metavar="FILE", help="write every figure to FILE")
        s.add_argument("--data-parent", default=None, help="where the temp data dir goes")
        s.add_argument("--keep-data", action="store_true", help="keep the data dir and logs")
        s.add_argument("--leader-timeout", type=float, default=60.0)
        s.add_argument(
            "--switch-interval-ms",
            type=float,
            default=0.0,
            help="run the nodes with sys.setswitchinterval(this) (default: Python's 5 ms)",
        )
        s.add_argument(
            "--wait-quiet",
            type=float,
            default=0.0,
            metavar="S",
            help="first wait up"
            " to S s for other processes to use < 10 %% of a core (shared machines)",
        )

    def load(s: argparse.ArgumentParser, concurrency: int, duration: float) -> None:
        s.add_argument("--concurrency", "-c", type=int, default=concurrency)
        s.add_argument("--duration", type=float, default=duration, help="measured seconds")
        s.add_argument("--warmup", type=float, default=3.0)
        s.add_argument("--payload-bytes", type=int, default=200)
        s.add_argument(
            "--procs",
            type=int,
            default=0,
            help="client processes (default: 2 if concurrency >= 64 else 1)",
        )
        s.add_argument("--retry-ms", type=float, default=20.0, help="pause before a retry")
        s.add_argument(
            "--profile-node",
            type=int,
            default=0,
            choices=(0, *NODE_IDS),
            help="py-spy this node over the window (perturbs the figures)",
        )
        s.add_argument("--profile-out", default="", help="collapsed stacks file")
        s.add_argument("--profile-rate", type=int, default=100)
        s.add_argument("--profile-top", type=int, default=15)
        s.add_argument("--profile-native", action="store_true", help="py-spy --native")
        s.add_argument(
            "--profile-gil",
            action="store_true",
            help="py-spy --gil: only samples of the thread holding the GIL",
        )

    t = sub.add_parser("throughput", help="closed-loop proposals: throughput and latency")
    common(t)
    load(t, 256, 20.0)
    i = sub.add_parser("idle", help="CPU and traffic of a quiescent cluster")
    common(i)
    i.add_argument("--duration", type=float, default=60.0)
    i.add_argument("--quiesce-timeout", type=float, default=60.0)
    i.add_argument("--status-every", type=float, default=10.0, help="awake-groups samples")
    f = sub.add_parser("failover", help="kill -9 the busiest leader under load")
    common(f)
    load(f, 64, 20.0)
    f.add_argument("--poll-ms", type=float, default=25.0, help="survivors' status poll period")
    f.add_argument("--rejoin-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if hasattr(args, "procs"):
        if args.procs <= 0:
            args.procs = 2 if args.concurrency >= 64 else 1
        if args.concurrency < 1 or args.procs > args.concurrency:
            p.error("need 1 <= --procs <= --concurrency")
        if args.payload_bytes < 1:
            p.error("--payload-bytes must be positive")
    if not 1 <= args.groups <= 4096:
        p.error("--groups must be in 1..4096")
    return args


SCENARIOS: dict[str, Callable[[argparse.Namespace, Cluster], Awaitable[dict[str, Any]]]] = {
    "throughput": scenario_throughput,
    "idle": scenario_idle,
    "failover": scenario_failover,
}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import uvloop

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    info = run_info(argv, args.data_parent or tempfile.gettempdir())
    deadline = time.monotonic() + args.wait_quiet
    while (bg := background_load(3.0 if args.wait_quiet else 1.0)) > 10.0:
        if time.monotonic() > deadline:
            break
        log(f"waiting for a quiet machine (busy: {bg:.0f} % of a core)")
    info["background_busy_pct_of_core"] = bg
    if bg > 10.0:
        log(f"warning: the machine is already busy ({bg:.0f} % of a core) before the run")
    cluster = Cluster(args)

    async def go() -> dict[str, Any]:
        try:
            return await SCENARIOS[args.scenario](args, cluster)
        finally:
            cluster.close_links()

    try:
        result = uvloop.run(go())
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except ClusterError as e:
        log(f"error: {e}")
        return 1
    finally:
        cluster.stop()
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "result": result}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
