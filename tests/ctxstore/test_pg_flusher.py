"""ctxstore/pg/flusher.py on a real single node (in this process) and a real PostgreSQL (a
database of each test's own): what the node commits reaches Postgres exactly once, from the
hot tail and from the archive, through an outage (a proxy in front of Postgres, cut), and
without duplicates when a watermark is lost."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import uvloop

from ctxstore import commands as c
from ctxstore.config import Settings
from ctxstore.node import Node
from ctxstore.pg import flusher as flusher_module
from ctxstore.pg import rows, schema
from ctxstore.placement import group_of
from ctxstore.records import (
    NO_PARTS,
    StoredMessage,
    decode_parts,
    encode_parts,
    message_to_wire,
)

from . import pgdb
from .pgdb import fetch

GROUPS = 4


def run(coro: Any, timeout: float = 60.0) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(guarded())


@contextlib.asynccontextmanager
async def node(tmp_path: Path, dsn: str, **kw: Any) -> AsyncIterator[Node]:
    settings = Settings(
        data_dir=str(tmp_path / "n1"),
        listen="127.0.0.1:0",
        groups=GROUPS,
        tick_ms=10,
        postgres_dsn=dsn,
        postgres_flush_interval_ms=kw.pop("interval_ms", 50),
        **kw,
    )
    n = Node(settings)
    await n.start()
    try:
        assert await n.wait_leaders(10)
        yield n
    finally:
        await n.stop()


async def submit(n: Node, cmd: c.CreateSession | c.Append | c.MarkRead) -> Any:
    result = await n.router.submit(group_of(cmd.session_id, GROUPS), c.encode_command(cmd))
    assert not isinstance(result, c.Rejected), result
    return result


async def create(n: Node, sid: str, user: str = "u1") -> None:
    await submit(n, c.CreateSession(sid, user, "agent", {"topic": sid}, 1_700_000_000_000))


async def append(n: Node, sid: str, content: str, **kw: Any) -> int:
    cmd = c.Append(
        sid,
        kw.get("sender", "agent"),
        "bot",
        "text",
        content,
        kw.get("metadata", {}),
        kw.get("cmid"),
        None,
        kw.get("tokens"),
        1_700_000_000_000 + len(content),
        kw.get("role"),
        encode_parts(kw.get("parts")),
    )
    result = await submit(n, cmd)
    assert isinstance(result, c.Appended)
    return result.seq


async def wait_flushed(n: Node, timeout: float = 20.0) -> None:
    assert n.postgres is not None
    async with asyncio.timeout(timeout):
        while n.postgres.backlog_rows() or any(n.state.postgres_pending(g) for g in range(GROUPS)):
            await asyncio.sleep(0.02)


async def pg_messages(dsn: str) -> list[StoredMessage]:
    found = await fetch(dsn, f"SELECT {rows.MESSAGE_SELECT} FROM messages ORDER BY 1, 2")
    return [rows.message_from_row(r) for r in found]


async def history(n: Node, sid: str) -> list[StoredMessage]:
    out: list[StoredMessage] = []
    while True:
        page = await n.history.read(sid, out[-1].seq if out else 0, 1000)
        assert page is not None and page.gap is None
        if not page.messages:
            return out
        out += page.messages


def scrubbed(m: StoredMessage) -> StoredMessage:
    """``m`` as Postgres stores it (NUL as U+FFFD)."""
    parts = decode_parts(m.parts)
    parts = None if parts is None else msgspec.json.decode(rows.json_text(parts))
    return StoredMessage(
        m.session_id, m.seq, m.sender, m.sender_id, m.kind, rows.text(m.content),
        rows.stored_metadata(m.metadata), m.client_msg_id, m.inserted_at, m.token_count,
        m.role, encode_parts(parts),
    )  # fmt: skip


def test_every_committed_message_session_and_cursor_reaches_postgres_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def main() -> None:
        async with node(tmp_path, pg_dsn, tail_messages_max=4) as n:
            sids = [f"s{i}" for i in range(6)]
            for sid in sids:
                await create(n, sid)
            weird = {"nested": {"list": [1, 2.5, None, True], "nul": "a\x00b"}, "é": "ü"}
            for k in range(30):
                for sid in sids:
                    await append(n, sid, f"m{k} of {sid}", metadata=weird if k == 3 else {})
            await append(n, "s0", "with a \x00 NUL", cmid="c1", tokens=12)
            await append(n, "s1", "from the user", sender="user", role="user")
            parts = [{"type": "text", "text": "a\x00b"}, {"type": "reasoning", "text": "hm"}]
            await append(n, "s3", "", role="assistant", parts=parts)
            await submit(n, c.MarkRead("s2", "u1", 7))
            await wait_flushed(n)
            expected = [scrubbed(m) for sid in sids for m in await history(n, sid)]
            assert len(expected) == 6 * 30 + 3
            got = await pg_messages(pg_dsn)  # (parts compared as maps: jsonb orders keys)
            assert list(map(message_to_wire, got)) == [
                message_to_wire(m) for m in sorted(expected, key=lambda m: (m.session_id, m.seq))
            ]
            sessions = await fetch(pg_dsn, "SELECT id, user_id, last_seq FROM sessions")
            assert sorted(tuple(r) for r in sessions) == sorted(
                (sid, "u1", 31 if sid in ("s0", "s1", "s3") else 30) for sid in sids
            )
            cursors = await fetch(pg_dsn, "SELECT * FROM read_cursors ORDER BY session_id")
            assert [tuple(r) for r in cursors] == [("s1", "u1", 31), ("s2", "u1", 7)]
            assert n.postgres is not None
            assert n.postgres.stats.skipped == 0 and n.postgres.stats.failures == 0
            assert n.postgres.stats.copy_fallbacks == 0  # nothing was there: the direct COPY
            # the tail held 4 per session: most rows came from the archive
            assert n.history.archive_reads > 0

    run(main())


def test_a_lost_watermark_costs_a_second_copy_not_a_duplicate(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader killed between its COMMIT and its watermark: the next flush copies the same rows
    again, and Postgres keeps one of each."""

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=60_000) as n:
            flusher = n.postgres
            assert flusher is not None
            await flusher.stop()  # flushes by hand below
            await create(n, "s")
            for k in range(20):
                await append(n, "s", f"m{k}")
            record = flusher._record

            async def lost(batch: Any) -> None:
                pass

            monkeypatch.setattr(flusher, "_record", lost)
            await flusher._connect()
            assert await flusher.flush() is False
            assert flusher.stats.messages_inserted == 20
            assert flusher.stats.copy_fallbacks == 0
            assert flusher.backlog_rows() == 20  # the watermark did not move
            monkeypatch.setattr(flusher, "_record", record)
            await append(n, "s", "one more")
            await flusher.flush()
            assert flusher.stats.messages == 20 + 21 and flusher.stats.messages_inserted == 21
            assert flusher.stats.copy_fallbacks == 1  # the direct COPY met the first 20
            assert flusher.backlog_rows() == 0
            assert [m.seq for m in await pg_messages(pg_dsn)] == list(range(1, 22))

    run(main())


@pytest.mark.parametrize("step", [None, 3], ids=["one-copy", "copies-of-3"])
def test_a_batch_meeting_rows_postgres_has_falls_back_and_ends_exact(
    tmp_path: Path, pg_dsn: str, step: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some rows of a batch already in Postgres (written by hand, as a backfill would): the
    direct COPY fails on them, the batch goes through ON CONFLICT DO NOTHING in the same
    transaction, and Postgres ends with each message once; the next batch, with nothing there,
    is copied directly again.  With ``STEP_ROWS`` 3 the batch goes in COPYs of 3 rows (and
    the reading yields every 3): the rows there are met by the fifth COPY, and what the four
    before it copied goes back with the savepoint."""
    if step is not None:
        monkeypatch.setattr(flusher_module, "STEP_ROWS", step)

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=60_000) as n:
            flusher = n.postgres
            assert flusher is not None
            await flusher.stop()  # flushes by hand below
            for sid in ("a", "b"):
                await create(n, sid)
                for k in range(10):
                    await append(n, sid, f"{sid}{k}", metadata={"k": k})
            await flusher._connect()
            there = [m for m in await history(n, "b") if 3 <= m.seq <= 5]
            async with flusher.pool.acquire() as conn:
                await conn.copy_records_to_table(
                    "messages",
                    records=map(rows.message_record, there),
                    columns=rows.MESSAGE_COLUMNS,
                )
            assert await flusher.flush() is False
            s = flusher.stats
            assert s.copy_fallbacks == 1 and s.failures == 0
            assert s.messages == 20 and s.messages_inserted == 17
            assert flusher.backlog_rows() == 0
            expected = [scrubbed(m) for sid in ("a", "b") for m in await history(n, sid)]
            assert await pg_messages(pg_dsn) == expected
            sessions = await fetch(pg_dsn, "SELECT id, last_seq FROM sessions ORDER BY id")
            assert [tuple(r) for r in sessions] == [("a", 10), ("b", 10)]

            await append(n, "a", "later")
            assert await flusher.flush() is False
            assert s.copy_fallbacks == 1 and s.messages == 21 and s.messages_inserted == 18
            assert [(m.session_id, m.seq) for m in await pg_messages(pg_dsn)] == [
                (sid, q) for sid, last in (("a", 11), ("b", 10)) for q in range(1, last + 1)
            ]

    run(main())


def test_an_outage_keeps_the_backlog_on_disk_and_drains_after(
    tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Postgres behind a proxy, cut: appends go on, the backlog grows (and retention keeps the
    rows Postgres lacks), a warning is logged; healed, the table catches up exactly."""

    async def main() -> None:
        tail = {"tail_messages_max": 3, "retention_max_messages": 5}
        async with pgdb.proxied(pg_dsn) as (proxy, proxied), node(tmp_path, proxied, **tail) as n:
            flusher = n.postgres
            assert flusher is not None
            await create(n, "s")
            await append(n, "s", "before")
            await wait_flushed(n)
            proxy.cut()
            for k in range(40):
                await append(n, "s", f"during {k}")
            await asyncio.sleep(0.5)
            assert flusher.backlog_rows() == 40
            assert flusher.stats.failures >= 1 and not flusher.stats.connected
            assert flusher.lag_seconds() > 0.3
            await n.archive.barrier()
            # retention keeps 5 per session, but not past what Postgres lacks
            kept = [m.seq for m in await n.archive.read("s", 0, 100)]
            assert [s for s in kept if s >= 2] == list(range(2, 39))
            proxy.heal()
            await wait_flushed(n, timeout=40)
            assert flusher.lag_seconds() == 0
            got = await pg_messages(pg_dsn)
            assert [m.seq for m in got] == list(range(1, 42))
            assert [m.content for m in got[1:]] == [f"during {k}" for k in range(40)]
            # drained: now retention deletes what Postgres holds
            await append(n, "s", "after")
            await n.archive.barrier()
            assert len(await n.archive.read("s", 0, 100)) <= 5
        assert any("appends go on" in r.getMessage() for r in caplog.records)

    run(main(), timeout=90)


def test_a_database_of_a_newer_ctxstore_stops_the_copy_not_the_store(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await schema.migrate(conn)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'x')")
        finally:
            await conn.close()
        async with node(tmp_path, pg_dsn) as n:
            assert n.postgres is not None
            await create(n, "s")
            assert await append(n, "s", "still works") == 1
            async with asyncio.timeout(10):
                while not n.postgres.stats.failures:
                    await asyncio.sleep(0.02)
            assert "version 99" in (n.postgres.stats.last_error or "")
            assert n.postgres.backlog_rows() == 1

    run(main())


def test_a_flush_takes_at_most_its_rows_and_bytes(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctxstore.pg import flusher as flusher_module

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=60_000, postgres_flush_rows=12) as n:
            flusher = n.postgres
            assert flusher is not None
            await flusher.stop()
            for sid in ("a", "b"):
                await create(n, sid)
                for k in range(10):
                    await append(n, sid, f"{sid}{k} " + "x" * 300)
            await flusher._connect()
            assert await flusher.flush() is True  # 12 rows: a's row and 10 messages, b's row
            assert flusher.stats.messages == 10 and flusher.backlog_rows() == 10
            monkeypatch.setattr(flusher_module, "FLUSH_BYTES_MAX", 1500)  # 4 messages or so
            assert await flusher.flush() is True
            assert 10 < flusher.stats.messages < 16
            while await flusher.flush():
                pass
            assert flusher.backlog_rows() == 0
            got = await pg_messages(pg_dsn)
            assert [(m.session_id, m.seq) for m in got] == [
                (sid, k) for sid in ("a", "b") for k in range(1, 11)
            ]

    run(main())


def test_a_black_holed_postgres_times_out_and_the_flusher_comes_back(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres stops answering (a proxy that eats every byte, connections left open): each
    flush fails on its statement timeout, appends go on; healed, the backlog drains."""
    from ctxstore.pg import flusher as flusher_module

    monkeypatch.setattr(flusher_module, "STATEMENT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(flusher_module, "TRANSACTION_TIMEOUT_S", 1.0)
    monkeypatch.setattr(flusher_module, "CONNECT_TIMEOUT_S", 1.0)

    async def main() -> None:
        async with pgdb.proxied(pg_dsn) as (proxy, proxied), node(tmp_path, proxied) as n:
            flusher = n.postgres
            assert flusher is not None
            await create(n, "s")
            await wait_flushed(n)
            proxy.blackhole()
            started = time.monotonic()
            for k in range(20):
                await append(n, "s", f"during {k}")
            assert time.monotonic() - started < 2  # appends never wait for Postgres
            async with asyncio.timeout(10):
                while flusher.stats.failures < 2:
                    await asyncio.sleep(0.05)
            assert flusher.backlog_rows() == 20
            proxy.heal()
            await wait_flushed(n, timeout=30)
            assert [m.seq for m in await pg_messages(pg_dsn)] == list(range(1, 21))

    run(main(), timeout=60)


def test_the_flush_benchmark_runs() -> None:
    """``python -m bench pg-flush`` (ctxstore/pg/bench.py), on a database of its own."""
    from bench.__main__ import main

    assert main(["pg-flush", "--rows", "2000", "--sessions", "10", "--json"]) == 0


def test_rows_a_peer_is_still_copying_here_wait_without_spinning(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages below the hot tail in a backfill range (a peer's copy to this node under way)
    are waited for: the flusher copies what it can, goes back to its interval (not a tight
    loop), counts the lag, and takes them once the range is filled."""

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=100, tail_messages_max=3) as n:
            flusher = n.postgres
            assert flusher is not None
            await flusher.stop()  # until the range is in place
            await create(n, "s")
            for k in range(10):
                await append(n, "s", f"m{k}")
            await n.archive.barrier()
            g = group_of("s", GROUPS)
            copying = [(g, "s", 1, 7)]
            monkeypatch.setattr(n.archive, "backfill_ranges", lambda sid=None: copying)
            flusher.start()
            await asyncio.sleep(1.0)
            assert flusher.stats.flushes < 20  # ~10 intervals, not a spin
            assert flusher.backlog_rows() == 10 and flusher.lag_seconds() > 0.5
            assert await pg_messages(pg_dsn) == []
            copying.clear()
            await wait_flushed(n)
            assert [m.seq for m in await pg_messages(pg_dsn)] == list(range(1, 11))

    run(main())


def test_a_flush_starts_early_when_flush_rows_messages_wait(tmp_path: Path, pg_dsn: str) -> None:
    """With a 60 s interval, 9 messages wait for it; the 10th (``postgres_flush_rows``) starts
    a flush at once."""

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=60_000, postgres_flush_rows=10) as n:
            flusher = n.postgres
            assert flusher is not None
            async with asyncio.timeout(10):  # connected: the first flush is done
                while not flusher.stats.connected:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            await create(n, "s")
            for k in range(9):
                await append(n, "s", f"m{k}")
            await asyncio.sleep(1.0)
            assert await pg_messages(pg_dsn) == [] and flusher.backlog_rows() == 9
            await append(n, "s", "m9")
            async with asyncio.timeout(5):
                while flusher.backlog_rows():
                    await asyncio.sleep(0.02)
            assert [m.seq for m in await pg_messages(pg_dsn)] == list(range(1, 11))

    run(main())


def test_rows_timestamps_round_trip_exactly_through_postgres(pg_dsn: str) -> None:
    """A connection with ``rows.use_millis`` writes ms-since-the-epoch ints as ``timestamptz``
    (by COPY, as the flusher does); they read back as the same ints through
    ``MESSAGE_SELECT`` (no codec) and as the same instants through a plain connection."""
    import datetime as dt

    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    values = (0, 1, -1, 999, 1_700_000_000_123, 253_402_300_799_999, -62_135_596_800_000)

    async def main() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await schema.migrate(conn)
            await rows.use_millis(conn)
            records = [
                rows.message_record(
                    StoredMessage(
                        "s", k, "user", "u", "text", "x", {}, None, ms, None, None, NO_PARTS
                    )
                )
                for k, ms in enumerate(values, 1)
            ]
            await conn.copy_records_to_table(
                "messages", records=records, columns=rows.MESSAGE_COLUMNS
            )
            assert [
                r[0] for r in await conn.fetch("SELECT inserted_at FROM messages ORDER BY seq")
            ] == list(values)
        finally:
            await conn.close()
        back = await pg_messages(pg_dsn)
        assert [m.inserted_at for m in back] == list(values)
        plain = await fetch(pg_dsn, "SELECT inserted_at FROM messages ORDER BY seq")
        assert [r[0] for r in plain] == [epoch + dt.timedelta(milliseconds=ms) for ms in values]

    run(main())


def test_a_follower_s_messages_do_not_start_a_flush() -> None:
    """``on_message`` counts toward ``flush_rows`` only the messages of groups this node
    leads: with 3 replicas, counting every group's would start a transaction each time a
    third of ``flush_rows`` of its own waited."""
    from types import SimpleNamespace

    from ctxstore.pg.flusher import Flusher, PostgresConfig

    led = {0, 2}
    driver = SimpleNamespace(leader=lambda g: 7 if g in led else 8)
    config = PostgresConfig("postgresql://unused", flush_rows=3)
    f = Flusher(7, None, None, driver, config)  # type: ignore[arg-type]
    for g in (1, 1, 1, 3, 0, 1, 2):
        f.on_message(g)
    assert not f._wake.is_set()
    f.on_message(0)
    assert f._wake.is_set()


def test_empty_metadata_is_the_json_of_an_empty_object() -> None:
    """A message without metadata gets the JSON of an empty object; a NUL in it is replaced."""
    bare = StoredMessage("s", 1, "user", "u", "text", "x", {}, None, 5, None, "user", NO_PARTS)
    assert rows.message_record(bare)[6] == "{}" == rows.json_text({})
    meta = StoredMessage(
        "s", 1, "user", "u", "text", "x", {"a": "\x00"}, None, 5, None, None, NO_PARTS
    )
    assert msgspec.json.decode(rows.message_record(meta)[6]) == {"a": "\ufffd"}


def test_metadata_without_a_json_form_still_flushes() -> None:
    """A message stored before the boundary refused them (wire/framing.py ``value_fault``) may
    hold a non-string key or a msgpack extension: its row gets JSON with stand-ins (the web's),
    so the flush never stalls on it."""
    odd = {"k": {(1, 2): "\x00", None: 1, 3: 4}, "e": msgspec.msgpack.Ext(5, b"xy")}
    message = StoredMessage("s", 1, "user", "u", "text", "x", odd, None, 5, None, None, NO_PARTS)
    assert msgspec.json.decode(rows.message_record(message)[6]) == {
        "k": {"(1, 2)": "\ufffd", "None": 1, "3": 4},
        "e": {"msgpack_ext": 5, "data": "eHk="},
    }


def test_a_graceful_stop_flushes_what_waits_first(tmp_path: Path, pg_dsn: str) -> None:
    """A node stopped between two flushes copies what it leads before it stops (a cluster
    stopped as a whole leaves Postgres current), not at its next start."""

    async def main() -> None:
        async with node(tmp_path, pg_dsn, interval_ms=600_000) as n:
            await create(n, "s")
            assert n.postgres is not None
            assert await n.postgres.wait_pool(10) is not None  # connected and migrated
            for k in range(20):
                await append(n, "s", f"m{k}")
            await asyncio.sleep(0.2)
            assert await count() == 0
        assert await count() == 20

    async def count() -> int:
        return int((await fetch(pg_dsn, "SELECT count(*) FROM messages"))[0][0])

    run(main())
