"""The nodes' pauses from their /metrics (``bench/nodestats.py``): the window's collections from
two scrapes, and the scrape itself over a real socket."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from bench.nodestats import (
    describe,
    describe_context_reads,
    fetch_metrics,
    node_pauses,
    parse_metrics,
    scrape_nodes,
)
from ctxstore.launcher import free_port
from ctxstore.metrics import GC_PAUSE_BUCKETS_S
from raft.wal_segments import FSYNC_BUCKETS_S


def histogram(name: str, labels: str, bounds: tuple[float, ...], values: list[float]) -> list[str]:
    """The lines of one Prometheus histogram of ``values``."""
    head = f"{labels}," if labels else ""
    lines = [f'{name}_bucket{{{head}le="{b!r}"}} {sum(v <= b for v in values)}' for b in bounds]
    lines.append(f'{name}_bucket{{{head}le="+Inf"}} {len(values)}')
    suffix = f"{{{labels}}}" if labels else ""
    return [*lines, f"{name}_count{suffix} {len(values)}", f"{name}_sum{suffix} {sum(values)}"]


def exposition(
    gc: dict[str, list[float]], fsyncs: list[float] | None = None, pass_max_s: float = 0.012
) -> str:
    """A node's /metrics text as ``ctxstore.metrics`` writes it: ``gc`` maps a generation to
    its pauses (seconds) since start, ``fsyncs`` lists the WAL's fsync times since start."""
    fsyncs = fsyncs or []
    lines = ["# TYPE ctxstore_gc_pause_seconds histogram"]
    for generation in ("0", "1", "2"):
        pauses = gc.get(generation, [])
        lines += histogram(
            "ctxstore_gc_pause_seconds", f'generation="{generation}"', GC_PAUSE_BUCKETS_S, pauses
        )
    lines.append("# TYPE ctxstore_wal_fsync_seconds histogram")
    lines += histogram("ctxstore_wal_fsync_seconds", "", FSYNC_BUCKETS_S, fsyncs)
    lines += [
        "# TYPE ctxstore_raft_pass_seconds_max gauge",
        f"ctxstore_raft_pass_seconds_max {pass_max_s}",
        "# TYPE ctxstore_wal_fsync_seconds_max gauge",
        f"ctxstore_wal_fsync_seconds_max {max(fsyncs, default=0.0)}",
    ]
    return "\n".join(lines) + "\n"


def test_parse_keys_samples_by_name_and_sorted_labels() -> None:
    m = parse_metrics(exposition({"1": [0.003]}))
    assert m['ctxstore_gc_pause_seconds_count{generation="1"}'] == 1
    assert m['ctxstore_gc_pause_seconds_bucket{generation="1",le="0.002"}'] == 0
    assert m['ctxstore_gc_pause_seconds_bucket{generation="1",le="0.005"}'] == 1
    assert m["ctxstore_raft_pass_seconds_max"] == 0.012


def test_the_window_has_the_collections_between_the_scrapes() -> None:
    before = {"0": [0.0003] * 5, "1": [0.04]}  # the 40 ms one is before the window
    during = {"0": [0.0003] * 5 + [0.0004, 0.0015, 0.0002], "1": [0.04, 0.008]}
    fsyncs = [0.9, 0.001]  # the 900 ms one is before the window
    first = {
        1: parse_metrics(exposition(before, fsyncs)),
        2: parse_metrics(exposition(before, fsyncs)),
    }
    last = {
        1: parse_metrics(exposition(during, [*fsyncs, 0.0008, 0.15, 0.002], pass_max_s=0.019)),
        2: None,  # killed: no figures
        3: parse_metrics(exposition(during)),  # no first scrape: no figures
    }
    out = node_pauses(first, last, window_s=2.0)
    assert list(out) == ["node1"]
    n1 = out["node1"]
    assert n1["gc"]["0"] == {"count": 3, "seconds": pytest.approx(0.0021), "longest_le_ms": 2.0}
    assert n1["gc"]["1"] == {"count": 1, "seconds": pytest.approx(0.008), "longest_le_ms": 10.0}
    assert n1["gc"]["2"] == {"count": 0, "seconds": 0.0, "longest_le_ms": None}
    assert n1["gc_seconds"] == pytest.approx(0.0101)
    assert n1["gc_pct_of_window"] == pytest.approx(0.51, abs=0.01)
    assert n1["fsync"] == {"count": 3, "seconds": pytest.approx(0.1528), "longest_le_ms": 200.0}
    assert (n1["pass_max_ms_since_start"], n1["fsync_max_ms_since_start"]) == (19.0, 900.0)
    assert not n1["restarted"]
    assert describe(out) == (
        "node1 GC 4 in 10 ms, longest ≤ 10 ms (gen 1); fsyncs 3, longest ≤ 200 ms; "
        "pass ≤ 19 ms since start"
    )


def raft_counters(passes: int, proposals: int, batches: int, batched: int) -> str:
    """The Raft and batching counters of a node's /metrics."""
    values = {
        "ctxstore_raft_passes_total": passes,
        "ctxstore_raft_proposals_total": proposals,
        "ctxstore_raft_messages_sent_total": 2 * passes,
        "ctxstore_append_batches_total": batches,
        "ctxstore_appends_batched_total": batched,
    }
    return "".join(f"# TYPE {k} counter\n{k} {v}\n" for k, v in values.items())


def test_the_window_has_the_passes_proposals_and_batches_between_the_scrapes() -> None:
    first = {1: parse_metrics(exposition({}) + raft_counters(10, 50, 2, 7))}
    last = {1: parse_metrics(exposition({}) + raft_counters(110, 250, 42, 507))}
    out = node_pauses(first, last, window_s=1.0)
    assert out["node1"]["raft"] == {
        "passes": 100, "proposals": 200, "messages_sent": 200, "batches": 40,
        "appends_batched": 500,
    }  # fmt: skip
    assert describe(out).endswith("; 100 passes, 200 proposals (500 appends in 40 batches)")
    without = node_pauses({1: parse_metrics(exposition({}))}, {1: parse_metrics(exposition({}))}, 1)
    assert "raft" not in without["node1"]  # a node from before batches


def context_reads(memory: int, archive: int, reply: int | None) -> str:
    name = "ctxstore_context_reads_total"
    lines = [f"# TYPE {name} counter", f'{name}{{source="memory"}} {memory}']
    lines.append(f'{name}{{source="archive"}} {archive}')
    if reply is not None:
        lines.append(f'{name}{{source="reply"}} {reply}')
    return "\n".join(lines) + "\n"


def test_the_window_has_the_get_context_answers_by_source() -> None:
    first = {
        1: parse_metrics(exposition({}) + context_reads(2, 1, 5)),
        2: parse_metrics(exposition({}) + context_reads(4, 0, None)),
    }
    last = {
        1: parse_metrics(exposition({}) + context_reads(3, 1, 105)),
        2: parse_metrics(exposition({}) + context_reads(4, 0, None)),  # (before the cache)
    }
    out = node_pauses(first, last, window_s=1.0)
    assert out["node1"]["context_reads"] == {"memory": 1, "archive": 0, "reply": 100}
    assert "context_reads" not in out["node2"]  # none in the window
    assert describe_context_reads(out) == "node1 memory 1, archive 0, reply 100"
    assert describe_context_reads(node_pauses({}, {}, 1.0)) is None


def test_a_pause_beyond_the_last_bucket_and_a_restarted_node() -> None:
    first = {1: parse_metrics(exposition({"2": [0.05, 0.05, 0.05]}))}
    last = {1: parse_metrics(exposition({"2": [2.5]}))}  # fewer than before: it restarted
    n1 = node_pauses(first, last, window_s=1.0)["node1"]
    assert n1["restarted"]
    assert n1["gc"]["2"] == {"count": 1, "seconds": 2.5, "longest_le_ms": float("inf")}
    assert n1["fsync"] == {"count": 0, "seconds": 0.0, "longest_le_ms": None}


def test_a_node_without_the_collector_metrics_is_left_out() -> None:
    old = parse_metrics(
        "# TYPE ctxstore_raft_pass_seconds_max gauge\nctxstore_raft_pass_seconds_max 1\n"
    )
    assert node_pauses({1: old}, {1: old}, 1.0) == {}


def test_scrapes_over_real_sockets() -> None:
    body = exposition({"0": [0.001]}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        ok = request.startswith(b"GET /metrics HTTP/1.1\r\n")
        status = b"200 OK" if ok else b"404 Not Found"
        payload = body if ok else b""
        writer.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )  # fmt: skip
        await writer.drain()
        writer.close()

    async def failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        good = await asyncio.start_server(handle, "127.0.0.1", 0)
        bad = await asyncio.start_server(failing, "127.0.0.1", 0)
        good_at = f"127.0.0.1:{good.sockets[0].getsockname()[1]}"
        bad_at = f"127.0.0.1:{bad.sockets[0].getsockname()[1]}"
        try:
            m = await fetch_metrics(good_at)
            assert m['ctxstore_gc_pause_seconds_count{generation="0"}'] == 1
            with pytest.raises(ConnectionError, match="HTTP 503"):
                await fetch_metrics(bad_at)
            got = await scrape_nodes({1: good_at, 2: bad_at, 3: f"127.0.0.1:{free_port()}"})
            assert got[1] == m and got[2] is None and got[3] is None
        finally:
            good.close()
            bad.close()

    uvloop.run(asyncio.wait_for(main(), 30))
