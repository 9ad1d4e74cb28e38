"""A PostgreSQL database of its own for each test (tests/ctxstore/conftest.py ``pg_dsn``), on the
machine's server at 127.0.0.1:5432 (``CTXSTORE_TEST_PG``: another server's DSN, without a
database name).  Created empty, dropped (with its connections) at teardown."""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import asyncpg

SERVER = os.environ.get("CTXSTORE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
_names = itertools.count()


def dsn(database: str) -> str:
    return f"{SERVER}/{database}"


def new_name() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")
    return f"ctxstore_test_{worker}_{os.getpid()}_{next(_names)}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(dsn("postgres"), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database() -> str:
    name = new_name()
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return name


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def fetch(database_dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(database_dsn, timeout=10)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()
