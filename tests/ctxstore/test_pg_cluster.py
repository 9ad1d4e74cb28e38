"""The Postgres write-behind end to end: three real ``ctxstore serve`` processes under append
load, a real PostgreSQL (a database of each test's own) reached through a TCP proxy in this
process (``tests/cluster/proxy.py``) that the tests cut or black-hole, and kill -9 of a leader.
After each: every acknowledged message is in ``messages`` exactly once, equal to what the store
returns, and ``sessions.last_seq`` and ``read_cursors`` agree with the store."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvloop

from bench.nodestats import fetch_metrics
from ctxstore import records
from ctxstore.launcher import LocalCluster
from ctxstore.pg import rows
from ctxstore.pg.flusher import BACKOFF_MIN_S
from ctxstore.placement import group_of
from wire.client import Client, ClientError, agent, connect
from wire.protocol import Message

from .pgdb import fetch, proxied
from .test_e2e import read_all
from .test_ops import fetch as http_get

pytestmark = pytest.mark.cluster

SESSIONS = [f"pg-{i}" for i in range(12)]
# The issue asks for 60 s; the suite's time budget allows 6 (CTXSTORE_TEST_PG_OUTAGE_S=60 for
# the long run, docs/postgres.md).
OUTAGE_S = float(os.environ.get("CTXSTORE_TEST_PG_OUTAGE_S", "6"))
FAST = ["--tick-ms", "20", "--groups", "16", "--postgres-flush-interval-ms", "100"]
STILL = ("--balance-interval-s", "0")  # no leadership moves but the ones a test makes


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 120) -> None:
    uvloop.run(asyncio.wait_for(coro, timeout_s))


@asynccontextmanager
async def cluster_with(tmp_path: Path, dsn: str, *extra: str) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(3, str(tmp_path), extra_args=[*FAST, "--postgres-dsn", dsn, *extra])
    await cluster.start()
    try:
        async with await connect(cluster.targets) as c:
            for sid in SESSIONS:
                await c.create_session("user", "agent", {"sid": sid}, sid)
        yield cluster
    finally:
        await cluster.stop()


class Load:
    """``writers`` clients appending (retrying with the same client_msg_id until acked) and
    marking read, until stopped; every ack recorded."""

    def __init__(self, cluster: LocalCluster, writers: int = 12) -> None:
        self.cluster = cluster
        self.acks: dict[tuple[str, int], str] = {}
        self.failures: list[BaseException] = []
        self._stop = False
        self._tasks = [asyncio.create_task(self._writer(k)) for k in range(writers)]

    async def _writer(self, k: int) -> None:
        rng = random.Random(k)
        targets = self.cluster.targets[k % 3 :] + self.cluster.targets[: k % 3]
        client = await connect(targets, timeout_s=5, backoff_max_s=0.5)
        try:
            i = 0
            while not self._stop:
                sid = rng.choice(SESSIONS)
                content = f"w{k}-{i}"
                seq = await append_until_acked(client, sid, content, f"{k}-{i}")
                assert (sid, seq) not in self.acks, f"{sid} seq {seq} acknowledged twice"
                self.acks[sid, seq] = content
                if i % 10 == 0:
                    await mark_read(client, sid, seq)
                i += 1
        except BaseException as e:
            self.failures.append(e)
            raise
        finally:
            await client.close()

    async def wait(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        start = len(self.acks)
        while len(self.acks) < start + n:
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, f"only {len(self.acks) - start} acks"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)


async def append_until_acked(client: Client, sid: str, content: str, msg_id: str) -> int:
    deadline = time.monotonic() + 60
    while True:
        try:
            return (await client.append(sid, content, client_msg_id=msg_id)).seq
        except ClientError as e:
            if not e.retryable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def mark_read(client: Client, sid: str, seq: int) -> None:
    """Retried until answered (moving a cursor forward again changes nothing)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await client.mark_read(sid, "user", seq)
            return
        except ClientError as e:
            if not e.retryable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def pg_messages(dsn: str) -> list[Message]:
    found = await fetch(dsn, f"SELECT {rows.MESSAGE_SELECT} FROM messages ORDER BY 1, 2")
    return [records.message_to_wire(rows.message_from_row(r)) for r in found]


async def wait_caught_up(dsn: str, expected: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        count = (await fetch(dsn, "SELECT count(*) FROM messages"))[0][0]
        if count >= expected:
            return
        assert time.monotonic() < deadline, f"{count} of {expected} messages in Postgres"
        await asyncio.sleep(0.1)


async def check_postgres(cluster: LocalCluster, dsn: str, load: Load) -> None:
    """Every acked message in Postgres exactly once (the primary key makes "once"; a missing
    or extra row fails the equality), equal to the store's history; sessions and cursors."""
    async with await connect(cluster.targets) as c:
        store = {sid: await read_all(c, sid) for sid in SESSIONS}
        sessions = {sid: (await c.get_session(sid)).session for sid in SESSIONS}
    total = sum(map(len, store.values()))
    assert total == len(load.acks)
    for sid, messages in store.items():
        assert {(sid, m.seq): m.content for m in messages} == {
            k: v for k, v in load.acks.items() if k[0] == sid
        }
    await wait_caught_up(dsn, total)
    # the cursors and last_seqs go with the rows' flush; wait for the last watermark too
    await asyncio.sleep(0.5)
    got = await pg_messages(dsn)
    assert got == [m for sid in sorted(store) for m in store[sid]]
    pg_sessions = await fetch(dsn, "SELECT id, user_id, agent_id, last_seq FROM sessions")
    assert sorted(tuple(r) for r in pg_sessions) == sorted(
        (sid, "user", "agent", s.last_seq) for sid, s in sessions.items()
    )
    cursors = await fetch(dsn, "SELECT session_id, last_read_seq FROM read_cursors")
    for sid, seq in cursors:
        assert 0 < seq <= sessions[sid].last_seq


async def scrape(cluster: LocalCluster) -> list[dict[str, float]]:
    return [await fetch_metrics(c.ops_target) for c in cluster.children.values()]


def test_every_acknowledged_message_reaches_postgres_exactly_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def main() -> None:
        async with cluster_with(tmp_path, pg_dsn) as cluster:
            load = Load(cluster)
            await load.wait(1500)
            await load.stop()
            await check_postgres(cluster, pg_dsn, load)
            metrics = await scrape(cluster)
            assert sum(m["ctxstore_postgres_flushes_total"] for m in metrics) > 0
            assert sum(m["ctxstore_postgres_rows_inserted_total"] for m in metrics) == len(
                load.acks
            )
            migrated = await fetch(pg_dsn, "SELECT version FROM schema_migrations")
            assert sorted(r[0] for r in migrated) == [1, 2, 3, 4]  # three nodes together: once each

    run(main())


def test_a_postgres_outage_under_load_loses_and_duplicates_nothing(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Postgres cut off (the proxy refuses) under load for ``OUTAGE_S`` and 1 200 appends, far
    more than the hot tails hold (5 messages a session: the rest waits in the archives): no
    append fails because of it, the nodes stay ready, the backlog and lag show; healed, the
    table catches up exactly."""

    async def main() -> None:
        tail = ("--tail-messages-max", "5")
        async with proxied(pg_dsn) as (proxy, dsn), cluster_with(tmp_path, dsn, *tail) as cluster:
            load = Load(cluster)
            await load.wait(200)
            proxy.cut()
            cut_at, cut_time = len(load.acks), time.monotonic()
            await load.wait(1200)  # all acked: no failure, the writers would have raised
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_time)))
            metrics = await scrape(cluster)
            assert sum(m["ctxstore_postgres_backlog_rows"] for m in metrics) > 500
            assert max(m["ctxstore_postgres_lag_seconds"] for m in metrics) > 1
            assert sum(m["ctxstore_postgres_flush_failures_total"] for m in metrics) > 0
            # retried with backoff (doubling from BACKOFF_MIN_S, jittered down to half): at most
            # about log2 of the outage's length in tries, not one every BACKOFF_MIN_S
            tries = 3 + math.log2((time.monotonic() - cut_time) / (BACKOFF_MIN_S / 2) + 1)
            assert max(m["ctxstore_postgres_flush_failures_total"] for m in metrics) <= tries
            for child in cluster.children.values():
                host, port = child.ops_target.rsplit(":", 1)
                ready = await http_get((host, int(port)), "/health/ready")
                assert ready.status == 200
            count = (await fetch(pg_dsn, "SELECT count(*) FROM messages"))[0][0]
            assert count <= cut_at
            proxy.heal()
            await load.wait(200)
            await load.stop()
            await check_postgres(cluster, dsn, load)
            for m in await scrape(cluster):
                assert m["ctxstore_postgres_skipped_rows_total"] == 0

    run(main(), timeout_s=180 + OUTAGE_S)


def test_kill_9_of_a_leader_in_the_middle_of_a_flush(tmp_path: Path, pg_dsn: str) -> None:
    """The proxy black-holes Postgres, so every node's flush hangs inside its transaction; the
    node leading the most groups is killed -9 there, Postgres comes back: the new leaders
    resume from the watermarks recorded through Raft; no gap, no duplicate."""

    async def main() -> None:
        async with proxied(pg_dsn) as (proxy, dsn), cluster_with(tmp_path, dsn, *STILL) as cluster:
            load = Load(cluster)
            await load.wait(300)
            before = (await fetch(pg_dsn, "SELECT count(*) FROM messages"))[0][0]
            await asyncio.sleep(0.05)  # (the proxy forwards any answer already sent)
            proxy.blackhole()
            await load.wait(300)
            assert proxy.dropped_bytes > 0  # a flush was sent into the hole
            async with await connect(cluster.targets) as c:
                leaders = (await c.get_routes()).leaders
            victim = max(set(leaders) - {0}, key=leaders.count)
            led = {g for g, n in enumerate(leaders) if n == victim}
            # what new leaders starting from seq 0 would copy again, at least (for the message)
            from_zero = sum(1 for sid, _ in load.acks if group_of(sid, 16) in led)
            cluster.kill(victim)
            await cluster.wait_exit(victim)
            await load.wait(300)
            # rows committed whose COMMIT's answer the hole ate: their flushers never knew
            lost = (await fetch(pg_dsn, "SELECT count(*) FROM messages"))[0][0] - before
            proxy.heal()
            await cluster.start_node(victim)
            await load.wait(200)
            await load.stop()
            await check_postgres(cluster, dsn, load)
            # The new leaders resumed from the watermarks: the only rows copied twice are those
            # of COMMITs whose answer the hole ate (no leadership moved but by the kill).
            survivors = [c for i, c in cluster.children.items() if i != victim]
            metrics = [await fetch_metrics(c.ops_target) for c in survivors]
            recopied = sum(
                m["ctxstore_postgres_rows_total"] - m["ctxstore_postgres_rows_inserted_total"]
                for m in metrics
            )
            assert recopied <= lost, (recopied, lost, from_zero)

    run(main(), timeout_s=180)


def test_a_replica_restored_from_snapshots_pages_its_history_from_postgres(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Node 3 is down while 1 000 messages are appended and the leaders compact their logs;
    restarted, it installs their snapshots and copies the older history its archive lacks from
    Postgres, not from a peer: it then serves the full history itself.  (A replica rebuilt on a
    wiped disk needs membership changes, which do not exist yet: Raft refuses a node that lost
    its log under the same id.)"""

    async def main() -> None:
        extra = ["--snapshot-entries", "20", "--tail-messages-max", "5"]
        extra += ["--postgres-serve-history", "true"]
        async with cluster_with(tmp_path, pg_dsn, *extra) as cluster:
            await cluster.stop_node(3)
            load = Load(cluster)
            await load.wait(1000)
            await load.stop()
            await wait_caught_up(pg_dsn, len(load.acks))
            await cluster.start_node(3)
            # Node 3 installs the groups' snapshots one after the other, and each starts a copy
            # of the history its archive lacks: no copy in progress at one moment does not
            # mean none to come.  A read of a group whose copy is running is refused
            # ``unavailable`` (retryable, "being copied"): read until every session reads whole.
            deadline = time.monotonic() + 60
            async with await connect(cluster.targets[2]) as c:
                while True:
                    try:
                        rebuilt = {sid: await read_all(c, sid) for sid in SESSIONS}
                        break
                    except ClientError as e:
                        if e.code != "unavailable" or time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
            got = {(m.session_id, m.seq): m.content for ms in rebuilt.values() for m in ms}
            assert got == load.acks
            # every row it copied came from Postgres
            m = await fetch_metrics(cluster.children[3].ops_target)
            assert m["ctxstore_archive_backfill_ranges"] == 0
            copied = m["ctxstore_archive_backfill_rows_total"]
            assert copied == m["ctxstore_postgres_history_rows_total"] > 100

    run(main())


def test_db_backfill_copies_the_whole_history_into_an_emptied_database(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The database loses every row (a new one, restored empty): the watermarks say everything
    is there, so nothing would come back by itself; ``ctxstore db backfill`` resets them and
    waits until the leaders copied everything again, from their tails and archives."""

    async def main() -> None:
        async with cluster_with(tmp_path, pg_dsn, "--tail-messages-max", "5") as cluster:
            agents = [f"agent-{i}" for i in range(8)]
            async with await connect(cluster.targets) as c:
                for i in agents:
                    await c.create_agent(agent(i, f"https://agents.example/{i}"))
            load = Load(cluster)
            await load.wait(600)
            await load.stop()
            await wait_caught_up(pg_dsn, len(load.acks))
            assert len(await fetch(pg_dsn, "SELECT id FROM agents")) == len(agents)
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute("TRUNCATE messages, sessions, read_cursors, agents")
            finally:
                await conn.close()
            host, port = cluster.children[2].ops_target.rsplit(":", 1)
            wrong = await http_get((host, int(port)), "/admin/postgres/backfill")  # a GET
            assert wrong.status == 405 and wrong.headers["allow"] == "POST"
            command = [sys.executable, "-m", "ctxstore", "db", "backfill"]
            command += ["--http", cluster.children[2].ops_target, "--timeout", "60"]
            child = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await child.communicate()
            assert child.returncode == 0, err.decode()
            lines = [json.loads(line) for line in out.decode().splitlines()]
            assert lines[0] == {"started": True, "groups": 16, "nodes": [2]}
            assert lines[-1] == {"done": True, "groups": 16}
            await check_postgres(cluster, pg_dsn, load)
            # each leader's first flush after it sees its group's reset writes the group's
            # agents ("done" does not wait for them)
            deadline = time.monotonic() + 10
            while len(found := await fetch(pg_dsn, "SELECT id FROM agents")) < len(agents):
                assert time.monotonic() < deadline, found
                await asyncio.sleep(0.1)
            assert sorted(r[0] for r in found) == sorted(agents)

    run(main())


def test_a_new_leader_writes_its_groups_agents_once_and_they_converge(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Agents in Postgres through a leader change: the node leading the groups of most agents
    is stopped; each new leader writes the agents of the groups it took once (its new term
    starts its memory over), and no other agent is written again; an update afterwards
    reaches the table; no header value is anywhere in the database."""
    secret = "s3cr3t-Tok3n"

    async def pg_agents() -> dict[str, tuple[Any, ...]]:
        found = await fetch(pg_dsn, "SELECT id, url, header_names, status FROM agents")
        return {r["id"]: (r["url"], r["header_names"], r["status"]) for r in found}

    async def agent_rows(children: list[Any]) -> float:
        total = 0.0
        for child in children:
            total += (await fetch_metrics(child.ops_target))["ctxstore_postgres_agent_rows_total"]
        return total

    async def main() -> None:
        async with cluster_with(tmp_path, pg_dsn, *STILL) as cluster:
            ids = [f"agent-{i}" for i in range(24)]
            async with await connect(cluster.targets) as c:
                for i in ids:
                    headers = {"Authorization": f"Bearer {secret}", "X-Team": f"{secret}-{i}"}
                    await c.create_agent(agent(i, f"https://agents.example/{i}", headers=headers))
                leaders = (await c.get_routes()).leaders
            deadline = time.monotonic() + 30
            while len(await pg_agents()) < len(ids):
                assert time.monotonic() < deadline, "the agents did not reach Postgres"
                await asyncio.sleep(0.1)
            assert await agent_rows(list(cluster.children.values())) == len(ids)  # once each
            victim = max(
                set(leaders) - {0}, key=lambda n: sum(leaders[group_of(i, 16)] == n for i in ids)
            )
            moved = [i for i in ids if leaders[group_of(i, 16)] == victim]
            assert moved
            survivors = [x for k, x in cluster.children.items() if k != victim]
            before = await agent_rows(survivors)
            await cluster.stop_node(victim)
            deadline = time.monotonic() + 30
            while await agent_rows(survivors) < before + len(moved):
                assert time.monotonic() < deadline, "the new leaders did not write the agents"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # 10 flush intervals: nothing more
            assert await agent_rows(survivors) == before + len(moved)

            async with await connect([x.target for x in survivors]) as c:
                changed = agent(moved[0], "https://moved.example/x", headers={"X-New": secret})
                await c.update_agent(changed)
                disabled = (await c.disable_agent(moved[-1])).agent
            expected = {
                i: (f"https://agents.example/{i}", ["Authorization", "X-Team"], "active")
                for i in ids
            }
            expected[changed.id] = ("https://moved.example/x", ["X-New"], "active")
            expected[disabled.id] = (disabled.url, sorted(disabled.headers), "disabled")
            deadline = time.monotonic() + 30
            while (got := await pg_agents()) != expected:
                assert time.monotonic() < deadline, (got, expected)
                await asyncio.sleep(0.1)
            tables = await fetch(
                pg_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
            for (table,) in tables:  # no header value in any row of any table
                sql = f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE $1'
                assert (await fetch(pg_dsn, sql, f"%{secret}%"))[0][0] == 0, table

    run(main())
