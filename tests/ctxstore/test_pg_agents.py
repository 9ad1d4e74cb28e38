"""The agent registry in Postgres (ctxstore/pg/flusher.py, ``agents``): on a real single node in
this process and a real PostgreSQL (a database of each test's own).  Created, updated and
disabled agents reach the table with their header names only, never a header's value; a row
read at a lower applied index never replaces a newer one; an epoch (a backfill's reset)
writes them again, once; a flush writes at most ``AGENTS_PER_FLUSH`` of them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ctxstore import commands as c
from ctxstore.node import Node
from ctxstore.pg import flusher as flusher_module
from ctxstore.pg.rows import agent_record
from ctxstore.placement import group_of
from ctxstore.records import AgentRecord

from .pgdb import fetch
from .test_pg_flusher import GROUPS, node, run, submit, wait_flushed

SECRET = "s3cr3t-Tok3n"


def agent(agent_id: str, **kw: Any) -> AgentRecord:
    fields: dict[str, Any] = {
        "url": f"https://agents.example/{agent_id}",
        "headers": {"Authorization": f"Bearer {SECRET}-{agent_id}", "X-Api-Key": SECRET},
        "timeout_ms": 120_000,
        "idle_timeout_ms": 30_000,
        "debounce_ms": 500,
        "history": "all",
        "max_attempts": 5,
        "status": "active",
        "protocol": "auto",
    }
    fields.update(kw)
    return AgentRecord(agent_id, **fields)


async def put(n: Node, a: AgentRecord, create: bool = True) -> None:
    result = await n.router.submit(group_of(a.id, GROUPS), c.encode_command(c.PutAgent(a, create)))
    assert isinstance(result, c.AgentSaved), result


async def disable(n: Node, agent_id: str) -> None:
    command = c.encode_command(c.DisableAgent(agent_id))
    result = await n.router.submit(group_of(agent_id, GROUPS), command)
    assert isinstance(result, c.AgentSaved), result


async def create(n: Node, sid: str, metadata: dict[str, Any]) -> None:
    await submit(n, c.CreateSession(sid, "u1", "helper", metadata, 1_700_000_000_000))


async def pg_agents(dsn: str) -> dict[str, dict[str, Any]]:
    found = await fetch(dsn, "SELECT * FROM agents")
    return {r["id"]: dict(r) for r in found}


async def wait_agents(dsn: str, check: Any, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            got = await pg_agents(dsn)
            if check(got):
                return got
            await asyncio.sleep(0.02)


def applied(n: Node, agent_id: str) -> int:
    return int(n.driver.host.node(group_of(agent_id, GROUPS)).raft.log.applied)


async def secrets_in_database(dsn: str) -> int:
    """Rows of any table of the database whose text holds ``SECRET``."""
    tables = await fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    found = 0
    for (table,) in tables:
        rows = await fetch(
            dsn, f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE $1', "%s3cr3t%"
        )
        found += rows[0][0]
    return found


def test_created_updated_and_disabled_agents_reach_postgres_without_header_values(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def main() -> None:
        async with node(tmp_path, pg_dsn) as n:
            flusher = n.postgres
            assert flusher is not None
            await put(n, agent("helper", history="tail 50", protocol="h2"))
            await put(n, agent("plain", headers={}))
            got = await wait_agents(pg_dsn, lambda got: len(got) == 2)
            helper = got["helper"]
            assert helper["header_names"] == ["Authorization", "X-Api-Key"]
            assert (helper["url"], helper["history"], helper["protocol"], helper["status"]) == (
                "https://agents.example/helper", "tail 50", "h2", "active"
            )  # fmt: skip
            assert (helper["timeout_ms"], helper["idle_timeout_ms"]) == (120_000, 30_000)
            assert (helper["debounce_ms"], helper["max_attempts"]) == (500, 5)
            assert helper["source_index"] >= 1 and helper["updated_at"] is not None
            assert got["plain"]["header_names"] == []
            first = helper["source_index"]

            await put(n, agent("helper", url="https://b.example/x", headers={"X-Other": SECRET}),
                      create=False)  # fmt: skip
            got = await wait_agents(
                pg_dsn, lambda got: got["helper"]["url"].startswith("https://b")
            )
            assert got["helper"]["header_names"] == ["X-Other"]
            assert got["helper"]["source_index"] > first
            assert got["helper"]["source_index"] <= applied(n, "helper")
            await disable(n, "plain")
            got = await wait_agents(pg_dsn, lambda got: got["plain"]["status"] == "disabled")
            assert got["helper"]["url"] == "https://b.example/x"

            assert await secrets_in_database(pg_dsn) == 0
            assert SECRET in str(n.state.get_agent("helper"))  # in the store, not in Postgres
            # written once per change, not on every flush
            written, flushes = flusher.stats.agents, flusher.stats.flushes
            await asyncio.sleep(0.5)  # 10 flush intervals
            assert flusher.stats.agents == written == 4
            assert flusher.stats.flushes == flushes
            # the check sees a secret where one is copied: a session's metadata
            await create(n, "s", metadata={"note": SECRET})
            await wait_flushed(n)
            assert await secrets_in_database(pg_dsn) == 1

    run(main())


def test_a_row_read_at_a_lower_applied_index_does_not_replace_a_newer_one(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A deposed leader still flushing writes the agent as it was at its (older) applied
    index: the upsert keeps the newer row.  (Without ``WHERE agents.source_index <
    excluded.source_index`` the old agent would come back.)"""

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=60_000) as n:
            flusher = n.postgres
            assert flusher is not None
            await flusher.stop()  # flushes by hand below
            await flusher._connect()
            old = agent("a", url="https://old.example/a")
            await put(n, old)
            old_index = applied(n, "a")
            assert await flusher.flush() is False
            new = agent("a", url="https://new.example/a", status="disabled")
            await put(n, new, create=False)
            assert await flusher.flush() is False
            got = await pg_agents(pg_dsn)
            new_index = got["a"]["source_index"]
            assert got["a"]["url"] == "https://new.example/a" and new_index > old_index

            stale = flusher_module._Batch(agents=[agent_record(old, old_index)])
            await flusher._write(stale)
            same = flusher_module._Batch(agents=[agent_record(old, new_index)])
            await flusher._write(same)  # (an equal index is the same state: kept too)
            got = await pg_agents(pg_dsn)
            assert (got["a"]["url"], got["a"]["status"]) == ("https://new.example/a", "disabled")
            assert got["a"]["source_index"] == new_index
            # a newer one does replace it
            newer = flusher_module._Batch(agents=[agent_record(old, new_index + 1)])
            await flusher._write(newer)
            got = await pg_agents(pg_dsn)
            assert got["a"]["url"] == "https://old.example/a"
            assert got["a"]["source_index"] == new_index + 1

    run(main())


def test_a_new_epoch_writes_the_groups_agents_again_once(tmp_path: Path, pg_dsn: str) -> None:
    """A backfill's reset (``PostgresFlushed(reset)``, a new epoch) of one group: its agents are
    written again (the database may have been emptied), once; the other groups' are not."""

    async def main() -> None:
        async with node(tmp_path, pg_dsn) as n:
            flusher = n.postgres
            assert flusher is not None
            ids = [f"agent-{i}" for i in range(12)]
            for i in ids:
                await put(n, agent(i))
            await wait_agents(pg_dsn, lambda got: len(got) == len(ids))
            await asyncio.sleep(0.2)
            assert flusher.stats.agents == len(ids)
            g = group_of(ids[0], GROUPS)
            in_g = [i for i in ids if group_of(i, GROUPS) == g]
            assert 0 < len(in_g) < len(ids)
            await fetch(pg_dsn, "TRUNCATE agents")
            reset = c.encode_command(c.PostgresFlushed([], reset=True))
            await n.router.submit(g, reset)
            got = await wait_agents(pg_dsn, lambda got: len(got) == len(in_g))
            assert sorted(got) == sorted(in_g)
            await asyncio.sleep(0.5)
            assert flusher.stats.agents == len(ids) + len(in_g)
            assert sorted(await pg_agents(pg_dsn)) == sorted(in_g)

    run(main())


def test_a_flush_writes_at_most_agents_per_flush(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the cap the rest wait for the next flush, which starts at once (``flush`` answers
    that more wait)."""
    monkeypatch.setattr(flusher_module, "AGENTS_PER_FLUSH", 2)

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=60_000) as n:
            flusher = n.postgres
            assert flusher is not None
            await flusher.stop()
            await flusher._connect()
            for i in range(5):
                await put(n, agent(f"a{i}"))
            assert await flusher.flush() is True
            assert len(await pg_agents(pg_dsn)) == 2
            assert await flusher.flush() is True
            assert await flusher.flush() is False
            assert sorted(await pg_agents(pg_dsn)) == [f"a{i}" for i in range(5)]
            assert await flusher.flush() is False
            assert flusher.stats.agents == 5 and flusher.stats.flushes == 3

    run(main())


def test_a_failed_flush_writes_the_agents_at_the_next(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=60_000) as n:
            flusher = n.postgres
            assert flusher is not None
            await flusher.stop()
            await flusher._connect()
            await put(n, agent("a"))
            write = flusher._write

            async def failing(batch: Any) -> int:
                raise OSError("connection lost")

            monkeypatch.setattr(flusher, "_write", failing)
            with pytest.raises(OSError):
                await flusher.flush()
            monkeypatch.setattr(flusher, "_write", write)
            assert await pg_agents(pg_dsn) == {}
            assert await flusher.flush() is False
            assert list(await pg_agents(pg_dsn)) == ["a"]

    run(main())
