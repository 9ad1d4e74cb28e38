"""A runnable node of the bare Raft (``raft/``) with a test state machine, for the tests of
tests/cluster and the benchmark ``python -m bench.raft_node`` (docs/raft.md "A runnable node").

    python -m bench.raft_testnode --id 1 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=... \\
        --control 127.0.0.1:8001 --data ./n1 [--groups 256] [--secret S]

The state machine (``LogMachine``) keeps, per group, the list of every data entry applied: a
test can compare the full history of every replica.  The control port speaks
``bench.raft_control``.  Once both ports listen, the node prints one JSON line
``{"event": "ready", ...}`` on stdout.  SIGTERM or SIGINT stop it cleanly; a fatal error (a
failed WAL write, a broken invariant) exits with status 70.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, cast

import msgspec

from raft.core import Config
from raft.driver import Driver, DriverConfig
from raft.errors import NotLeader, RaftError
from raft.logs import JsonFormatter
from raft.messages import Entry, EntryType
from raft.multi import HostConfig, MultiRaft
from raft.transport import Transport
from raft.wal import WAL

from .raft_control import (
    READ_LIMIT_MAX,
    Compact,
    ControlError,
    Framer,
    Propose,
    Read,
    Reply,
    Request,
    Status,
    Transfer,
    frame,
    request_decoder,
)

logger = logging.getLogger("bench.raft_testnode")

REQUEST_TIMEOUT_S = 10.0
EXIT_FATAL = 70


# -- the test state machine ------------------------------------------------------------------------
class LogMachine:
    """Per group: every non-empty data entry applied, in order."""

    def __init__(self) -> None:
        self.history: dict[int, list[bytes]] = {}

    def apply(self, group: int, entries: list[Entry]) -> list[object]:
        hist = self.history[group]
        out: list[object] = []
        for e in entries:
            if e.type is EntryType.NORMAL and e.data:
                hist.append(e.data)
                out.append(len(hist))
            else:
                out.append(None)
        return out

    def snapshot(self, group: int) -> bytes:
        return msgspec.msgpack.encode(self.history[group])

    def restore(self, group: int, data: bytes) -> None:
        self.history[group] = msgspec.msgpack.decode(data, type=list[bytes]) if data else []


# -- the control port ------------------------------------------------------------------------------
class ControlServer(asyncio.Protocol):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.framer = Framer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except ValueError as e:
            logger.warning("control connection closed: %s", e)
            assert self.transport is not None
            self.transport.close()
            return
        for body in frames:
            try:
                req = request_decoder.decode(body)
            except msgspec.ValidationError as e:
                self.reply(Reply(0, False, None, "bad_request", str(e)))
                continue
            except msgspec.DecodeError as e:
                self.reply(Reply(0, False, None, "bad_request", f"undecodable request: {e}"))
                continue
            self.node.handle(req, self)

    def reply(self, r: Reply) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(r))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


# -- the node --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NodeConfig:
    id: int
    peers: dict[int, tuple[str, int]]  # every member, this node included (its peer address)
    control: tuple[str, int]
    data_dir: str
    groups: int = 256
    cluster_id: str = "raft-test"
    secret: bytes = b"raft-test-secret"
    tick_ms: int = 50
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    commit_broadcast: bool = True
    skip_busy_heartbeats: bool = False
    snapshot_entries: int = 100_000
    wal_segment_bytes: int = 64 << 20
    wal_cache_bytes: int = 64 << 20
    wal_inline: bool = False  # group commits on the loop's thread (raft/wal.py)
    quiesce: bool = True
    seed: int = 0


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.sm = LogMachine()
        group_cfg = Config(
            cfg.id,
            election_ticks=cfg.election_ticks,
            heartbeat_ticks=cfg.heartbeat_ticks,
            commit_broadcast=cfg.commit_broadcast,
            skip_busy_heartbeats=cfg.skip_busy_heartbeats,
            seed=cfg.seed,
        )
        self.host = MultiRaft(HostConfig(group_cfg, quiesce=cfg.quiesce))
        self.wal = WAL.open(
            os.path.join(cfg.data_dir, "wal"),
            segment_bytes=cfg.wal_segment_bytes,
            cache_bytes_max=cfg.wal_cache_bytes,
            inline=cfg.wal_inline,
        )
        self.driver = Driver(
            self.host,
            self.wal,
            self.sm,
            DriverConfig(tick_s=cfg.tick_ms / 1000, snapshot_entries=cfg.snapshot_entries),
        )
        self.driver.add_groups(range(cfg.groups), tuple(sorted(cfg.peers)))
        self.transport: Transport | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        cfg = self.cfg
        others = {i: a for i, a in cfg.peers.items() if i != cfg.id}
        if others:
            on_batch, up, down, snap = self.driver.transport_callbacks()
            self.transport = Transport(
                cfg.id, cfg.cluster_id, cfg.secret, cfg.peers[cfg.id], others, on_batch, up, down,
                snap,
            )  # fmt: skip
            self.driver.attach(self.transport)
            await self.transport.start()
        loop = asyncio.get_running_loop()
        host, port = cfg.control
        self.server = await loop.create_server(lambda: ControlServer(self), host, port)
        await self.driver.start()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.driver.stop()
        if self.transport is not None:
            await self.transport.close()
        self.wal.close()

    # -- requests ---------------------------------------------------------------------------------
    def handle(self, req: Request, conn: ControlServer) -> None:
        try:
            self._handle(req, conn)
        except NotLeader as e:
            conn.reply(Reply(req.rid, False, None, e.code, str(e), e.leader_hint))
        except RaftError as e:
            conn.reply(Reply(req.rid, False, None, e.code, str(e), self._leader(req)))
        except ControlError as e:
            conn.reply(Reply(req.rid, False, None, e.code, str(e), e.leader))

    def _leader(self, req: Request) -> int:
        group = getattr(req, "group", None)
        if isinstance(group, int) and group in self.host:
            return self.host.leader(group)
        return 0

    def _check_group(self, group: int) -> None:
        if group not in self.host:
            raise ControlError("bad_request", f"group: {group} is not hosted here")

    def _handle(self, req: Request, conn: ControlServer) -> None:
        match req:
            case Propose():
                self._check_group(req.group)
                if not req.data:
                    raise ControlError("bad_request", "data: must not be empty")
                self._reply_when(req.rid, req.group, self.driver.propose(req.group, req.data), conn)
            case Read():
                self._check_group(req.group)
                if not 0 <= req.limit <= READ_LIMIT_MAX or req.after < 0:
                    raise ControlError("bad_request", f"after/limit out of range ({req})")
                if req.linearizable:
                    fut = self.driver.read_index(req.group)
                    rid, group, after, limit = req.rid, req.group, req.after, req.limit
                    fut.add_done_callback(
                        lambda f: conn.reply(self._read_reply(rid, group, after, limit, f))
                    )
                    self._deadline(rid, group, fut, conn)
                else:
                    conn.reply(self._read_reply(req.rid, req.group, req.after, req.limit, None))
            case Status():
                conn.reply(Reply(req.rid, True, self.status()))
            case Transfer():
                self._check_group(req.group)
                self.driver.transfer_leader(req.group, req.to)
                conn.reply(Reply(req.rid, True, None))
            case Compact():
                self._check_group(req.group)
                self.driver.compact(req.group)
                conn.reply(Reply(req.rid, True, None))

    def _read_reply(
        self, rid: int, group: int, after: int, limit: int, fut: asyncio.Future[int] | None
    ) -> Reply:
        if fut is not None:
            if fut.cancelled():
                return Reply(rid, False, None, "timeout", "no read index in time")
            exc = fut.exception()
            if exc is not None:
                code = getattr(exc, "code", "error")
                return Reply(rid, False, None, code, str(exc), self.host.leader(group))
        hist = self.sm.history[group]
        return Reply(rid, True, [len(hist), hist[after : after + limit]])

    def _reply_when(
        self, rid: int, group: int, fut: asyncio.Future[object], conn: ControlServer
    ) -> None:
        def done(f: asyncio.Future[object]) -> None:
            if f.cancelled():
                conn.reply(Reply(rid, False, None, "timeout", "outcome unknown: timed out"))
                return
            exc = f.exception()
            if exc is None:
                conn.reply(Reply(rid, True, f.result()))
            else:
                code = getattr(exc, "code", "error")
                conn.reply(Reply(rid, False, None, code, str(exc), self.host.leader(group)))

        fut.add_done_callback(done)
        self._deadline(rid, group, fut, conn)

    def _deadline(
        self, rid: int, group: int, fut: asyncio.Future[Any], conn: ControlServer
    ) -> None:
        handle = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT_S, fut.cancel)
        fut.add_done_callback(lambda f: handle.cancel())

    def status(self) -> dict[str, Any]:
        groups = []
        for g in self.host.groups():
            r = self.host.node(g).raft
            groups.append(
                [g, r.role.value, r.term, r.lead, r.log.committed, r.log.applied,
                 r.log.last_index(), self.host.is_quiescent(g)]
            )  # fmt: skip
        ws = self.wal.stats
        return {
            "node": self.cfg.id,
            "groups": groups,
            "awake": self.host.awake_count(),
            "live_peers": sorted(self.host.live_peers()),
            "host": dataclasses.asdict(self.host.stats),
            "driver": dataclasses.asdict(self.driver.stats),
            "wal": {
                "fsyncs": ws.fsyncs,
                "rounds": ws.rounds,
                "batches": ws.batches,
                "records": ws.records,
                "bytes": ws.bytes,
                "fsync_seconds_total": ws.fsync_seconds_total,
                "fsync_seconds_max": ws.fsync_seconds_max,
                "segments": self.wal.segment_count(),
                "segments_deleted": ws.segments_deleted,
                "cached_bytes": self.wal.cached_bytes,
            },
        }


# -- the process -----------------------------------------------------------------------------------
def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _peers(text: str) -> dict[int, tuple[str, int]]:
    out = {}
    for part in text.split(","):
        ident, _, addr = part.partition("=")
        if not ident.isdigit():
            raise argparse.ArgumentTypeError(f"expected ID=HOST:PORT, got {part!r}")
        out[int(ident)] = _address(addr)
    return out


def parse_args(argv: Sequence[str] | None = None) -> NodeConfig:
    p = argparse.ArgumentParser(
        prog="python -m bench.raft_testnode", description=__doc__.split("\n")[0]
    )
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--peers", type=_peers, required=True, help="ID=HOST:PORT,... (all members)")
    p.add_argument("--control", type=_address, required=True, help="HOST:PORT")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--groups", type=int, default=256)
    p.add_argument("--cluster-id", default="raft-test")
    p.add_argument("--secret", default=os.environ.get("RAFT_SECRET", "raft-test-secret"))
    p.add_argument("--tick-ms", type=int, default=50)
    p.add_argument("--election-ticks", type=int, default=10)
    p.add_argument("--heartbeat-ticks", type=int, default=1)
    p.add_argument("--lazy-commit", action="store_true", help="Config.commit_broadcast=False")
    p.add_argument("--skip-busy-heartbeats", action="store_true")
    p.add_argument("--snapshot-entries", type=int, default=100_000)
    p.add_argument("--wal-segment-mb", type=float, default=64)
    p.add_argument("--wal-cache-mb", type=float, default=64)
    p.add_argument("--wal-inline", action="store_true", help="write and fsync on the loop")
    p.add_argument("--no-quiesce", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    if a.id not in a.peers:
        p.error(f"--peers must include this node ({a.id})")
    if not 1 <= a.groups <= 4096:
        p.error("--groups must be in 1..4096")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=a.log_level.upper(), handlers=[handler])
    return NodeConfig(
        id=a.id,
        peers=a.peers,
        control=a.control,
        data_dir=a.data,
        groups=a.groups,
        cluster_id=a.cluster_id,
        secret=a.secret.encode(),
        tick_ms=a.tick_ms,
        election_ticks=a.election_ticks,
        heartbeat_ticks=a.heartbeat_ticks,
        commit_broadcast=not a.lazy_commit,
        skip_busy_heartbeats=a.skip_busy_heartbeats,
        snapshot_entries=a.snapshot_entries,
        wal_segment_bytes=int(a.wal_segment_mb * (1 << 20)),
        wal_cache_bytes=int(a.wal_cache_mb * (1 << 20)),
        wal_inline=a.wal_inline,
        quiesce=not a.no_quiesce,
        seed=a.seed,
    )


async def run(cfg: NodeConfig) -> int:
    node = Node(cfg)
    await node.start()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    print(
        json.dumps(
            {
                "event": "ready",
                "node": cfg.id,
                "control": f"{cfg.control[0]}:{cfg.control[1]}",
                "peer": f"{cfg.peers[cfg.id][0]}:{cfg.peers[cfg.id][1]}",
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    assert node.driver.failed is not None
    done, _ = await asyncio.wait({stop, node.driver.failed}, return_when=asyncio.FIRST_COMPLETED)
    if node.driver.failed in done:
        logger.critical("fatal: %r", node.driver.failed.result())
        return EXIT_FATAL
    await node.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(run(cfg))
    return uvloop.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
