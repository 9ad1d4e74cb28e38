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
import shutil
import time
from pathlib import Path

import pytest

from bench.nodestats import fetch_metrics
from ctxstore.launcher import LocalCluster
from ctxstore.placement import group_of
from wire.client import connect

from ..cluster.test_scale_out import GROUPS, admin, hosts_exactly, settled, until, view
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
                await load.wait(300)
                await wait_caught_up(pg_dsn, 300)
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
                assert from_zero > 100 and recopied < from_zero / 4, (recopied, from_zero)
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
