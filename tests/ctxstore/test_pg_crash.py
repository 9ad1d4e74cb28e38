"""Postgres itself crashing under a 3-node cluster's append load: ``pg_ctl stop -m immediate``,
then kill -9 of the postmaster, on a server of the test's own (``pgdb.PrivatePostgres``; the
shared one is not touched).  The nodes compact their logs (every 50 entries) and their
archives' retention keeps 20 messages a session, with 5-message hot tails: what Postgres lacks
waits on disk, and neither compaction nor retention passes the watermarks.  No append fails,
the nodes stay ready, the metrics and a warning show the outage; after each restart the table
catches up with every acknowledged message exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from ctxstore import records
from ctxstore.launcher import LocalCluster
from ctxstore.pg import rows

from .pgdb import PrivatePostgres, fetch
from .test_ops import fetch as http_get
from .test_pg_cluster import SESSIONS, Load, cluster_with, run, scrape, wait_caught_up

RETAINED = 20


async def outage(
    load: Load, crash: Callable[[], None], pg: PrivatePostgres, cluster: LocalCluster
) -> None:
    """Crash Postgres, keep appending, check what shows it, restart it."""
    await asyncio.to_thread(crash)
    crashed = time.monotonic()
    await load.wait(600)  # acknowledged while Postgres is down: the writers would have raised
    await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - crashed)))
    metrics = await scrape(cluster)
    assert sum(m["ctxstore_postgres_backlog_rows"] for m in metrics) >= 600
    assert max(m["ctxstore_postgres_lag_seconds"] for m in metrics) > 1
    assert min(m["ctxstore_postgres_up"] for m in metrics) == 0
    for child in cluster.children.values():
        host, port = child.ops_target.rsplit(":", 1)
        assert (await http_get((host, int(port)), "/health/ready")).status == 200
    await asyncio.to_thread(pg.start)


def test_postgres_crashing_under_load_loses_and_duplicates_nothing(
    tmp_path: Path, private_pg: PrivatePostgres
) -> None:
    async def main() -> None:
        admin = await asyncpg.connect(private_pg.dsn())
        try:
            await admin.execute("CREATE DATABASE ctx")
        finally:
            await admin.close()
        dsn = private_pg.dsn("ctx")
        extra = ["--tail-messages-max", "5", "--snapshot-entries", "50"]
        extra += ["--retention-max-messages", str(RETAINED)]
        async with cluster_with(tmp_path, dsn, *extra) as cluster:
            load = Load(cluster)
            await load.wait(300)
            await outage(load, private_pg.stop_immediate, private_pg, cluster)
            await load.wait(200)
            await outage(load, private_pg.kill_9, private_pg, cluster)
            await wait_caught_up(dsn, len(load.acks), timeout_s=90)
            await load.wait(300)  # (retention catches up with a session at its next write)
            await load.stop()
            await wait_caught_up(dsn, len(load.acks), timeout_s=90)
            await asyncio.sleep(0.5)  # the last watermarks (cursors, last_seq)
            found = await fetch(dsn, f"SELECT {rows.MESSAGE_SELECT} FROM messages ORDER BY 1, 2")
            got = [records.message_to_wire(rows.message_from_row(r)) for r in found]
            # every acknowledged message once (the store keeps only 20 a session now)
            assert {(m.session_id, m.seq): m.content for m in got} == load.acks
            assert len(got) == len(load.acks)
            last = {sid: max(s for (x, s) in load.acks if x == sid) for sid in SESSIONS}
            pg_sessions = await fetch(dsn, "SELECT id, last_seq FROM sessions")
            assert dict(tuple(r) for r in pg_sessions) == last
            metrics = await scrape(cluster)
            assert all(m["ctxstore_postgres_skipped_rows_total"] == 0 for m in metrics)
            # retention ran, and held what Postgres lacked
            assert sum(m["ctxstore_archive_retention_deleted_total"] for m in metrics) > 0
            assert sum(m["ctxstore_postgres_flush_failures_total"] for m in metrics) >= 2
            logs = "".join(Path(c.log_path).read_text() for c in cluster.children.values())
            assert "appends go on" in logs and "flushing again" in logs

    run(main(), timeout_s=240)
