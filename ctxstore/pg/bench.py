"""``python -m ctxstore.pg.bench`` (or ``python -m bench pg-flush``): how fast the Postgres
write-behind copies (docs/benchmarks.md).

Starts one node in this process (``ctxstore.node.Node``, 16 groups, Postgres on with flushes
held back), appends ``--rows`` messages of ``--payload-bytes`` over ``--sessions`` sessions
through Raft, then lets the flusher drain them, one ``flush()`` after the other (transactions of
``--flush-rows`` rows: reading the hot tails and the archive, the messages COPY-ed straight
into ``messages`` (``copy_fallbacks``: batches that went through ON CONFLICT instead), sessions
and cursors upserted, the watermarks through Raft), and prints rows per second: ``drain``
end to end, ``copy`` the time inside the Postgres transactions only, and the longest the
node's loop waited meanwhile (a task asking for 1 ms sleeps: what an append arriving during a
flush would wait for at worst).  The database is one of its own on ``--server`` (created and
dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from .. import commands
from ..collector import tune_collector
from ..config import Settings
from ..node import Node
from ..placement import group_of

GROUPS = 16


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _admin(server: str, sql: str) -> None:
    conn = await asyncpg.connect(f"{server}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fill(node: Node, rows: int, sessions: int, payload: int) -> None:
    router, content = node.router, "x" * payload
    for s in range(sessions):
        sid = f"s-{s}"
        create = commands.CreateSession(sid, "u", "a", {}, 1_700_000_000_000)
        await router.submit(group_of(sid, GROUPS), commands.encode_command(create))
    window: set[asyncio.Future[Any]] = set()
    for i in range(rows):
        sid = f"s-{i % sessions}"
        cmd = commands.Append(
            sid, "user", "u", "text", content, {}, f"m-{i}", None, None, 1_700_000_000_000 + i
        )
        window.add(router.submit(group_of(sid, GROUPS), commands.encode_command(cmd)))
        if len(window) >= 256:
            _, window = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*window)


async def _longest_wait(stop: asyncio.Event) -> float:
    """The longest a 1 ms sleep overran until ``stop``: how long the loop was held."""
    worst = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - started - 0.001)
    return worst


async def _run(args: argparse.Namespace) -> dict[str, float]:
    name = f"ctxstore_bench_{os.getpid()}"
    await _admin(args.server, f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory(prefix="ctxstore-pg-bench-") as d:
            settings = Settings(
                data_dir=d,
                listen="127.0.0.1:0",
                groups=GROUPS,
                postgres_dsn=f"{args.server}/{name}",
                postgres_flush_interval_ms=3_600_000,
                postgres_flush_rows=args.flush_rows,
                tail_messages_max=args.tail,
                snapshot_entries=1_000_000,
            )
            node = Node(settings)
            tune_collector()  # as ``ctxstore serve`` does
            await node.start()
            try:
                assert await node.wait_leaders(10)
                flusher = node.postgres
                assert flusher is not None
                await flusher.stop()  # flushed by hand below
                fill_started = time.perf_counter()
                await _fill(node, args.rows, args.sessions, args.payload_bytes)
                fill_s = time.perf_counter() - fill_started
                await node.archive.barrier()
                await flusher._connect()
                stop = asyncio.Event()
                waits = asyncio.create_task(_longest_wait(stop))
                cpu, started = _cpu_s(), time.perf_counter()
                while flusher.backlog_rows():
                    await flusher.flush()
                wall, cpu = time.perf_counter() - started, _cpu_s() - cpu
                stop.set()
                longest_wait = await waits
                stats = flusher.stats
            finally:
                await node.stop()
    finally:
        await _admin(args.server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {
        "rows": stats.messages,
        "drain_rows_per_s": stats.messages / wall,
        "copy_rows_per_s": stats.messages / stats.seconds_total,
        "transactions": stats.flushes,
        "copy_fallbacks": stats.copy_fallbacks,
        "cpu_us_per_row": cpu / stats.messages * 1e6,
        "appends_per_s_while_filling": args.rows / fill_s,
        "loop_wait_max_ms": longest_wait * 1000,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctxstore.pg.bench", description=__doc__)
    p.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--flush-rows", type=int, default=5000)
    p.add_argument("--tail", type=int, default=10, help="hot tail per session (the rest: archive)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    import uvloop

    result = uvloop.run(_run(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['rows']:,.0f} rows in {result['transactions']:.0f} transactions: "
            f"{result['drain_rows_per_s']:,.0f} rows/s drained end to end, "
            f"{result['copy_rows_per_s']:,.0f} rows/s inside the transactions, "
            f"{result['cpu_us_per_row']:.1f} µs CPU per row in the node; "
            f"the loop held for at most {result['loop_wait_max_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
