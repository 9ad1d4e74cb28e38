"""The Postgres schema as versioned migrations, applied under an advisory lock.

Rules of this file:
- A migration is a version (1, 2, ...), a name and SQL statements.  Migrations are only ever
  appended; a released one never changes (a database records the versions it applied in
  ``schema_migrations``, not their text).
- ``migrate`` holds the session advisory lock ``LOCK_KEY`` while it reads what is applied and
  applies the rest, each migration in its own transaction together with its
  ``schema_migrations`` row: several nodes starting together apply each migration once (the
  others wait for the lock, then find it applied), and a crash leaves no half-applied one.
- A database that records a version this code does not know was migrated by a newer ctxstore:
  ``SchemaTooNew``, and nothing is written.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

LOCK_KEY = 0x6374_7873_746F_7265 & 0x7FFF_FFFF_FFFF_FFFF  # "ctxstore": a bigint advisory key


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions, messages and read cursors",
        (
            "CREATE TABLE sessions ("
            " id text PRIMARY KEY,"
            " user_id text NOT NULL,"
            " agent_id text NOT NULL,"
            " created_at timestamptz NOT NULL,"
            " metadata jsonb NOT NULL,"
            " last_seq bigint NOT NULL)",
            "CREATE INDEX sessions_by_user ON sessions (user_id, id)",
            "CREATE TABLE messages ("
            " session_id text NOT NULL,"
            " seq bigint NOT NULL,"
            " sender text NOT NULL,"
            " sender_id text NOT NULL,"
            " kind text NOT NULL,"
            " content text NOT NULL,"
            " metadata jsonb NOT NULL,"
            " client_msg_id text,"
            " inserted_at timestamptz NOT NULL,"
            " token_count integer,"
            " PRIMARY KEY (session_id, seq))",
            "CREATE INDEX messages_by_time ON messages (inserted_at)",
            "CREATE TABLE read_cursors ("
            " session_id text NOT NULL,"
            " user_id text NOT NULL,"
            " last_read_seq bigint NOT NULL,"
            " PRIMARY KEY (session_id, user_id))",
        ),
    ),
    Migration(
        2,
        "structured messages: role and parts",
        ("ALTER TABLE messages ADD COLUMN role text, ADD COLUMN parts jsonb",),
    ),
    Migration(
        3,
        "agents (header names only)",
        (
            "CREATE TABLE agents ("
            " id text PRIMARY KEY,"
            " url text NOT NULL,"
            " header_names text[] NOT NULL,"
            " timeout_ms integer NOT NULL,"
            " idle_timeout_ms integer NOT NULL,"
            " debounce_ms integer NOT NULL,"
            " history text NOT NULL,"
            " max_attempts integer NOT NULL,"
            " status text NOT NULL,"
            " protocol text NOT NULL,"
            " source_index bigint NOT NULL,"
            " updated_at timestamptz NOT NULL DEFAULT now())",
        ),
    ),
    # Rows arrive in about the order of their time, so a BRIN index (a few pages: the range of
    # each 128 pages) serves time-range queries as the btree did at a fraction of the cost of
    # every insert (docs/postgres.md).
    Migration(
        4,
        "messages_by_time as a BRIN index",
        (
            "DROP INDEX messages_by_time",
            "CREATE INDEX messages_by_time ON messages USING brin (inserted_at)",
        ),
    ),
)
LATEST = MIGRATIONS[-1].version

_CREATE_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version integer PRIMARY KEY,"
    " name text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())"
)


class SchemaTooNew(Exception):
    """The database was migrated by a newer ctxstore."""


@dataclass(frozen=True)
class Applied:
    version: int
    name: str
    applied_at: dt.datetime


@dataclass(frozen=True)
class Status:
    applied: list[Applied]
    pending: list[Migration]

    @property
    def version(self) -> int:
        return self.applied[-1].version if self.applied else 0


def _check_versions(migrations: tuple[Migration, ...]) -> None:
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1)), (
        "migration versions must be 1, 2, 3 ... in order"
    )


_check_versions(MIGRATIONS)


async def _applied(conn: Any) -> list[Applied]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return []
    rows = await conn.fetch(
        "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
    )
    return [Applied(r["version"], r["name"], r["applied_at"]) for r in rows]


def _status(applied: list[Applied], migrations: tuple[Migration, ...]) -> Status:
    known = {m.version for m in migrations}
    unknown = [a.version for a in applied if a.version not in known]
    if unknown:
        raise SchemaTooNew(
            f"the database has schema version {max(unknown)}; this ctxstore knows versions up "
            f"to {migrations[-1].version if migrations else 0} (a newer ctxstore migrated it)"
        )
    done = {a.version for a in applied}
    return Status(applied, [m for m in migrations if m.version not in done])


async def status(conn: Any, migrations: tuple[Migration, ...] = MIGRATIONS) -> Status:
    """What is applied and what is pending (reads only; takes no lock)."""
    return _status(await _applied(conn), migrations)


async def migrate(conn: Any, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the pending migrations under the advisory lock; the versions this call applied."""
    _check_versions(migrations)
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_CREATE_MIGRATIONS)
        pending = _status(await _applied(conn), migrations).pending
        for m in pending:
            async with conn.transaction():
                for statement in m.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    m.version,
                    m.name,
                )
        return [m.version for m in pending]
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


__all__ = [
    "LATEST",
    "LOCK_KEY",
    "MIGRATIONS",
    "Applied",
    "Migration",
    "SchemaTooNew",
    "Status",
    "migrate",
    "status",
]
