"""What the nodes say of their own pauses: their ``/metrics`` (the ops port), scraped at the
start and at the end of the measured window.

A slow second in the timeline has one of three causes: the nodes' event loops stopped (a
garbage collection, a long driver pass, a slow fsync), the client stopped, or the machine gave
the processes no CPU.  These figures answer the first: per node, the cyclic collector's pauses
by generation and the WAL's fsyncs in the window (count, total time, the bucket of the
longest: the difference of the two scrapes of the histograms ``ctxstore_gc_pause_seconds``
and ``ctxstore_wal_fsync_seconds``), and the longest driver pass since the node started
(``ctxstore_raft_pass_seconds_max``, a gauge, not per window).  Besides, what counting tokens
cost each node in the window (``ctxstore_tokens_counted_messages_total`` and
``ctxstore_tokens_count_seconds_total``: the node's own clock around each count), and its
Raft passes, proposals and messages sent in the window, with the appends its router proposed
in batch entries (``AppendBatch``, ctxstore/router.py) and those entries, and its
``get_context`` answers by source (``ctxstore_context_reads_total``: built from memory or the
archive, or kept and sent again).  A node
that does not answer (killed, or its ops port not reachable) has no figures; one restarted in
the window (``failover``) has those since its restart; nothing here fails a run.

Local clusters (``--nodes``) serve their ops ports on addresses the launcher chose; an
existing cluster's are given with ``--ops``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

import h11
from prometheus_client.parser import text_string_to_metric_families

Scrape = dict[str, float]  # 'name{label="v",...}' (labels sorted) -> value
SCRAPE_TIMEOUT_S = 5.0
SCRAPE_BYTES_MAX = 4 << 20  # a node's /metrics is a few tens of KiB
GENERATIONS = ("0", "1", "2")
GC_COUNT = "ctxstore_gc_pause_seconds_count"
TOKENS_COUNTED = "ctxstore_tokens_counted_messages_total"
TOKENS_SECONDS = "ctxstore_tokens_count_seconds_total"
CONTEXT_READS = "ctxstore_context_reads_total"  # get_context answers by source
CONTEXT_SOURCES = ("memory", "archive", "reply")  # built from memory, the archive; kept
RAFT_COUNTERS = {  # window deltas reported per node (a node without one has none of it)
    "passes": "ctxstore_raft_passes_total",
    "proposals": "ctxstore_raft_proposals_total",
    "messages_sent": "ctxstore_raft_messages_sent_total",
    "batches": "ctxstore_append_batches_total",
    "appends_batched": "ctxstore_appends_batched_total",
}


def parse_metrics(text: str) -> Scrape:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def fetch_metrics(address: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> Scrape:
    """GET /metrics from ``host:port`` (one HTTP/1.1 request on its own connection)."""
    host, _, port = address.rpartition(":")

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            conn = h11.Connection(h11.CLIENT)
            head = h11.Request(method="GET", target="/metrics", headers=[("Host", address)])
            writer.write(conn.send(head) + conn.send(h11.EndOfMessage()))
            body = bytearray()
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > SCRAPE_BYTES_MAX:
                        raise ValueError(f"{address}/metrics: more than {SCRAPE_BYTES_MAX} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError(f"{address}/metrics: closed before the response ended")
            if status != 200:
                raise ConnectionError(f"{address}/metrics: HTTP {status}")
            return bytes(body)
        finally:
            writer.close()

    return parse_metrics((await asyncio.wait_for(get(), timeout_s)).decode())


async def scrape_nodes(ops: Mapping[int, str]) -> dict[int, Scrape | None]:
    """Every node's metrics at once; None for a node that did not answer."""

    async def one(address: str) -> Scrape | None:
        try:
            return await fetch_metrics(address)
        except (OSError, TimeoutError, ValueError, h11.ProtocolError):
            return None

    answers = await asyncio.gather(*(one(a) for a in ops.values()))
    return dict(zip(ops, answers, strict=True))


def _le(key: str) -> float:
    bound = key.split('le="')[1].split('"')[0]
    return math.inf if bound == "+Inf" else float(bound)


def window_histogram(first: Scrape, last: Scrape, name: str, labels: str = "") -> dict[str, Any]:
    """What histogram ``name`` (with ``labels``, e.g. ``generation="1"``) counted between two
    scrapes: count, seconds, and the upper bound of the highest bucket it reached (ms; None:
    nothing counted, inf: above the last bound)."""

    def delta(key: str) -> float:
        return last[key] - first.get(key, 0.0)

    suffix = f"{{{labels}}}" if labels else ""
    prefix = f"{name}_bucket{{" + (f"{labels}," if labels else "") + 'le="'
    longest: float | None = None
    below = 0.0
    for key in sorted((k for k in last if k.startswith(prefix)), key=_le):
        n = delta(key)  # cumulative: the window's observations <= this bound
        if n > below:
            longest = _le(key)
        below = n
    return {
        "count": int(delta(f"{name}_count{suffix}")),
        "seconds": round(delta(f"{name}_sum{suffix}"), 4),
        "longest_le_ms": None if longest is None else longest * 1000,
    }


def node_pauses(
    first: Mapping[int, Scrape | None], last: Mapping[int, Scrape | None], window_s: float
) -> dict[str, Any]:
    """Per node (``node<i>``) that answered both scrapes: its collector's pauses and its WAL
    fsyncs in the window (since its restart if it restarted in between), and the longest pass
    and fsync since it started; ``{}`` without scrapes."""
    out: dict[str, Any] = {}
    for node_id, end in sorted(last.items()):
        start = first.get(node_id)
        if start is None or end is None or not any(k.startswith(GC_COUNT) for k in end):
            continue  # gone, or a node without the collector's metrics
        restarted = any(end.get(k, 0.0) < v for k, v in start.items() if k.startswith(GC_COUNT))
        if restarted:  # its counters began again: the window's figures are since its restart
            start = {}
        gc = {
            g: window_histogram(start, end, "ctxstore_gc_pause_seconds", f'generation="{g}"')
            for g in GENERATIONS
        }
        total = sum(v["seconds"] for v in gc.values())
        out[f"node{node_id}"] = {
            "restarted": restarted,
            "gc": gc,
            "gc_seconds": round(total, 4),
            "gc_pct_of_window": round(100 * total / window_s, 2) if window_s > 0 else None,
            "fsync": window_histogram(start, end, "ctxstore_wal_fsync_seconds"),
            "pass_max_ms_since_start": round(end["ctxstore_raft_pass_seconds_max"] * 1000, 2),
            "fsync_max_ms_since_start": round(end["ctxstore_wal_fsync_seconds_max"] * 1000, 2),
        }
        if all(name in end for name in RAFT_COUNTERS.values()):  # older nodes: no batches
            out[f"node{node_id}"]["raft"] = {
                k: int(end[name] - start.get(name, 0.0)) for k, name in RAFT_COUNTERS.items()
            }
        if TOKENS_COUNTED in end:  # nodes before token counting have none
            counted = int(end[TOKENS_COUNTED] - start.get(TOKENS_COUNTED, 0.0))
            seconds = end.get(TOKENS_SECONDS, 0.0) - start.get(TOKENS_SECONDS, 0.0)
            out[f"node{node_id}"]["tokens"] = {
                "counted": counted,
                "seconds": round(seconds, 4),
                "us_per_message": round(seconds / counted * 1e6, 2) if counted else None,
            }
        reads = {
            source: int(end[key] - start.get(key, 0.0))
            for source in CONTEXT_SOURCES
            if (key := f'{CONTEXT_READS}{{source="{source}"}}') in end
        }
        if any(reads.values()):  # (nodes before the reply cache have no "reply")
            out[f"node{node_id}"]["context_reads"] = reads
    return out


def describe_context_reads(pauses: Mapping[str, Any]) -> str | None:
    """One line for the report: per node, the window's ``get_context`` answers by where they
    came from (built from memory, from the archive, or sent again as kept); None if none."""
    parts = []
    for name, p in pauses.items():
        reads = p.get("context_reads")
        if reads:
            parts.append(f"{name} " + ", ".join(f"{k} {v:,}" for k, v in reads.items()))
    return " | ".join(parts) or None


def describe_tokens(pauses: Mapping[str, Any]) -> str | None:
    """One line for the report: the messages each node counted in the window and the time
    per message; None when no node reports counting."""
    parts = []
    for name, p in pauses.items():
        t = p.get("tokens")
        if t is None:
            continue
        each = f", {t['us_per_message']:.1f} µs each" if t["us_per_message"] is not None else ""
        parts.append(f"{name} {t['counted']:,} messages in {t['seconds'] * 1000:,.0f} ms{each}")
    return " | ".join(parts) or None


def describe(pauses: Mapping[str, Any]) -> str:
    """One line for the report: per node, the collections and fsyncs of the window with the
    longest of each, and the longest pass since the node started."""
    parts = []
    for name, p in pauses.items():
        gc, fsync = p["gc"], p["fsync"]
        count = sum(v["count"] for v in gc.values())
        worst = max(
            (v["longest_le_ms"], g) for g, v in gc.items() if v["longest_le_ms"] is not None
        ) if count else None  # fmt: skip
        text = f"{name} GC {count} in {p['gc_seconds'] * 1000:.0f} ms"
        if worst is not None:
            text += f", longest ≤ {worst[0]:g} ms (gen {worst[1]})"
        text += f"; fsyncs {fsync['count']:,}"
        if fsync["longest_le_ms"] is not None:
            text += f", longest ≤ {fsync['longest_le_ms']:g} ms"
        text += f"; pass ≤ {p['pass_max_ms_since_start']:.0f} ms since start"
        if (raft := p.get("raft")) is not None:
            text += (
                f"; {raft['passes']:,} passes, {raft['proposals']:,} proposals "
                f"({raft['appends_batched']:,} appends in {raft['batches']:,} batches)"
            )
        parts.append(text)
    return " | ".join(parts)
