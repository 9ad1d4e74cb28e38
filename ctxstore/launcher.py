"""Start a local ctxstore cluster as child processes (``ctxstore cluster up``, tests, bench).

Node ``i`` (1-based) listens for clients on ``base_port + i - 1``, for peers on
``base_port + 100 + i - 1`` and serves its ops port (health, ``/metrics``) on
``base_port + 200 + i - 1`` (``base_port`` 0: free ports are picked), keeps its data in
``<data_dir>/node<i>`` and logs to ``<data_dir>/node<i>.log``.  Each child prints JSON events
on stdout; the launcher waits for ``{"event": "ready"}`` (every group has a leader).

The nodes of a local cluster share this machine's cores, so they run the inline WAL writer
(``--wal-writer inline``, ahead of ``extra_args``, which may override it): a node waiting for
its fsync leaves the CPU to the others, and the writer thread's hand-offs would be pure cost
(docs/benchmarks.md, "The WAL on the loop's thread").  That buys appends per second, not
latency: every read and chunk push waits behind the loop's fsyncs, so a latency measurement
passes ``--wal-writer thread`` (docs/benchmarks.md, "Which levers move the latency goals").  A
node on a machine of its own keeps the configuration's default, the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .tlscert import LocalCertificate, generate

# -- ports -----------------------------------------------------------------------------------------
# A node keeps its ports across restarts (its peers dial a fixed address), so a port from the
# ephemeral range could be taken, while the node is down, by any outgoing connection's local end
# (a peer redialling it, another test's client) and the node would not start again (exit 5).
# Ports below that range are only taken by someone binding them explicitly.
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
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the ephemeral range, in this worker's slice, never
    handed out twice by this process (TCP; the same number is then used for UDP by HTTP/3)."""
    ports = _port_slice()
    eph_low, eph_high = _ephemeral_range()
    with _ports_lock:
        for attempt in range(2000):
            port = _port_rng.choice(ports)
            if port in _ports_taken or (attempt < 1000 and eph_low <= port <= eph_high):
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))  # no SO_REUSEADDR: also avoids ports in TIME_WAIT
                except OSError:
                    continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            _ports_taken.add(port)
            return port
    raise RuntimeError("no free port found")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    return [free_port(host) for _ in range(n)]


class NodeExited(RuntimeError):
    """A node exited while the launcher waited for it to become ready."""

    def __init__(self, node: int, code: int, log_path: str) -> None:
        super().__init__(f"node {node} exited with status {code}; its log: {log_path}")
        self.node = node
        self.code = code
        self.log_path = log_path


@dataclass
class Child:
    id: int
    client: tuple[str, int]
    peer: tuple[str, int]
    ops: tuple[str, int]  # the ops port: /health/*, /metrics
    data_dir: str
    log_path: str
    process: asyncio.subprocess.Process | None = None
    log: TextIO | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    join: str | None = None  # the HTTP port it joins the cluster through (``add_node``)

    @property
    def target(self) -> str:
        return f"{self.client[0]}:{self.client[1]}"

    @property
    def ops_target(self) -> str:
        return f"{self.ops[0]}:{self.ops[1]}"


class LocalCluster:
    def __init__(
        self,
        nodes: int,
        data_dir: str,
        base_port: int = 0,
        extra_args: list[str] | None = None,
        host: str = "127.0.0.1",
        wal_writer: str = "inline",
        tls: tuple[str, str] | None = None,
        h3: bool = False,
    ) -> None:
        if not 1 <= nodes <= 32:
            raise ValueError("a local cluster has 1 to 32 nodes")
        self.data_dir = os.path.abspath(data_dir)
        self.extra_args = ["--wal-writer", wal_writer, *(extra_args or [])]  # later flags win
        # (certificate, key): each node serves HTTP/3 on its HTTP port's number; h3 without
        # tls: a new self-signed certificate in data_dir/tls (``cert``: its paths and hash)
        self.cert: LocalCertificate | None = None
        if h3 and tls is None:
            self.cert = generate(os.path.join(self.data_dir, "tls"))
            tls = (self.cert.cert_path, self.cert.key_path)
        self.tls = tls
        if base_port:
            clients = [base_port + i for i in range(nodes)]
            peers = [base_port + 100 + i for i in range(nodes)]
            ops = [base_port + 200 + i for i in range(nodes)]
        else:
            ports = free_ports(3 * nodes, host)
            clients, peers, ops = ports[:nodes], ports[nodes : 2 * nodes], ports[2 * nodes :]
        self.children = {
            i: Child(
                i,
                (host, clients[i - 1]),
                (host, peers[i - 1]),
                (host, ops[i - 1]),
                os.path.join(self.data_dir, f"node{i}"),
                os.path.join(self.data_dir, f"node{i}.log"),
            )
            for i in range(1, nodes + 1)
        }

    @property
    def targets(self) -> list[str]:
        return [c.target for c in self.children.values()]

    def args(self, i: int) -> list[str]:
        c = self.children[i]
        peers = ",".join(
            f"{o.id}={o.peer[0]}:{o.peer[1]}"
            for o in self.children.values()
            if o.id != i and o.join is None
        )
        args = [
            sys.executable, "-m", "ctxstore", "serve",
            "--node-id", str(i),
            "--data-dir", c.data_dir,
            "--listen", c.target,
            "--peer-listen", f"{c.peer[0]}:{c.peer[1]}",
            "--http", c.ops_target,
        ]  # fmt: skip
        if c.join is not None:
            args += ["--join", c.join]
        elif peers:
            args += ["--peers", peers]
        if self.tls is not None:  # (UDP: the same port number as the HTTP port's TCP)
            args += ["--h3", c.ops_target, "--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        return args + self.extra_args

    def add_node(self, via: int, host: str = "127.0.0.1") -> int:
        """A new node (the next id, fresh ports) that joins through node ``via``'s HTTP port
        (``serve --join``); start it with ``start_node``.  Its id."""
        i = max(self.children) + 1
        client, peer, ops = free_ports(3, host)
        self.children[i] = Child(
            i,
            (host, client),
            (host, peer),
            (host, ops),
            os.path.join(self.data_dir, f"node{i}"),
            os.path.join(self.data_dir, f"node{i}.log"),
            join=self.children[via].ops_target,
        )
        return i

    async def start(self, timeout_s: float = 60.0) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        for i in self.children:
            await self.start_node(i, wait=False)
        await self.wait_ready(timeout_s)

    async def start_node(self, i: int, wait: bool = True, timeout_s: float = 60.0) -> None:
        c = self.children[i]
        c.log = open(c.log_path, "a")  # noqa: SIM115 - closed in _reap
        c.events = []
        c.process = await asyncio.create_subprocess_exec(
            *self.args(i), stdout=asyncio.subprocess.PIPE, stderr=c.log
        )
        c.reader = asyncio.get_running_loop().create_task(self._read_events(c))
        if wait:
            await self.wait_ready(timeout_s, [i])

    async def _read_events(self, c: Child) -> None:
        assert c.process is not None and c.process.stdout is not None
        while line := await c.process.stdout.readline():
            with contextlib.suppress(ValueError):
                c.events.append(json.loads(line))

    async def wait_ready(self, timeout_s: float, ids: list[int] | None = None) -> None:
        """Until each node of ``ids`` (all: None) announced ``ready``; ``NodeExited`` as soon as
        one of them exits (a node that cannot start may be what keeps the others unready)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        ids = list(self.children) if ids is None else ids
        while True:
            for i in ids:
                c = self.children[i]
                if c.process is None:
                    raise RuntimeError(f"node {i} was not started")
                if c.process.returncode is not None:
                    raise NodeExited(i, c.process.returncode, c.log_path)
            waiting = [i for i in ids if not self._ready(i)]
            if not waiting:
                return
            if loop.time() > deadline:
                path = self.children[waiting[0]].log_path
                raise TimeoutError(f"node {waiting[0]} not ready in {timeout_s} s; see {path}")
            await asyncio.sleep(0.02)

    def _ready(self, i: int) -> bool:
        return any(e.get("event") == "ready" for e in self.children[i].events)

    def kill(self, i: int) -> None:
        """kill -9 node ``i``."""
        c = self.children[i]
        if c.process is not None and c.process.returncode is None:
            c.process.send_signal(signal.SIGKILL)

    async def stop_node(self, i: int, timeout_s: float = 15.0) -> int | None:
        c = self.children[i]
        if c.process is None:
            return None
        if c.process.returncode is None:
            c.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(c.process.wait(), timeout_s)
            except TimeoutError:
                c.process.kill()
        return await self._reap(c)

    async def wait_exit(self, i: int) -> int | None:
        return await self._reap(self.children[i])

    async def _reap(self, c: Child) -> int | None:
        assert c.process is not None
        code = await c.process.wait()
        if c.reader is not None:
            with contextlib.suppress(BaseException):
                await c.reader
        if c.log is not None:
            c.log.close()
            c.log = None
        return code

    async def stop(self) -> dict[int, int | None]:
        """SIGTERM every node; each one's exit status (None: never started)."""
        codes = await asyncio.gather(*(self.stop_node(i) for i in self.children))
        return dict(zip(self.children, codes, strict=True))

    def log_tail(self, i: int, lines: int = 10) -> list[str]:
        """The last ``lines`` lines of node ``i``'s log (at most its last 16 KiB)."""
        try:
            with open(self.children[i].log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                tail = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return tail[-lines:]

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
