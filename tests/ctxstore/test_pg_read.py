"""Reads served from Postgres (``postgres_serve_history``) on one in-process node and a real
PostgreSQL (a database of each test's own): once the archive's retention (20 messages a
session, 5-message hot tails) deleted what Postgres holds, a ``read`` from seq 1 and a
subscription from seq 0 get every acknowledged message exactly once; without the option the
same read skips the deleted range (a gap) as before; Postgres unreachable: ``unavailable``
within the request's deadline, and the subscription waits rather than skipping."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ctxstore.node import Node
from wire.client import Client, ClientError, connect
from wire.protocol import GapEvent, Message

from . import pgdb
from .test_ops import run, single_node
from .test_pg_flusher import wait_flushed

RETAINED = 20
COUNT = 150


def settings(dsn: str, serve: bool, **kw: Any) -> dict[str, Any]:
    return {
        "postgres_dsn": dsn,
        "postgres_serve_history": serve,
        "postgres_flush_interval_ms": 50,
        "tail_messages_max": 5,
        "retention_max_messages": RETAINED,
        **kw,
    }


async def load(n: Node, c: Client) -> dict[int, tuple[str, dict[str, Any], int]]:
    """COUNT messages, flushed to Postgres, then pruned from the archive: seq -> (content,
    metadata, inserted_at) as acknowledged."""
    assert await n.wait_leaders(10)
    await c.create_session("alice", "bot", {}, "s")
    acks: dict[int, tuple[str, dict[str, Any], int]] = {}
    for i in range(COUNT):
        content, metadata = f"message {i} \u00e9\u2603", {"i": i, "tag": ["x", i % 3]}
        done = await c.append("s", content, metadata=metadata, client_msg_id=f"m{i}")
        acks[done.seq] = (content, metadata, done.inserted_at)
    assert sorted(acks) == list(range(1, COUNT + 1))
    await wait_flushed(n)
    # retention runs when a session is written: one more batch after the flush
    content = "last"
    done = await c.append("s", content, client_msg_id="last")
    acks[done.seq] = (content, {}, done.inserted_at)
    await wait_flushed(n)
    async with asyncio.timeout(10):
        while True:
            await n.archive.barrier()
            kept = [m.seq for m in await n.archive.read("s", 0, 1000)]
            if kept and kept[0] > COUNT - RETAINED - 10:
                break
            await asyncio.sleep(0.05)
    assert n.archive.stats.rows_deleted_by_retention >= COUNT - RETAINED - 10
    tail = n.state.read("s", 0, 1000)
    assert tail is not None and tail.first_seq > COUNT - 5
    return acks


def check(got: list[Message], acks: dict[int, tuple[str, dict[str, Any], int]]) -> None:
    assert [m.seq for m in got] == sorted(acks)  # every one, once, in order
    for m in got:
        content, metadata, inserted_at = acks[m.seq]
        assert (m.session_id, m.sender, m.content, m.metadata) == ("s", "user", content, metadata)
        assert (m.inserted_at, m.client_msg_id) == (
            inserted_at,
            "last" if m.seq > COUNT else f"m{m.seq - 1}",
        )
        assert m.role == "user" and m.parts is None


async def read_all(c: Client, limit: int) -> tuple[list[Message], list[int]]:
    """Every message from seq 1, ``limit`` at a time; and where each page started."""
    got: list[Message] = []
    starts: list[int] = []
    while True:
        page = await c.read("s", got[-1].seq if got else 0, limit)
        if not page.messages:
            return got, starts
        starts.append(page.messages[0].seq)
        got += page.messages


async def replay(c: Client, after_seq: int, last_seq: int) -> list[Message | GapEvent]:
    items: list[Message | GapEvent] = []
    async with asyncio.timeout(20), c.subscribe("s", after_seq) as sub:
        async for item in sub:
            assert isinstance(item, Message | GapEvent)
            items.append(item)
            if (item.seq if isinstance(item, Message) else item.to_seq) >= last_seq:
                return items
    raise AssertionError("the subscription ended")


def test_pruned_history_is_read_and_replayed_from_postgres(tmp_path: Path, pg_dsn: str) -> None:
    async def main() -> None:
        async with single_node(tmp_path, **settings(pg_dsn, True)) as h:
            n = h.node
            async with await connect(h.target) as c:
                acks = await load(n, c)
                last = max(acks)
                for limit in (1000, 7):  # one page of a read (the archive and the tail too)
                    got, starts = await read_all(c, limit)
                    check(got, acks)
                assert starts[:3] == [1, 8, 15]  # pages of 7 from Postgres
                items = await replay(c, 0, last)
                assert not [i for i in items if isinstance(i, GapEvent)]
                check([i for i in items if isinstance(i, Message)], acks)
                # many at once: they queue for the readers' connection, all within the deadline
                pages = await asyncio.gather(*(c.read("s", 0, 1000) for _ in range(20)))
                for page in pages:
                    check(page.messages, acks)
                # from the middle of the pruned range too
                got = (await c.read("s", 60, 5)).messages
                assert [m.seq for m in got] == [61, 62, 63, 64, 65]
            history = n.postgres_history
            assert history is not None
            assert history.reads > 0 and history.read_rows >= 2 * (COUNT - RETAINED)
            assert history.read_failures == 0
            metrics = await h.scrape()
            assert metrics["ctxstore_postgres_history_reads_total"] == history.reads
            assert metrics["ctxstore_postgres_history_read_failures_total"] == 0

    run(main(), timeout_s=90)


def test_without_the_option_the_pruned_range_is_a_gap(tmp_path: Path, pg_dsn: str) -> None:
    async def main() -> None:
        async with single_node(tmp_path, **settings(pg_dsn, False)) as h:
            async with await connect(h.target) as c:
                acks = await load(h.node, c)
                last = max(acks)
                page = await c.read("s", 0, 1000)
                first = last - RETAINED + 1  # retention hides everything older
                assert [m.seq for m in page.messages] == list(range(first, last + 1))
                items = await replay(c, 0, last)
                assert isinstance(items[0], GapEvent)
                assert (items[0].from_seq, items[0].to_seq, items[0].reason) == (
                    1,
                    first - 1,
                    "retention",
                )
                assert [i.seq for i in items[1:] if isinstance(i, Message)] == list(
                    range(first, last + 1)
                )
            assert h.node.postgres_history is None

    run(main(), timeout_s=90)


def test_postgres_unreachable_answers_unavailable_within_the_deadline(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Black-holed (connections open, no byte through): a read of the pruned range answers
    ``unavailable`` before the request's deadline; a subscription from seq 0 waits, no gap;
    healed, both get everything.  Refused (connections aborted): ``unavailable`` at once."""

    async def main() -> None:
        async with pgdb.proxied(pg_dsn) as (proxy, proxied):
            config = settings(proxied, True, request_timeout_s=2.0)
            async with single_node(tmp_path, **config) as h:
                n = h.node
                history = n.postgres_history
                assert history is not None and history.read_timeout_s == 1.0
                async with await connect(h.target) as c:
                    acks = await load(n, c)
                    last = max(acks)
                    # the tail is still served without Postgres
                    proxy.blackhole()
                    assert (await c.read("s", last - 1, 10)).messages[0].seq == last
                    started = time.monotonic()
                    with pytest.raises(ClientError) as e:
                        await c.read("s", 0, 100)
                    assert e.value.code == "unavailable" and e.value.retryable
                    assert 0.9 < time.monotonic() - started < 2.0
                    assert history.read_failures == 1
                    sub = asyncio.ensure_future(replay(c, 0, last))
                    await asyncio.sleep(1.5)
                    assert not sub.done()  # waiting: no gap, no message out of order
                    proxy.heal()
                    items = await sub
                    assert not [i for i in items if isinstance(i, GapEvent)]
                    check([i for i in items if isinstance(i, Message)], acks)
                    proxy.cut()
                    failures = history.read_failures
                    started = time.monotonic()
                    with pytest.raises(ClientError) as e:
                        await c.read("s", 0, 100)
                    assert e.value.code == "unavailable"
                    assert time.monotonic() - started < 2.0
                    assert history.read_failures > failures
                    proxy.heal()
                    async with asyncio.timeout(10):
                        while True:
                            try:
                                got, _ = await read_all(c, 1000)
                                break
                            except ClientError as again:
                                assert again.code == "unavailable"
                                await asyncio.sleep(0.1)
                    check(got, acks)
                metrics = await h.scrape()
                assert metrics["ctxstore_postgres_history_read_failures_total"] >= 2

    run(main(), timeout_s=120)
