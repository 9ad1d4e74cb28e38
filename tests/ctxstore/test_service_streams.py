"""Subscriptions and inboxes inside one in-process node (``Service`` + ``Subscriptions`` +
``Inboxes``): the bounds and the refusals that the end-to-end tests cannot reach quickly."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from wire.client import ClientError, connect
from wire.framing import ClientConnection, PushReceived, ResponseReceived
from wire.protocol import (
    PROTOCOL_VERSION,
    Hello,
    Subscribe,
    Subscribed,
    SubscriptionClosed,
)

from .test_ops import run, single_node


def test_a_subscriber_that_does_not_read_is_dropped_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            assert await h.node.wait_leaders(10)
            subs = h.node.subscriptions
            subs.limits = replace(subs.limits, slow_timeout_s=0.5, backlog_bytes_high=256 * 1024)
            async with await connect(h.target) as c:
                await c.create_session("u", "a", {}, "big")
                # A raw client that subscribes and then never reads its socket.
                reader, writer = await asyncio.open_connection(*h.clients.address)
                core = ClientConnection()
                core.send(Hello(1, PROTOCOL_VERSION, "sleepy", None))
                core.send(Subscribe(2, "big", 0))
                writer.write(core.data_to_send())
                await writer.drain()
                subscribed = False
                while not subscribed:
                    core.receive_data(await asyncio.wait_for(reader.read(65536), 5))
                    while (e := core.next_event()) is not None:
                        assert isinstance(e, ResponseReceived), e
                        subscribed |= isinstance(e.response, Subscribed)
                body = "x" * 60_000
                await asyncio.gather(*(c.append("big", body) for _ in range(300)))  # ~18 MB
                # Dropped once over the high mark for slow_timeout_s (0.5 s): within ~1 s on
                # a quiet box; a loaded one (the whole suite on two cores) may take longer.
                deadline = asyncio.get_running_loop().time() + 10
                while subs.dropped_slow == 0 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.1)
                assert subs.dropped_slow == 1
                assert subs.count == 0
                # What waits for the sleeper: at most the high mark plus one page and the
                # socket buffers, not the 18 MB of history.
                assert sum(x.backlog_bytes for x in h.clients.connections) < 1536 * 1024
                # It reads at last: its messages, then the close, in order.
                seqs: list[int] = []
                closed = None
                while closed is None:
                    data = await asyncio.wait_for(reader.read(1 << 20), 5)
                    assert data
                    core.receive_data(data)
                    while (e := core.next_event()) is not None:
                        assert isinstance(e, PushReceived), e
                        if isinstance(e.push, SubscriptionClosed):
                            closed = e.push
                        else:
                            seqs += [m.seq for m in e.push.messages]  # type: ignore[union-attr]
                assert closed.reason == "slow_consumer"
                assert seqs == list(range(1, len(seqs) + 1))
                writer.close()

    run(main())


def test_subscribe_refusals(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            assert await h.node.wait_leaders(10)
            async with await connect(h.target) as c:
                await c.create_session("u", "a", {}, "s")
                await c.append("s", "one")
                with pytest.raises(ClientError) as e:
                    await c.subscribe("missing")
                assert e.value.code == "not_found"
                with pytest.raises(ClientError) as e:
                    await c.subscribe("s", 5)
                assert (e.value.code, e.value.details["last_seq"]) == ("bad_request", 1)
                subs = h.node.subscriptions
                subs.limits = replace(subs.limits, per_connection_max=2)
                a = await c.subscribe("s", 1)
                b = await c.subscribe("s", 1)
                with pytest.raises(ClientError) as e:
                    await c.subscribe("s", 1)
                assert e.value.code == "bad_request"
                await a.close()
                assert subs.count == 1
                again = await c.subscribe("s", 0)
                assert (await anext(aiter(again))).seq == 1  # type: ignore[union-attr]
                await b.close()
                await again.close()
                with pytest.raises(ClientError) as e:
                    await c.unsubscribe(12345)
                assert e.value.code == "not_found"
            await asyncio.sleep(0.05)
            assert subs.count == 0 and h.node.inboxes.count == 0

    run(main())


def test_stream_and_archive_metrics(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            assert await h.node.wait_leaders(10)
            async with await connect(h.target) as c:
                await c.create_session("u", "a", {}, "m")
                for i in range(5):
                    await c.append("m", f"m{i}")
                sub = await c.subscribe("m", 0)
                inbox = await c.subscribe_inbox("u")
                got = [await anext(aiter(sub)) for _ in range(5)]
                assert [m.seq for m in got] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
                await h.node.archive.barrier()
                m = await h.scrape()
                assert m["ctxstore_subscriptions"] == 1
                assert m["ctxstore_inbox_subscribers"] == 1
                assert m["ctxstore_subscription_messages_total"] == 5
                # Still in the hot tail (and the WAL): nothing for the archive to write yet.
                assert m["ctxstore_archive_rows_written_total"] == 0
                assert m["ctxstore_archive_lag_entries"] == 0
                assert m["ctxstore_archive_backlog_bytes"] == 0
                assert m["ctxstore_archive_backfill_ranges"] == 0
                assert m["ctxstore_archive_backfill_fetch_failures_total"] == 0
                # The replay came from the hot tail: no page needed the archive.
                assert m["ctxstore_history_archive_reads_total"] == 0
                assert m["ctxstore_history_archive_waits_total"] == 0
                await sub.close()
                await inbox.close()
            m = await h.scrape()
            assert m["ctxstore_subscriptions"] == 0 and m["ctxstore_inbox_subscribers"] == 0

    run(main())
