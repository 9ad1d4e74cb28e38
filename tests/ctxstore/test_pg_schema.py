"""ctxstore/pg/schema.py and ``ctxstore db migrate|status``, against a real PostgreSQL (each test
its own database), and the Postgres settings (ctxstore/config.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ctxstore.cli import main
from ctxstore.config import ConfigError, load
from ctxstore.pg import schema
from ctxstore.pg.schema import MIGRATIONS, Migration, SchemaTooNew

from .pgdb import fetch


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with(dsn: str, body: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await body(conn)
    finally:
        await conn.close()


def tables(dsn: str) -> set[str]:
    rows = run(fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    return {r[0] for r in rows}


def test_migrate_creates_the_schema_once(pg_dsn: str) -> None:
    assert run(_with(pg_dsn, schema.migrate)) == [1, 2, 3, 4]
    assert tables(pg_dsn) == {
        "schema_migrations", "sessions", "messages", "read_cursors", "agents"
    }  # fmt: skip
    assert run(_with(pg_dsn, schema.migrate)) == []
    status = run(_with(pg_dsn, schema.status))
    assert status.version == schema.LATEST and status.pending == []
    assert [a.version for a in status.applied] == [1, 2, 3, 4]


def test_nodes_migrating_together_apply_each_migration_once(pg_dsn: str) -> None:
    async def many() -> list[list[int]]:
        conns = [await asyncpg.connect(pg_dsn) for _ in range(6)]
        try:
            return list(await asyncio.gather(*(schema.migrate(c) for c in conns)))
        finally:
            for c in conns:
                await c.close()

    results = run(many())
    assert sorted(v for r in results for v in r) == [1, 2, 3, 4]
    rows = run(fetch(pg_dsn, "SELECT version FROM schema_migrations ORDER BY 1"))
    assert [r[0] for r in rows] == [1, 2, 3, 4]


def test_a_failing_migration_leaves_nothing_half_applied(pg_dsn: str) -> None:
    nxt = schema.LATEST + 1
    broken = (*MIGRATIONS, Migration(nxt, "broken", ("CREATE TABLE t2 (x int)", "SELECT nope")))
    with pytest.raises(asyncpg.PostgresError):
        run(_with(pg_dsn, lambda c: schema.migrate(c, broken)))
    assert "t2" not in tables(pg_dsn)
    status = run(_with(pg_dsn, lambda c: schema.status(c, broken)))
    assert status.version == schema.LATEST and [m.version for m in status.pending] == [nxt]
    # the lock was released: a fixed migration goes through
    fixed = (*MIGRATIONS, Migration(nxt, "fixed", ("CREATE TABLE t2 (x int)",)))
    assert run(_with(pg_dsn, lambda c: schema.migrate(c, fixed))) == [nxt]
    assert "t2" in tables(pg_dsn)


def test_a_database_of_a_newer_ctxstore_is_refused(pg_dsn: str) -> None:
    run(_with(pg_dsn, schema.migrate))

    async def bump(conn: Any) -> None:
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'later')")

    run(_with(pg_dsn, bump))
    with pytest.raises(SchemaTooNew, match="version 99"):
        run(_with(pg_dsn, schema.migrate))
    with pytest.raises(SchemaTooNew):
        run(_with(pg_dsn, schema.status))


def test_db_commands(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "status", "--postgres-dsn", pg_dsn]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 0 and [p["version"] for p in out["pending"]] == [1, 2, 3, 4]
    assert main(["db", "migrate", "--postgres-dsn", pg_dsn]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "migrated": [1, 2, 3, 4],
        "version": 4,
        "latest": 4,
    }
    assert main(["db", "migrate", "--postgres-dsn", pg_dsn]) == 0
    assert json.loads(capsys.readouterr().out)["migrated"] == []
    assert main(["db", "status", "--postgres-dsn", pg_dsn]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 4 and out["pending"] == []
    assert [(a["version"], a["name"]) for a in out["applied"]] == [
        (1, "sessions, messages and read cursors"),
        (2, "structured messages: role and parts"),
        (3, "agents (header names only)"),
        (4, "messages_by_time as a BRIN index"),
    ]


def test_db_commands_fail_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CTXSTORE_POSTGRES_DSN", raising=False)
    assert main(["db", "status"]) == 2
    assert json.loads(capsys.readouterr().err)["error"] == "bad_request"
    assert main(["db", "status", "--postgres-dsn", "mysql://x"]) == 2
    assert "postgres_dsn" in json.loads(capsys.readouterr().err)["message"]
    # nothing listens on port 1
    assert main(["db", "migrate", "--postgres-dsn", "postgresql://127.0.0.1:1/x"]) == 3
    assert json.loads(capsys.readouterr().err)["error"] == "unavailable"
    config = tmp_path / "node.toml"
    config.write_text('postgres_dsn = "postgresql://127.0.0.1:1/x"\n')
    assert main(["db", "status", "--config", str(config)]) == 3


def test_postgres_settings() -> None:
    dsn = "postgresql://u:p@db:5432/ctx"
    s = load(flags={"postgres_dsn": dsn, "postgres_flush_interval_ms": "250"})
    assert s.postgres_dsn == dsn and s.postgres_flush_interval_ms == 250
    assert s.postgres_flush_rows == 5000 and not s.postgres_serve_history
    env = {"CTXSTORE_POSTGRES_DSN": dsn, "CTXSTORE_POSTGRES_SERVE_HISTORY": "true"}
    s = load(environ=env)
    assert s.postgres_dsn == dsn and s.postgres_serve_history
    assert load(environ={}).postgres_dsn is None
    with pytest.raises(ConfigError, match="postgres_dsn"):
        load(flags={"postgres_dsn": "db:5432"})
    with pytest.raises(ConfigError, match="postgres_serve_history: needs postgres_dsn"):
        load(flags={"postgres_serve_history": "true"}, environ={})
    with pytest.raises(ConfigError, match="postgres_flush_rows"):
        load(flags={"postgres_flush_rows": "0"}, environ={})
