"""The Postgres write-behind while groups move between nodes (scale-out, design §5.6): four real
``ctxstore serve`` processes, each group on 3 of them, under append load, Postgres behind a
proxy.  With Postgres black-holed, the node leading the most groups is killed -9, its disk
wiped, and removed: its groups get new replicas and new leaders, which resume from the
watermarks recorded through Raft (they re-copy next to nothing).  Then a new node joins on an
empty disk with ``postgres_serve_history``: the groups moved to it copy their older history from
Postgres, and it serves the full history.  Postgres ends with every acknowledged message
exactly once."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench.nodestats import fetch_metrics
from ctxstore.launcher import LocalCluster
from ctxstore.placement import group_of
from wire.client import connect

from ..cluster.test_scale_out import GROUPS, admin, hosts_exactly, settled, until, view
from .pgdb import fetch
from .test_e2e import read_all
from .test_pg_cluster import (
    FAST,
    SESSIONS,
    Load,
    check_postgres,
    proxied,
    run,
    wait_caught_up,
)

pytestmark = pytest.mark.cluster

MOVES = ["--balance-interval-s", "2", "--mover-interval-ms", "100"]


async def routes(cluster: LocalCluster, via: int) -> list[int]:
    async with await connect(cluster.children[via].target, timeout_s=5) as c:
        return list((await c.get_routes()).leaders)


def test_groups_moving_between_nodes_keep_postgres_exact(tmp_path: Path, pg_dsn: str) -> None:
    async def main() -> None:
        async with proxied(pg_dsn) as (proxy, dsn):
            extra = [*FAST, *MOVES, "--postgres-dsn", dsn, "--postgres-serve-history", "true"]
            extra += ["--tail-messages-max", "5", "--snapshot-entries", "50"]
            cluster = LocalCluster(4, str(tmp_path), extra_args=extra)
            await cluster.start()
            try:
                assert GROUPS == 16 and "16" in FAST
                async with await connect(cluster.targets) as c:
                    for sid in SESSIONS:
                        await c.create_session("user", "agent", {"sid": sid}, sid)
                v = await view(cluster, 1)
                assert all(len(r) == 3 for r in v["replicas"].values())  # 3 of 4 nodes
                load = Load(cluster)
                await load.wait(1200)  # (a history that a restart from seq 0 would show)
                await wait_caught_up(pg_dsn, 1200)
                proxy.blackhole()  # flushes hang in their transactions
                await load.wait(300)
                leaders = await routes(cluster, 1)
                victim = max(set(leaders), key=leaders.count)
                led = {g for g, n in enumerate(leaders) if n == victim}
                # what new leaders starting from seq 0 would copy again, at least
                from_zero = sum(1 for sid, _ in load.acks if group_of(sid, GROUPS) in led)
                cluster.kill(victim)
                await cluster.wait_exit(victim)
                shutil.rmtree(cluster.children[victim].data_dir)  # its disk is gone
                alive = next(i for i in cluster.children if i != victim)
                status, body = await admin(cluster, alive, "remove", node=str(victim))
                assert status == 202, body
                gone = frozenset({victim})
                await until(lambda: settled(cluster, gone), 40, "the victim's groups re-placed")
                await load.wait(200)
                proxy.heal()
                await wait_caught_up(pg_dsn, len(load.acks), timeout_s=60)
                # A new node on an empty disk (the wiped one cannot come back under its id).
                new = cluster.add_node(via=alive)
                await cluster.start_node(new, timeout_s=30)
                await until(lambda: settled(cluster, gone), 40, "groups moved to the new node")
                await until(lambda: hosts_exactly(cluster, gone), 20, "groups hosted where placed")
                await load.wait(200)
                await load.stop()
                await check_postgres(cluster, pg_dsn, load)
                metrics = await scrape_alive(cluster, gone)
                recopied = sum(
                    m["ctxstore_postgres_rows_total"] - m["ctxstore_postgres_rows_inserted_total"]
                    for m in metrics
                )
                # (a leadership transfer between a COMMIT and its watermark, or a COMMIT whose
                # answer the hole ate, costs that batch again: tens of rows, not the history)
                assert from_zero > 200 and recopied < from_zero, (recopied, from_zero)
                assert all(m["ctxstore_postgres_skipped_rows_total"] == 0 for m in metrics)
                # The new node copied its groups' older history from Postgres, and serves it.
                v = await view(cluster, new)
                hosted = {int(g) for g in v["local"]["hosted"]}
                mine = [sid for sid in SESSIONS if group_of(sid, GROUPS) in hosted]
                assert mine, "no session's group moved to the new node"
                deadline = time.monotonic() + 30
                while True:
                    m = await fetch_metrics(cluster.children[new].ops_target)
                    if m["ctxstore_archive_backfill_ranges"] == 0:
                        break
                    assert time.monotonic() < deadline, "the new node did not copy its history"
                    await asyncio.sleep(0.1)
                assert m["ctxstore_postgres_history_rows_total"] > 100, m
                async with await connect(cluster.children[new].target) as c:
                    got = {sid: await read_all(c, sid) for sid in mine}
                for sid in mine:
                    assert {m.seq: m.content for m in got[sid]} == {
                        seq: content for (s, seq), content in load.acks.items() if s == sid
                    }
            finally:
                await cluster.stop()

    run(main(), timeout_s=240)


async def scrape_alive(cluster: LocalCluster, gone: frozenset[int]) -> list[dict[str, float]]:
    return [await fetch_metrics(c.ops_target) for i, c in cluster.children.items() if i not in gone]


async def db_backfill(*targets: str) -> tuple[int, list[Any], str]:
    command = [sys.executable, "-m", "ctxstore", "db", "backfill", "--timeout", "60"]
    for t in targets:
        command += ["--http", t]
    child = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, [json.loads(x) for x in out.decode().splitlines()], err.decode()


def test_db_backfill_with_groups_on_3_of_4_nodes(tmp_path: Path, pg_dsn: str) -> None:
    """A node hosts 12 of the 16 groups: a backfill through it alone would leave 4 groups'
    history out, so it is refused (nothing reset); through nodes that host every group
    together it resets each group and copies the whole history again."""

    async def main() -> None:
        extra = [*FAST, *MOVES, "--postgres-dsn", pg_dsn, "--tail-messages-max", "5"]
        cluster = LocalCluster(4, str(tmp_path), extra_args=extra)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                for sid in SESSIONS:
                    await c.create_session("user", "agent", {"sid": sid}, sid)
            load = Load(cluster)
            await load.wait(600)
            await load.stop()
            await wait_caught_up(pg_dsn, len(load.acks))
            await asyncio.sleep(0.5)  # the last watermarks
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute("TRUNCATE messages, sessions, read_cursors")
            finally:
                await conn.close()
            hosted = {i: len((await view(cluster, i))["local"]["hosted"]) for i in cluster.children}
            assert sum(hosted.values()) == 3 * GROUPS  # each group on 3 of the 4
            few = min(hosted, key=hosted.__getitem__)  # it hosts at most 12 of the 16
            status, lines, err = await db_backfill(cluster.children[few].ops_target)
            assert status == 2 and lines == [], (status, lines, err)
            assert "hosted on none of the nodes given" in err
            await asyncio.sleep(1.0)
            assert (await fetch(pg_dsn, "SELECT count(*) FROM messages"))[0][0] == 0
            order = [few, *(i for i in cluster.children if i != few)]
            status, lines, err = await db_backfill(*(cluster.children[i].ops_target for i in order))
            assert status == 0, err
            # the groups missing from ``few`` are on each of the others: the next one is enough
            assert lines[0] == {"started": True, "groups": GROUPS, "nodes": order[:2]}
            assert lines[-1] == {"done": True, "groups": GROUPS}
            await check_postgres(cluster, pg_dsn, load)
        finally:
            await cluster.stop()

    run(main(), timeout_s=180)
