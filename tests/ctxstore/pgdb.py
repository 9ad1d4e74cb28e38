"""A PostgreSQL database of its own for each test (tests/ctxstore/conftest.py ``pg_dsn``), on the
machine's server at 127.0.0.1:5432 (``CTXSTORE_TEST_PG``: another server's DSN, without a
database name).  Created empty, dropped (with its connections) at teardown."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from ..cluster.proxy import LinkProxy

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


class PrivatePostgres:
    """A PostgreSQL server of the test's own (``initdb`` in a new directory under /tmp, on a
    free port, trust auth), for the tests that crash it: ``pg_ctl stop -m immediate`` and
    kill -9 of the postmaster, which the shared server must not suffer.  As root, the server
    runs as the ``postgres`` user (PostgreSQL refuses root).  ``close`` stops it and deletes
    its directory."""

    def __init__(self) -> None:
        missing = [b for b in ("initdb", "pg_ctl") if shutil.which(b) is None]
        assert not missing, f"{missing} not on PATH (the PostgreSQL server package)"
        self.root = tempfile.mkdtemp(prefix="ctxstore-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._pg("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def server(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def dsn(self, database: str = "postgres") -> str:
        return f"{self.server}/{database}"

    def _pg(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        """Start it (after a kill -9, retried while the dead server's backends exit)."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(self.root, "log")
        for attempt in range(20):
            try:
                self._pg("pg_ctl", "-D", self.data, "-o", options, "-l", log, "-w", "start")
                return
            except subprocess.CalledProcessError:
                if attempt == 19:
                    raise
                time.sleep(0.25)

    def stop_immediate(self) -> None:
        """A crash as ``pg_ctl stop -m immediate`` makes it: no checkpoint, clients cut."""
        self._pg("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def kill_9(self) -> None:
        """kill -9 of the postmaster (its backends exit when they see it gone)."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            pid = int(f.readline())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, "the postmaster did not die"
            time.sleep(0.02)

    def close(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._pg("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """Running (a zombie, not yet reaped by whoever adopted it, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@asynccontextmanager
async def proxied(database_dsn: str) -> AsyncIterator[tuple[LinkProxy, str]]:
    """A ``LinkProxy`` in front of the server of ``database_dsn`` (to cut, black-hole or heal
    the link) and the DSN that goes through it."""
    parts = urlsplit(database_dsn)
    assert parts.hostname is not None and parts.port is not None
    proxy = LinkProxy((parts.hostname, parts.port), "postgres")
    host, port = await proxy.start()
    user = f"{parts.username}@" if parts.username else ""
    try:
        yield proxy, parts._replace(netloc=f"{user}{host}:{port}").geturl()
    finally:
        await proxy.close()
