"""``python -m ctxstore.archive_bench`` (or ``python -m bench archive``): what the local archive
costs per message (docs/benchmarks.md).

Feeds ``--rows`` 200-byte messages over ``--sessions`` sessions and 256 groups into a fresh
``ctxstore.archive.Archive`` the way a node does (``add`` per message, ``applied`` per apply
batch of ``--batch`` messages, the loop yielding between batches), waits for the last commit,
and prints rows per second and this process's CPU per row (loop thread + writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence

from .archive import Archive, ArchiveConfig
from .records import StoredMessage


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _run(rows: int, sessions: int, batch: int, payload: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ctxstore-archive-bench-") as d:
        archive = Archive(os.path.join(d, "archive.sqlite3"), ArchiveConfig())
        await archive.start()
        content = "x" * payload
        messages = [
            StoredMessage(f"s-{i % sessions}", i // sessions + 1, "user", "u", "text", content,
                          {}, f"m-{i}", 1_700_000_000_000 + i, None)
            for i in range(rows)
        ]  # fmt: skip
        cpu, started = _cpu_s(), time.perf_counter()
        for i, m in enumerate(messages):
            archive.add(i % 256, i + 1, m)
            if i % batch == batch - 1:
                archive.applied(i % 256, i + 1)
                await asyncio.sleep(0)
        await archive.barrier()
        wall, cpu = time.perf_counter() - started, _cpu_s() - cpu
        stats = archive.stats
        await archive.stop()
    return {
        "rows": rows,
        "rows_per_s": rows / wall,
        "cpu_us_per_row": cpu / rows * 1e6,
        "batches": stats.batches,
        "commit_seconds_max": stats.commit_seconds_max,
    }


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ctxstore.archive_bench", description=__doc__)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100, help="messages per apply batch")
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    import uvloop

    result = uvloop.run(_run(args.rows, args.sessions, args.batch, args.payload_bytes))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['rows']:,} rows: {result['rows_per_s']:,.0f} rows/s, "
            f"{result['cpu_us_per_row']:.1f} µs CPU per row, {result['batches']:.0f} batches, "
            f"slowest commit {1000 * result['commit_seconds_max']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
