"""The ops HTTP port (``ctxstore/ops.py``) and the metrics it serves (``ctxstore/metrics.py``).

Real HTTP over loopback sockets; responses are parsed by an h11 client.  The node-backed tests
run a real single-node cluster in-process; the protocol edge cases run against a fake source.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import msgspec
import pytest
import uvloop

from bench.nodestats import parse_metrics
from ctxstore.config import Settings
from ctxstore.launcher import free_port
from ctxstore.metrics import CollectorPauses, LatencyHistogram
from ctxstore.node import Node
from ctxstore.ops import NodeSource, OpsLimits, OpsServer, Readiness, serve_ops, serve_source
from ctxstore.server import Service
from wire.aio import Server
from wire.aio import serve as wire_serve
from wire.client import ClientError, connect
from wire.protocol import Manual

GROUPS = 4


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 60) -> None:
    uvloop.run(asyncio.wait_for(coro, timeout_s))


# -- an HTTP client: raw bytes out, h11-parsed responses in ----------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class Wire:
    """One TCP connection to the ops port.  ``write`` sends raw bytes (pipelining is fine);
    ``answer`` parses the next response (one h11 client per response, fed what is left)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.rest = b""

    @classmethod
    async def open(cls, address: tuple[str, int]) -> Wire:
        return cls(*await asyncio.open_connection(*address))

    async def write(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def answer(self, method: bytes = b"GET") -> Answer:
        c = h11.Connection(h11.CLIENT)
        c.send(h11.Request(method=method, target="/", headers=[("host", "t")]))
        c.send(h11.EndOfMessage())
        if self.rest:
            c.receive_data(self.rest)  # b"" would mean EOF
        response: h11.Response | None = None
        body = b""
        while True:
            event = c.next_event()
            if event is h11.NEED_DATA:
                c.receive_data(await asyncio.wait_for(self.reader.read(65536), 5))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        assert response is not None
        self.rest = c.trailing_data[0]
        headers = {k.decode(): v.decode() for k, v in response.headers}
        return Answer(response.status_code, headers, body)

    async def closed(self) -> bool:
        """True once the server closed the connection (after what was already read); then
        this side closes too."""
        if self.rest:
            return False
        try:
            eof = await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionResetError:
            eof = True
        if eof:
            await self.close()
        return eof

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def fetch(address: tuple[str, int], path: str, method: str = "GET") -> Answer:
    w = await Wire.open(address)
    try:
        await w.write(get(path, method))
        return await w.answer(method.encode())
    finally:
        await w.close()


# -- sources ---------------------------------------------------------------------------------------
@dataclass
class FakeSource:
    node_id: int = 7
    state: Readiness = field(default_factory=lambda: Readiness(GROUPS, GROUPS))
    metrics: bytes = b"# TYPE x_total counter\nx_total 1.0\n"

    def readiness(self) -> Readiness:
        return self.state

    def render_metrics(self) -> bytes:
        return self.metrics


@contextlib.asynccontextmanager
async def fake_ops(
    source: FakeSource | None = None, **limits: Any
) -> AsyncIterator[tuple[OpsServer, FakeSource]]:
    source = source or FakeSource()
    ops = await serve_source(source, "127.0.0.1", 0, OpsLimits(**limits))
    try:
        yield ops, source
    finally:
        ops.close()
        await ops.wait_closed()


@dataclass
class Harness:
    node: Node
    service: Service
    clients: Server
    ops: OpsServer

    @property
    def target(self) -> str:
        return "{}:{}".format(*self.clients.address)

    async def scrape(self) -> dict[str, float]:
        """``/metrics`` parsed: ``name{label="v",...}`` -> value."""
        answer = await fetch(self.ops.address, "/metrics")
        assert answer.status == 200
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(answer.body.decode())


@contextlib.asynccontextmanager
async def nodes(
    tmp_path: Path, n: int, wal_writers: tuple[str, ...] = (), **extra: Any
) -> AsyncIterator[list[Harness]]:
    """``n`` nodes of one cluster on this loop, each with its client server and ops port (and
    its ``wal_writer`` from ``wal_writers``, default the configuration's; ``extra``: more
    settings for every node).  No leader balancing unless asked (``balance_interval_s``): the
    tests read who leads, and a transfer under way has two nodes count the group as theirs
    (tests/cluster/test_leader_balance.py tests balancing on real processes)."""
    extra.setdefault("balance_interval_s", 0.0)
    peer_ports = {i: free_port() if n > 1 else 0 for i in range(1, n + 1)}
    stack = contextlib.AsyncExitStack()
    harnesses = []
    async with stack:
        for i in peer_ports:
            peers = ",".join(f"{j}=127.0.0.1:{p}" for j, p in peer_ports.items() if j != i)
            settings = Settings(
                node_id=i, data_dir=str(tmp_path / f"n{i}"), listen="127.0.0.1:0",
                peer_listen=f"127.0.0.1:{peer_ports[i]}", peers=peers, groups=GROUPS, tick_ms=10,
                **({"wal_writer": wal_writers[i - 1]} if wal_writers else {}), **extra,
            )  # fmt: skip
            node = Node(settings)
            await node.start()
            stack.push_async_callback(node.stop)
            service = Service(node)
            clients = await wire_serve(service, "127.0.0.1", 0)
            stack.push_async_callback(clients.wait_closed)
            stack.callback(clients.close)
            node.advertise("{}:{}".format(*clients.address))
            ops = await serve_ops(node, service, "127.0.0.1", 0, clients=clients)
            stack.push_async_callback(ops.wait_closed)
            stack.callback(ops.close)
            harnesses.append(Harness(node, service, clients, ops))
        yield harnesses


@contextlib.asynccontextmanager
async def single_node(tmp_path: Path, **settings: Any) -> AsyncIterator[Harness]:
    async with nodes(tmp_path, 1, **settings) as (h,):
        yield h


# -- a real node -----------------------------------------------------------------------------------
def test_live_and_ready_on_a_single_node(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            live = await fetch(h.ops.address, "/health/live")
            assert (live.status, live.json()) == (200, {"status": "live", "node": 1})
            assert live.headers["content-type"] == "application/json"
            assert await h.node.wait_leaders(10)
            ready = await fetch(h.ops.address, "/health/ready")
            assert ready.status == 200
            assert ready.json() == {
                "status": "ready", "groups": GROUPS, "groups_without_leader": 0, "node": 1,
            }  # fmt: skip

    run(main())


def test_metrics_parse_and_move_with_appends(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            assert await h.node.wait_leaders(10)
            before = await h.scrape()
            async with await connect(h.target) as c:
                await c.create_session("alice", "bot", {}, "s1")
                await c.set_context_config("s1", 1000, Manual())  # appends are counted
                for i in range(5):
                    await c.append("s1", f"m{i}")
                with pytest.raises(ClientError) as conflict:
                    await c.append("s1", "late", expected_seq=1)
                assert conflict.value.code == "conflict"
                gc.collect()  # one full collection at least, timed by the hook
                during = await h.scrape()
            after = await h.scrape()

        ok = 'ctxstore_append_latency_seconds_count{outcome="ok"}'
        err = 'ctxstore_append_latency_seconds_count{outcome="error"}'
        assert (before[ok], during[ok], during[err]) == (0, 5, 1)
        assert during['ctxstore_append_latency_seconds_bucket{le="+Inf",outcome="ok"}'] == 5
        assert 0 < during['ctxstore_append_latency_seconds_sum{outcome="ok"}'] < 25
        assert during["ctxstore_commit_latency_seconds_count"] >= 8  # create, config, 6 appends
        assert during["ctxstore_requests_total"] - before["ctxstore_requests_total"] >= 8
        assert during['ctxstore_request_errors_total{code="conflict"}'] == 1
        counted = "ctxstore_tokens_counted_messages_total"
        assert during[counted] - before[counted] == 6  # every append, the refused one too
        assert during["ctxstore_tokens_count_seconds_total"] > 0
        assert during["ctxstore_tokens_counted_off_loop_total"] == 0  # short ones: on the loop
        assert (
            during["ctxstore_raft_proposals_total"] >= before["ctxstore_raft_proposals_total"] + 7
        )
        assert (
            during["ctxstore_wal_fsync_seconds_count"] > before["ctxstore_wal_fsync_seconds_count"]
        )
        fsyncs = during["ctxstore_wal_fsync_seconds_count"]
        assert during['ctxstore_wal_fsync_seconds_bucket{le="+Inf"}'] == fsyncs
        assert during['ctxstore_wal_fsync_seconds_bucket{le="5.0"}'] <= fsyncs
        passes, readies = "ctxstore_raft_passes_total", "ctxstore_raft_readies_total"
        assert during[passes] > before[passes] and during[readies] >= during[passes]
        assert (
            during["ctxstore_wal_written_bytes_total"] > before["ctxstore_wal_written_bytes_total"]
        )
        assert during["ctxstore_wal_batches_total"] >= during["ctxstore_wal_rounds_total"] > 0
        assert during["ctxstore_wal_cache_bytes"] > before["ctxstore_wal_cache_bytes"]  # 6 appends
        assert during["ctxstore_wal_disk_reads_total"] >= 0
        assert during["ctxstore_wal_segments"] >= 1
        assert (during["ctxstore_client_connections"], after["ctxstore_client_connections"]) == (
            1,
            0,
        )
        assert after["ctxstore_client_pending_bytes"] == 0
        assert after["ctxstore_client_connections_waiting"] == 0
        assert after["ctxstore_client_connections_refused_total"] == 0
        assert after["ctxstore_client_connections_idle_closed_total"] == 0
        assert during["ctxstore_raft_groups"] == during["ctxstore_raft_groups_led"] == GROUPS
        assert during["ctxstore_raft_groups_without_leader"] == 0
        assert during["ctxstore_raft_campaigns_total{trigger=\"election_timeout\"}"] + during[
            "ctxstore_raft_campaigns_total{trigger=\"preferred_leader\"}"
        ] >= GROUPS  # fmt: skip
        assert during["ctxstore_raft_soft_state_changes_total"] >= GROUPS
        assert (
            during["ctxstore_forwards_sent_total"] == during["ctxstore_forwards_served_total"] == 0
        )
        assert during["ctxstore_peer_connections"] == 0  # a single node has no peers
        full = 'ctxstore_gc_pause_seconds_count{generation="2"}'
        assert during[full] >= before[full] + 1
        assert during['ctxstore_gc_pause_seconds_max{generation="2"}'] > 0
        assert during['ctxstore_gc_pause_seconds_bucket{generation="2",le="+Inf"}'] == during[full]
        assert (
            during['ctxstore_node_info{cluster_id="ctxstore",node_id="1",wal_writer="thread"}'] == 1
        )

    run(main())


def test_peer_and_forward_metrics_in_a_three_node_cluster(tmp_path: Path) -> None:
    async def main() -> None:
        # Both WAL writers in one cluster: the metrics read the same stats from either.
        async with nodes(tmp_path, 3, ("inline", "thread", "inline")) as hs:
            assert [h.node.wal.mode.value for h in hs] == ["inline", "thread", "inline"]
            for h in hs:
                assert await h.node.wait_leaders(10)
                assert (await fetch(h.ops.address, "/health/ready")).status == 200
            async with await connect(hs[0].target) as c:  # sessions spread over the groups
                for s in range(12):
                    await c.create_session("alice", "bot", {}, f"s{s}")
                    await c.append(f"s{s}", "hello")
            m = [await h.scrape() for h in hs]

        led = [x["ctxstore_raft_groups_led"] for x in m]
        assert sum(led) == GROUPS and all(x["ctxstore_raft_groups_without_leader"] == 0 for x in m)
        sent = m[0]["ctxstore_forwards_sent_total"]  # s0..s11 cover every group
        served = sum(x["ctxstore_forwards_served_total"] for x in m[1:])
        assert sent >= served > 0 if led[0] < GROUPS else sent == served == 0
        assert m[0]['ctxstore_append_latency_seconds_count{outcome="ok"}'] == 12
        for i, x in enumerate(m, start=1):
            assert x["ctxstore_peer_connections"] == 2
            assert x["ctxstore_peer_handshakes_evicted_total"] == 0
            batches_sent = 0.0
            for peer in {1, 2, 3} - {i}:
                assert x[f'ctxstore_peer_up{{peer="{peer}"}}'] == 1
                assert x[f'ctxstore_peer_sent_bytes_total{{peer="{peer}"}}'] > 0
                # Raft batches go only where Raft messages or commit notices go (a follower
                # may send none to the other follower): at most one per message or notice, at
                # least one from each node.
                batches = x[f'ctxstore_peer_sent_batches_total{{peer="{peer}"}}']
                notices = x[f'ctxstore_peer_commit_notices_total{{direction="sent",peer="{peer}"}}']
                assert batches <= x[f'ctxstore_peer_sent_messages_total{{peer="{peer}"}}'] + notices
                batches_sent += batches
                assert (
                    x[f'ctxstore_peer_dropped_messages_total{{peer="{peer}",reason="slow"}}'] >= 0
                )
            assert batches_sent > 0

    run(main())


def test_closing_the_ops_server_removes_the_hooks(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:

            def hooks() -> list[object]:
                return [h.service.on_append_latency, h.node.driver.on_commit_latency]

            source = h.ops.source
            assert isinstance(source, NodeSource)
            assert None not in hooks() and source.metrics.gc_pauses in gc.callbacks
            h.ops.close()
            assert hooks() == [None, None] and source.metrics.gc_pauses not in gc.callbacks

    run(main())


# -- readiness -------------------------------------------------------------------------------------
def test_ready_is_503_until_every_group_has_a_leader() -> None:
    async def main() -> None:
        async with fake_ops() as (ops, source):
            answer = await fetch(ops.address, "/health/ready")
            assert (answer.status, answer.json()) == (503, {
                "status": "not_ready", "groups": GROUPS, "groups_without_leader": GROUPS, "node": 7,
            })  # fmt: skip
            source.state = Readiness(GROUPS, 1)
            assert (await fetch(ops.address, "/health/ready")).status == 503
            source.state = Readiness(GROUPS, 0)
            answer = await fetch(ops.address, "/health/ready")
            assert (answer.status, answer.json()["status"]) == (200, "ready")
            source.state = Readiness(GROUPS, 0, running=False)  # the WAL failed: going down
            assert (await fetch(ops.address, "/health/ready")).status == 503
            assert (await fetch(ops.address, "/health/live")).status == 200

    run(main())


# -- the protocol ----------------------------------------------------------------------------------
def test_unknown_paths_404_other_methods_405_and_the_connection_stays() -> None:
    async def main() -> None:
        async with fake_ops() as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(get("/nope"))
            assert (await w.answer()).status == 404
            await w.write(get("/metrics", "DELETE"))
            answer = await w.answer()
            assert (answer.status, answer.headers["allow"]) == (405, "GET, HEAD")
            await w.write(get("/metrics?x=1"))
            answer = await w.answer()
            assert (answer.status, answer.body) == (200, FakeSource().metrics)
            await w.close()

    run(main())


def test_head_has_the_headers_of_get_and_no_body() -> None:
    async def main() -> None:
        async with fake_ops() as (ops, source):
            w = await Wire.open(ops.address)
            await w.write(get("/metrics", "HEAD") + get("/health/live"))
            head = await w.answer(b"HEAD")
            assert (head.status, head.body) == (200, b"")
            assert head.headers["content-length"] == str(len(source.metrics))
            assert (await w.answer()).status == 200  # the same connection
            await w.close()

    run(main())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/metrics", extra="Content-Length: 5\r\n") + b"hello", 413),
        (get("/metrics", "POST", extra="Content-Length: 2\r\n") + b"{}", 405),
        (get("/metrics", extra="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n", 413),
    ],
)
def test_a_request_with_a_body_is_answered_then_closed(request_bytes: bytes, status: int) -> None:
    async def main() -> None:
        async with fake_ops() as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(request_bytes)
            assert (await w.answer()).status == status
            assert await w.closed()

    run(main())


BAD_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",  # TLS
    b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
]


@pytest.mark.parametrize("raw", BAD_REQUESTS)
def test_malformed_requests_get_400_and_close(raw: bytes) -> None:
    async def main() -> None:
        async with fake_ops() as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(raw)
            assert (await w.answer()).status == 400
            assert await w.closed()
            assert ops.bad_requests == 1
            assert (await fetch(ops.address, "/health/live")).status == 200

    run(main())


def test_an_oversize_head_is_431_and_the_server_survives() -> None:
    async def main() -> None:
        async with fake_ops(header_bytes_max=4096) as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(get("/metrics", extra=f"X-Big: {'a' * 8000}\r\n"))
            assert (await w.answer()).status == 431
            assert await w.closed()
            w = await Wire.open(ops.address)  # never ends its head: cut at the bound too
            with contextlib.suppress(ConnectionResetError):
                await w.write(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 5000)
            assert (await w.answer()).status == 431
            assert await w.closed()
            assert (await fetch(ops.address, "/health/live")).status == 200

    run(main())


def test_pipelined_requests_are_answered_in_order_then_closed() -> None:
    async def main() -> None:
        async with fake_ops() as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(
                get("/health/live") + get("/nope") + get("/health/ready")
                + get("/metrics", extra="Connection: close\r\n") + get("/health/live")
            )  # fmt: skip
            statuses = [(await w.answer()).status for _ in range(4)]
            assert statuses == [200, 404, 503, 200]
            assert await w.closed()  # nothing after the Connection: close request
            assert ops.requests == 4

    run(main())


def test_pipelined_requests_split_at_every_byte_offset() -> None:
    raw = get("/health/live") + get("/metrics")

    async def main() -> None:
        async with fake_ops() as (ops, _):
            for cut in range(len(raw) + 1):
                w = await Wire.open(ops.address)
                await w.write(raw[:cut])
                await asyncio.sleep(0)
                await w.write(raw[cut:])
                assert [(await w.answer()).status for _ in range(2)] == [200, 200]
                await w.close()

    run(main())


def test_a_client_that_does_not_read_stops_the_server_reading() -> None:
    big = FakeSource(metrics=b"x" * 65536)
    high = 256 * 1024

    async def main() -> None:
        async with fake_ops(big, write_buffer_high_bytes=high) as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(get("/metrics") * 1000)  # 64 MiB of answers, more than sockets hold
            await asyncio.sleep(0.3)
            (conn,) = ops.connections
            assert conn._transport is not None
            assert 0 < conn._transport.get_write_buffer_size() <= high + 2 * 65536
            assert ops.requests < 1000  # the rest waits unparsed
            for _ in range(1000):
                assert (await w.answer()).body == big.metrics
            assert ops.requests == 1000
            await w.close()

    run(main())


def test_at_the_connection_cap_the_quietest_connection_makes_room() -> None:
    async def main() -> None:
        async with fake_ops(connections_max=2) as (ops, _):
            quiet = await Wire.open(ops.address)  # never sends a byte
            await asyncio.sleep(0.01)
            busy = await Wire.open(ops.address)
            await busy.write(get("/health/live"))
            assert (await busy.answer()).status == 200
            assert (await fetch(ops.address, "/health/live")).status == 200  # one more
            assert await quiet.closed()
            assert ops.evicted.count == 1
            await busy.write(get("/health/live"))  # the one that asked recently stayed
            assert (await busy.answer()).status == 200
            await busy.close()

    run(main())


def test_health_checks_answer_under_a_flood_of_idle_connections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 27 item 6: 500 connections that send nothing (or half a request) hold the ops
    port's 64 slots; ``/health/ready`` still answers at once, and the log has a line or two."""

    async def main() -> None:
        async with single_node(tmp_path) as h:
            assert await h.node.wait_leaders(10)
            flood = [await Wire.open(h.ops.address) for _ in range(500)]
            for w in flood[::2]:
                await w.write(b"GET /health/ready HTTP/1.1\r\n")  # a head that never ends
            assert len(h.ops.connections) <= 64
            loop = asyncio.get_running_loop()
            start = loop.time()
            answer = await asyncio.wait_for(fetch(h.ops.address, "/health/ready"), 2)
            assert answer.status == 200 and answer.json()["status"] == "ready"
            assert loop.time() - start < 0.5
            for w in flood:
                await w.close()

    with caplog.at_level(logging.WARNING, logger="ctxstore.ops"):
        run(main())
    lines = [r for r in caplog.records if "closing the quietest" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


def test_idle_connections_are_closed() -> None:
    async def main() -> None:
        async with fake_ops(idle_timeout_s=0.1) as (ops, _):
            silent = await Wire.open(ops.address)
            assert await silent.closed()
            w = await Wire.open(ops.address)
            await w.write(get("/health/live"))
            assert (await w.answer()).status == 200
            await w.write(b"GET /health/live HTTP/1.1\r\n")  # a head that never ends
            assert await w.closed()
            assert not ops.connections

    run(main())


def test_a_client_that_never_reads_is_cut_off_after_the_idle_timeout() -> None:
    huge = FakeSource(metrics=b"x" * (32 * 1024 * 1024))  # more than the sockets hold

    async def main() -> None:
        async with fake_ops(huge, idle_timeout_s=0.2) as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(get("/metrics", extra="Connection: close\r\n"))
            for _ in range(300):
                if not ops.connections:
                    break
                await asyncio.sleep(0.01)
            assert not ops.connections
            await w.close()

    run(main())


def test_close_stops_listening_and_closes_connections() -> None:
    async def main() -> None:
        async with fake_ops() as (ops, _):
            w = await Wire.open(ops.address)
            await w.write(get("/health/live"))
            assert (await w.answer()).status == 200
            address = ops.address
            ops.close()
            assert await w.closed()
            with pytest.raises(OSError):
                await Wire.open(address)

    run(main())


def test_random_bytes_never_break_the_server() -> None:
    rng = random.Random(5)
    alphabet = b"GET /metrics HTTP/1.1\r\nHost: :\x00\xff 0123456789"
    inputs = [
        bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 300))) for _ in range(150)
    ] + [rng.randbytes(rng.randrange(1, 300)) for _ in range(50)]

    async def main() -> None:
        async with fake_ops(idle_timeout_s=0.5) as (ops, _):
            for raw in inputs:
                w = await Wire.open(ops.address)
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    await w.write(raw)
                    w.writer.write_eof()
                    while await asyncio.wait_for(w.reader.read(65536), 5):
                        pass  # whatever was answered; the server closes in the end
                await w.close()
            assert (await fetch(ops.address, "/health/live")).status == 200
            for _ in range(100):
                if not ops.connections:
                    break
                await asyncio.sleep(0.01)
            assert not ops.connections

    run(main())


# -- the histogram ---------------------------------------------------------------------------------
def test_latency_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    h = LatencyHistogram((0.001, 0.01, 1.0))
    for s in (0.0001, 0.001, 0.002, 0.01, 0.5, 3.0):
        h.observe(s)
    assert h.cumulative() == [("0.001", 2), ("0.01", 4), ("1.0", 5), ("+Inf", 6)]
    assert h.count == 6
    assert h.sum_s == pytest.approx(3.5131)
    with pytest.raises(AssertionError):
        LatencyHistogram((0.1, 0.01))


# -- the collector's pauses ------------------------------------------------------------------------
def test_collector_pauses_are_timed_from_start_to_stop_by_generation() -> None:
    now = [0.0]
    pauses = CollectorPauses(clock=lambda: now[0])
    for generation, seconds in ((0, 0.0002), (0, 0.0004), (2, 0.03), (1, 0.002)):
        pauses("start", {"generation": generation})
        now[0] += seconds
        pauses("stop", {"generation": generation, "collected": 0, "uncollectable": 0})
    pauses("stop", {"generation": 1})  # installed mid-collection: a stop without its start
    assert [h.count for h in pauses.by_generation] == [2, 1, 1]
    assert pauses.max_s == pytest.approx([0.0004, 0.002, 0.03])
    assert pauses.by_generation[0].sum_s == pytest.approx(0.0006)
    assert dict(pauses.by_generation[2].cumulative())["0.05"] == 1
    assert dict(pauses.by_generation[2].cumulative())["0.02"] == 0


def test_collector_pauses_see_real_collections_until_uninstalled() -> None:
    pauses = CollectorPauses()
    pauses.install()
    pauses.install()  # once only
    try:
        assert gc.callbacks.count(pauses) == 1
        gc.collect(0)
        gc.collect(2)
        assert pauses.by_generation[0].count >= 1 and pauses.by_generation[2].count >= 1
        assert pauses.max_s[2] > 0
    finally:
        pauses.uninstall()
    seen = [h.count for h in pauses.by_generation]
    gc.collect(2)
    assert [h.count for h in pauses.by_generation] == seen and pauses not in gc.callbacks
