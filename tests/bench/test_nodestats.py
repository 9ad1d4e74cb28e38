"""The nodes' pauses from their /metrics (``bench/nodestats.py``): the window's collections from
two scrapes, and the scrape itself over a real socket."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from bench.nodestats import describe, fetch_metrics, node_pauses, parse_metrics, scrape_nodes
from ctxstore.metrics import GC_PAUSE_BUCKETS_S
from tests.cluster.harness import free_port


def exposition(
    gc: dict[str, list[float]], pass_max_s: float = 0.012, fsync_max_s: float = 0.004
) -> str:
    """A node's /metrics text as ``ctxstore.metrics`` writes it: ``gc`` maps a generation to
    its pauses (seconds) since start."""
    lines = ["# TYPE ctxstore_gc_pause_seconds histogram"]
    for generation in ("0", "1", "2"):
        pauses = gc.get(generation, [])
        label = f'generation="{generation}"'
        for bound in GC_PAUSE_BUCKETS_S:
            n = sum(p <= bound for p in pauses)
            lines.append(f'ctxstore_gc_pause_seconds_bucket{{{label},le="{bound!r}"}} {n}')
        lines.append(f'ctxstore_gc_pause_seconds_bucket{{{label},le="+Inf"}} {len(pauses)}')
        lines.append(f"ctxstore_gc_pause_seconds_count{{{label}}} {len(pauses)}")
        lines.append(f"ctxstore_gc_pause_seconds_sum{{{label}}} {sum(pauses)}")
    lines += [
        "# TYPE ctxstore_raft_pass_seconds_max gauge",
        f"ctxstore_raft_pass_seconds_max {pass_max_s}",
        "# TYPE ctxstore_wal_fsync_seconds_max gauge",
        f"ctxstore_wal_fsync_seconds_max {fsync_max_s}",
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
    first = {1: parse_metrics(exposition(before)), 2: parse_metrics(exposition(before))}
    last = {
        1: parse_metrics(exposition(during, pass_max_s=0.019)),
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
    assert (n1["pass_max_ms_since_start"], n1["fsync_max_ms_since_start"]) == (19.0, 4.0)
    assert not n1["restarted"]
    text = describe(out)
    assert text.startswith("node1 GC 4 in 10 ms, longest ≤ 10 ms (gen 1); pass ≤ 19 ms")


def test_a_pause_beyond_the_last_bucket_and_a_restarted_node() -> None:
    first = {1: parse_metrics(exposition({"2": [0.05, 0.05, 0.05]}))}
    last = {1: parse_metrics(exposition({"2": [2.5]}))}  # fewer than before: it restarted
    n1 = node_pauses(first, last, window_s=1.0)["node1"]
    assert n1["restarted"]
    assert n1["gc"]["2"] == {"count": 1, "seconds": 2.5, "longest_le_ms": float("inf")}


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
