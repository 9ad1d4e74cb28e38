"""Fixtures of the ctxstore tests: ``pg_dsn``, an empty PostgreSQL database of the test's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .pgdb import PrivatePostgres, create_database, drop_database, dsn


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    name = create_database()
    try:
        yield dsn(name)
    finally:
        drop_database(name)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the test's own, to crash (``pgdb.PrivatePostgres``)."""
    server = PrivatePostgres()
    try:
        yield server
    finally:
        server.close()
