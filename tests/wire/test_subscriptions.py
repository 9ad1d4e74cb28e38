"""Subscriptions end to end: ``wire.client``'s ``Subscription`` and ``InboxSubscription`` against
``wire.aio`` servers on 127.0.0.1, driven by ``FeedHandler``, a tiny in-memory subscription
manager (replay in batches while the connection is writable, then live pushes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from msgspec.structs import replace

from wire.aio import Connection, Reply, Server, serve
from wire.client import Client, Subscription, connect
from wire.errors import ClientError
from wire.protocol import (
    Append,
    Appended,
    GapEvent,
    InboxDelta,
    InboxEntry,
    InboxSnapshot,
    Message,
    MessageEvent,
    Request,
    Response,
    Session,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    SubscriptionClosed,
    Unsubscribe,
    Unsubscribed,
    error,
)
from wire.subscription import TRANSITIONS, FollowerState

from .helpers import LOOP_IDS, LOOPS, StoreHandler, run, wait_until

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
FAST: dict[str, Any] = {"backoff_min_s": 0.01, "backoff_max_s": 0.05, "connect_timeout_s": 1.0}


class Feed:
    """One subscription on the server side."""

    def __init__(self, conn: Connection, sub_id: int, key: str, next_seq: int) -> None:
        self.conn = conn
        self.sub_id = sub_id
        self.key = key  # a session id, or a user id for an inbox
        self.next_seq = next_seq


class FeedHandler(StoreHandler):
    """``StoreHandler`` plus subscriptions.  A session feed replays the log from ``after_seq``
    in MessageEvents of ``batch`` messages while the connection is writable (``on_writable``
    goes on), then pushes each append live; seqs up to ``gap_upto`` are reported as a retention
    gap.  An inbox feed gets a snapshot, then a delta per append."""

    def __init__(self, batch: int = 16) -> None:
        super().__init__()
        self.batch = batch
        self.feeds: dict[tuple[Connection, int], Feed] = {}
        self.inboxes: dict[tuple[Connection, int], Feed] = {}
        self.last_sub_id = 0
        self.gap_upto = 0
        self.writable_calls = 0
        self.subscribed_delay_s = 0.0

    def on_request(self, conn: Connection, request: Request) -> Reply:
        match request:
            case Subscribe(rid, session_id, after_seq):
                self.seen.append(request)
                if session_id not in self.messages:
                    return error(rid, "not_found", f"no session {session_id}")
                feed = Feed(conn, self.new_sub_id(), session_id, after_seq + 1)
                answer = Subscribed(rid, feed.sub_id, len(self.messages[session_id]))
                if self.subscribed_delay_s:
                    asyncio.get_running_loop().call_later(
                        self.subscribed_delay_s, self.start, feed, answer
                    )
                else:
                    self.start(feed, answer)
                return None
            case Unsubscribe(rid, sub_id):
                self.seen.append(request)
                found = self.feeds.pop((conn, sub_id), None) or self.inboxes.pop(
                    (conn, sub_id), None
                )
                if found is None:
                    return error(rid, "not_found", f"no subscription {sub_id}")
                return Unsubscribed(rid, sub_id)
            case SubscribeInbox(rid, user_id):
                self.seen.append(request)
                feed = Feed(conn, self.new_sub_id(), user_id, 0)
                entries = [self.entry(s) for s in sorted(self.sessions)]
                snapshot = [e for e in entries if self.sessions[e.session_id].user_id == user_id]
                conn.reply(InboxSnapshot(rid, feed.sub_id, snapshot, False))
                self.inboxes[conn, feed.sub_id] = feed
                return None
        return super().on_request(conn, request)

    def new_sub_id(self) -> int:
        self.last_sub_id += 1
        return self.last_sub_id

    def start(self, feed: Feed, answer: Subscribed) -> None:
        if feed.conn.closed:
            return
        feed.conn.reply(answer)  # before the first push
        self.feeds[feed.conn, feed.sub_id] = feed
        self.pump(feed)

    def pump(self, feed: Feed) -> None:
        conn = feed.conn
        log = self.messages[feed.key]
        while conn.writable and feed.next_seq <= len(log) and self.feeds.get((conn, feed.sub_id)):
            if feed.next_seq <= self.gap_upto:
                conn.push(GapEvent(feed.sub_id, feed.next_seq, self.gap_upto, "retention"))
                feed.next_seq = self.gap_upto + 1
                continue
            batch = log[feed.next_seq - 1 : feed.next_seq - 1 + self.batch]
            conn.push(MessageEvent(feed.sub_id, batch))
            feed.next_seq += len(batch)

    def append(self, r: Append) -> Response:
        answer = super().append(r)
        if type(answer) is Appended and not answer.deduped:
            for feed in list(self.feeds.values()):
                if feed.key == r.session_id:
                    self.pump(feed)
            user_id = self.sessions[r.session_id].user_id if r.session_id in self.sessions else ""
            for feed in list(self.inboxes.values()):
                if feed.key == user_id:
                    feed.conn.push(InboxDelta(feed.sub_id, [self.entry(r.session_id)]))
        return answer

    def entry(self, session_id: str) -> InboxEntry:
        log = self.messages.get(session_id, [])
        agent_id = self.sessions[session_id].agent_id
        if not log:
            return InboxEntry(session_id, agent_id, 0, 0, 1, None, None, "")
        last = log[-1]
        return InboxEntry(
            session_id, agent_id, last.seq, last.seq, 2, last.sender, last.sender_id, last.content
        )

    def on_writable(self, conn: Connection) -> None:
        self.writable_calls += 1
        for feed in [f for (c, _), f in self.feeds.items() if c is conn]:
            self.pump(feed)

    def on_close(self, conn: Connection) -> None:
        super().on_close(conn)
        for key in [k for k in self.feeds if k[0] is conn]:
            del self.feeds[key]
        for key in [k for k in self.inboxes if k[0] is conn]:
            del self.inboxes[key]

    def fill(self, session_id: str, count: int, content: str = "m") -> None:
        """A session of ``count`` messages (created if needed), without pushes."""
        self.sessions.setdefault(session_id, self.new_session(session_id))
        log = self.messages.setdefault(session_id, [])
        for _ in range(count):
            seq = len(log) + 1
            log.append(Message(session_id, seq, "user", "u", "text", content, {}, None, 2, None))

    def new_session(self, session_id: str) -> Session:
        return Session(session_id, "u", "a", 1, {}, 0)

    def feed(self) -> Feed:
        """The only feed."""
        [feed] = self.feeds.values()
        return feed

    def subscribes(self) -> list[Subscribe]:
        return [r for r in self.seen if isinstance(r, Subscribe)]


def target(server: Server) -> str:
    host, port = server.address
    return f"{host}:{port}"


async def feed_and_client(**kw: Any) -> tuple[Client, Server, FeedHandler]:
    handler = FeedHandler()
    server = await serve(handler)
    return await connect(target(server), **{**FAST, **kw}), server, handler


async def take(sub: Subscription, n: int) -> list[Message | GapEvent]:
    return [await anext(sub) for _ in range(n)]


def seqs(items: list[Message | GapEvent]) -> list[int]:
    return [m.seq if isinstance(m, Message) else -m.to_seq for m in items]


# -- ordering and multiplexing ---------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_a_subscription_replays_then_follows_live_appends_in_order(loop: LoopFactory) -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 50)
            sub = await client.subscribe("s-1", after_seq=10)
            assert sub.sub_id is not None and sub.sub_id >= 1 and sub.start_last_seq == 50
            assert seqs(await take(sub, 40)) == list(range(11, 51))
            assert sub.last_seq == 50
            for i in range(10):
                await client.append("s-1", f"live {i}")
            live = await take(sub, 10)
            assert seqs(live) == list(range(51, 61))
            assert [m.content for m in live if isinstance(m, Message)][-1] == "live 9"
            await sub.close()
            with pytest.raises(StopAsyncIteration):
                await anext(sub)

    run(main, loop)


def test_every_way_to_start_a_subscription() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 3)
            async with client.subscribe("s-1") as sub:  # async with: subscribed on entry
                assert sub.sub_id is not None and len(handler.feeds) == 1
                assert seqs(await take(sub, 3)) == [1, 2, 3]
            assert handler.feeds == {}  # unsubscribed on exit
            lazy = client.subscribe("s-1", 1)  # async for: the first step subscribes
            assert lazy.sub_id is None
            items = []
            async for item in lazy:
                items.append(item)
                if len(items) == 2:
                    break
            assert seqs(items) == [2, 3]
            await lazy.close()

    run(main)


def test_a_retention_gap_is_yielded_in_order() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 30)
            handler.gap_upto = 20
            async with client.subscribe("s-1", 5) as sub:
                [gap, *rest] = await take(sub, 11)
                assert gap == GapEvent(sub.sub_id or 0, 6, 20, "retention")
                assert seqs(rest) == list(range(21, 31)) and sub.last_seq == 30

    run(main)


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_many_subscriptions_share_one_connection(loop: LoopFactory) -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            sessions = [f"s-{i}" for i in range(20)]
            for i, sid in enumerate(sessions):
                handler.fill(sid, i)  # s-i has i messages already
            subs = [await client.subscribe(sid) for sid in sessions]
            assert len({s.sub_id for s in subs}) == 20 and len(server.connections) == 1
            for round_ in range(5):  # live appends interleaved across the sessions
                await asyncio.gather(*(client.append(sid, f"r{round_}") for sid in sessions))
            for i, sub in enumerate(subs):
                items = await take(sub, i + 5)
                assert seqs(items) == list(range(1, i + 6))
                assert all(m.session_id == sessions[i] for m in items if isinstance(m, Message))
            await asyncio.gather(*(s.close() for s in subs))
            assert handler.feeds == {} and client.pushes_dropped == 0

    run(main, loop)


# -- unsubscribing ---------------------------------------------------------------------------------


def test_close_unsubscribes_and_later_pushes_are_dropped_and_counted() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 2)
            sub = await client.subscribe("s-1")
            feed = handler.feed()
            await sub.close()
            assert handler.feeds == {}
            assert [type(r) for r in handler.seen[-2:]] == [Subscribe, Unsubscribe]
            with pytest.raises(StopAsyncIteration):
                await anext(sub)
            feed.conn.push(MessageEvent(feed.sub_id, []))  # one already on its way
            await wait_until(lambda: client.pushes_dropped == 1)
            await sub.close()  # twice: a no-op

    run(main)


def test_the_low_level_unsubscribe_ends_the_iterator() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 1)
            sub = await client.subscribe("s-1")
            assert sub.sub_id is not None
            answer = await client.unsubscribe(sub.sub_id)
            assert answer == Unsubscribed(answer.rid, sub.sub_id) and handler.feeds == {}
            with pytest.raises(StopAsyncIteration):
                await anext(sub)
            with pytest.raises(ClientError) as info:
                await client.unsubscribe(sub.sub_id)  # the server knows it no more
            assert info.value.code == "not_found"

    run(main)


def test_a_subscribed_answer_after_the_timeout_is_unsubscribed() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client(timeout_s=0.1)
        async with client, server:
            handler.fill("s-1", 1)
            handler.subscribed_delay_s = 0.3
            sub = await client.subscribe("s-1")  # timed out: retryable, so a loss to resume
            await wait_until(lambda: any(isinstance(r, Unsubscribe) for r in handler.seen))
            await wait_until(lambda: handler.feeds == {})
            handler.subscribed_delay_s = 0
            assert seqs(await take(sub, 1)) == [1]
            assert sub.resumes == 1

    run(main)


# -- the order check -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ("duplicate", "expected seq 4, got message 3"),
        ("skip", "expected seq 4, got message 5"),
        ("gap", "expected seq 4, got gap 5..6"),
        ("backwards_gap", "expected seq 4, got gap 4..3"),
    ],
)
def test_an_out_of_order_item_raises_loudly(bad: str, what: str) -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 3)
            sub = await client.subscribe("s-1")
            assert seqs(await take(sub, 3)) == [1, 2, 3]
            feed = handler.feed()
            log = handler.messages["s-1"]
            wrongs: dict[str, MessageEvent | GapEvent] = {
                "duplicate": MessageEvent(feed.sub_id, [log[2]]),
                "skip": MessageEvent(feed.sub_id, [replace(log[2], seq=5)]),
                "gap": GapEvent(feed.sub_id, 5, 6, "retention"),
                "backwards_gap": GapEvent(feed.sub_id, 4, 3, "unavailable"),
            }
            feed.conn.push(wrongs[bad])
            with pytest.raises(ClientError) as info:
                await anext(sub)
            assert info.value.code == "internal" and not info.value.retryable
            assert f"subscription out of order: {what}" in info.value.message
            with pytest.raises(ClientError):
                await anext(sub)  # sticky
            await wait_until(lambda: handler.feeds == {})  # it unsubscribed

    run(main)


# -- resuming --------------------------------------------------------------------------------------


# -- the state table -------------------------------------------------------------------------------


def test_every_follower_state_is_reached_and_every_one_can_end() -> None:
    S = FollowerState
    reached, todo = {S.IDLE}, [S.IDLE]
    while todo:
        for after in TRANSITIONS[todo.pop()] - reached:
            reached.add(after)
            todo.append(after)
    assert reached == set(S)
    assert all(S.CLOSED in TRANSITIONS[s] for s in S if s is not S.CLOSED)
    assert TRANSITIONS[S.CLOSED] == frozenset()


def test_a_follower_walks_its_states_as_it_subscribes_holds_is_lost_and_resumes() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            S = FollowerState
            handler.batch = 2
            handler.fill("s-1", 40)
            sub = client.subscribe("s-1", queue_max=8)
            assert sub.state is S.IDLE
            started = asyncio.ensure_future(sub.__aenter__())
            await asyncio.sleep(0)
            assert sub.state is S.SUBSCRIBING
            await started
            await wait_until(lambda: sub.state is S.HOLDING)  # 8 of 40 queued: reading paused
            assert seqs(await take(sub, 6)) == list(range(1, 7))
            assert sub.state is S.LIVE  # drained below half: reading again
            assert seqs(await take(sub, 34)) == list(range(7, 41))
            feed = handler.feeds.pop((handler.feed().conn, handler.feed().sub_id))
            feed.conn.push(SubscriptionClosed(feed.sub_id, "slow_consumer", ""))
            await wait_until(lambda: sub.state is S.LOST)
            await client.append("s-1", "live")
            assert seqs(await take(sub, 1)) == [41]  # resumed after 40
            assert sub.state is S.LIVE and sub.resumes == 1
            await sub.close()
            assert sub.state is S.CLOSED
            with pytest.raises(StopAsyncIteration):
                await anext(sub)

    run(main)


def test_a_subscribe_cancelled_after_its_answer_came_stays_subscribed_once() -> None:
    """The caller's task is cancelled between the ``Subscribed`` and its own wake-up: the
    subscription is registered, so the next read must not subscribe a second time (which
    would deliver every push twice)."""

    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 3)
            sub = client.subscribe("s-1")
            started = asyncio.ensure_future(sub.__aenter__())
            subscribed = sub.subscribed

            def then_cancel(conn: Any, response: Any) -> None:
                subscribed(conn, response)
                started.cancel()

            sub.subscribed = then_cancel  # type: ignore[method-assign]
            with pytest.raises(asyncio.CancelledError):
                await started
            assert sub.state is FollowerState.LIVE
            await client.append("s-1", "live")
            assert seqs(await take(sub, 4)) == [1, 2, 3, 4]
            assert len(handler.subscribes()) == 1

    run(main)


def two_servers_one_store() -> tuple[FeedHandler, FeedHandler]:
    first, second = FeedHandler(), FeedHandler()
    second.sessions, second.messages = first.sessions, first.messages  # one replicated store
    return first, second


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_a_subscription_resumes_on_the_next_target_after_the_connection_dies(
    loop: LoopFactory,
) -> None:
    async def main() -> None:
        first_handler, second_handler = two_servers_one_store()
        first_handler.fill("s-1", 100)
        first = await serve(first_handler)
        second = await serve(second_handler)
        client = await connect([target(first), target(second)], **FAST)
        async with client, first, second:
            sub = await client.subscribe("s-1")
            assert seqs(await take(sub, 30)) == list(range(1, 31))
            await wait_until(lambda: len(sub._queue) == 70)  # the rest is queued here
            [conn] = first.connections
            assert conn._transport is not None
            conn._transport.abort()  # the server side dies
            await wait_until(lambda: client.target is None)
            assert len(sub._queue) == 0  # dropped: they come again after the last seq yielded
            rest = await take(sub, 70)  # dropped the queue, resumed after 30 elsewhere
            assert seqs(rest) == list(range(31, 101))
            assert sub.resumes == 1 and client.target == second.address
            assert [r.after_seq for r in second_handler.subscribes()] == [30]
            await client.append("s-1", "live")  # and it follows live appends there
            assert seqs(await take(sub, 1)) == [101]

    run(main, loop)


def test_subscription_closed_slow_consumer_resumes_from_the_last_seq_yielded() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 100)
            sub = await client.subscribe("s-1")
            assert seqs(await take(sub, 5)) == [1, 2, 3, 4, 5]
            await wait_until(lambda: len(sub._queue) == 95)
            feed = handler.feeds.pop((handler.feed().conn, handler.feed().sub_id))
            feed.conn.push(SubscriptionClosed(feed.sub_id, "slow_consumer", "100 behind"))
            await wait_until(lambda: not sub._queue)  # what was queued is dropped
            assert seqs(await take(sub, 95)) == list(range(6, 101))
            assert sub.resumes == 1 and len(server.connections) == 1  # the same connection
            assert [r.after_seq for r in handler.subscribes()] == [0, 5]
            assert sub.sub_id != feed.sub_id

    run(main)


@pytest.mark.parametrize("reason", ["shutdown", "unavailable"])
def test_other_closing_reasons_resume_too(reason: Any) -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 3)
            sub = await client.subscribe("s-1")
            assert seqs(await take(sub, 3)) == [1, 2, 3]
            feed = handler.feeds.pop((handler.feed().conn, handler.feed().sub_id))
            feed.conn.push(SubscriptionClosed(feed.sub_id, reason, ""))
            await client.append("s-1", "after")
            assert seqs(await take(sub, 1)) == [4] and sub.resumes == 1

    run(main)


def test_not_found_raises_at_subscribe_and_when_the_server_closes_it() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            with pytest.raises(ClientError) as info:
                await client.subscribe("nope")
            assert (info.value.code, info.value.retryable) == ("not_found", False)
            with pytest.raises(ClientError) as info:
                async with client.subscribe("nope"):
                    pass
            assert info.value.code == "not_found"
            handler.fill("s-1", 2)
            sub = await client.subscribe("s-1")
            feed = handler.feeds.pop((handler.feed().conn, handler.feed().sub_id))
            await wait_until(lambda: len(sub._queue) == 2)
            feed.conn.push(SubscriptionClosed(feed.sub_id, "not_found", "session deleted"))
            await wait_until(lambda: not sub._queue)
            with pytest.raises(ClientError) as info:
                await anext(sub)
            assert (info.value.code, info.value.message) == ("not_found", "session deleted")
            assert sub.resumes == 0 and len(handler.subscribes()) == 3  # 2 for "nope", 1 here
            assert not any(isinstance(r, Unsubscribe) for r in handler.seen)

    run(main)


def test_resuming_gives_up_after_bounded_attempts() -> None:
    async def main() -> None:
        handler = FeedHandler()
        handler.fill("s-1", 1)
        server = await serve(handler)
        client = await connect(target(server), connect_attempts=2, **FAST)
        async with client:
            sub = await client.subscribe("s-1")
            assert seqs(await take(sub, 1)) == [1]
            server.close()
            await server.wait_closed()
            started = time.monotonic()
            with pytest.raises(ClientError) as info:
                await anext(sub)
            assert info.value.code == "unavailable" and "attempts" in info.value.message
            assert time.monotonic() - started < 3

    run(main)


def test_closing_the_client_ends_its_subscriptions_with_an_error() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with server:
            handler.fill("s-1", 1)
            sub = await client.subscribe("s-1")
            await take(sub, 1)
            waiting = asyncio.ensure_future(anext(sub))
            await asyncio.sleep(0.01)
            await client.close()
            with pytest.raises(ClientError) as info:
                await waiting
            assert (info.value.code, info.value.retryable) == ("unavailable", False)

    run(main)


# -- backpressure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_a_full_queue_pauses_reading_and_holds_the_server_back(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = FeedHandler(batch=4)
        handler.fill("big", 3000, content="x" * 16_000)  # 48 MB if nothing held it back
        high = 64 * 1024
        async with await serve(handler, write_buffer_high_bytes=high) as server:
            client = await connect(target(server), **FAST)
            async with client:
                sub = await client.subscribe("big", queue_max=16)
                conn = client._conn
                assert conn is not None
                [server_conn] = server.connections

                def reading_paused() -> bool:
                    assert conn is not None
                    return conn._reading_paused

                await wait_until(lambda: not server_conn.writable)
                await asyncio.sleep(0.05)
                assert reading_paused() and not server_conn.writable
                assert server_conn.backlog_bytes > high
                assert 16 <= len(sub._queue) < 16 + 4  # bounded: overshoot < one push
                pushed = handler.feed().next_seq - 1
                assert pushed < 3000  # the server stopped pushing
                items = await take(sub, 3000)
                assert seqs(items) == list(range(1, 3001))
                assert handler.writable_calls > 0  # on_writable sent the rest
                assert not reading_paused()
                await wait_until(lambda: server_conn.writable and server_conn.backlog_bytes == 0)

    run(main, loop)


def test_a_full_queue_delays_other_calls_until_it_drains() -> None:
    async def main() -> None:
        client, server, handler = await feed_and_client()
        async with client, server:
            handler.fill("s-1", 64)
            sub = await client.subscribe("s-1", queue_max=16)
            await wait_until(lambda: len(sub._queue) >= 16)
            ping = asyncio.ensure_future(client.ping())
            await asyncio.sleep(0.05)
            assert not ping.done()  # its answer waits behind the pushes
            await take(sub, 64)
            await ping

    run(main)


# -- inbox -----------------------------------------------------------------------------------------


def test_an_inbox_yields_a_snapshot_then_deltas_and_a_fresh_snapshot_after_a_resume() -> None:
    async def main() -> None:
        first_handler, second_handler = two_servers_one_store()
        first = await serve(first_handler)
        second = await serve(second_handler)
        client = await connect([target(first), target(second)], **FAST)
        async with client, first, second:
            await client.create_session("ann", "bot", session_id="s-1")
            await client.create_session("bob", "bot", session_id="s-2")
            async with client.subscribe_inbox("ann") as inbox:
                snapshot = await anext(inbox)
                assert isinstance(snapshot, InboxSnapshot)
                assert [e.session_id for e in snapshot.entries] == ["s-1"]
                await client.append("s-1", "hi")
                await client.append("s-2", "not ann's")
                delta = await anext(inbox)
                assert isinstance(delta, InboxDelta) and delta.sub_id == inbox.sub_id
                [entry] = delta.entries
                assert (entry.session_id, entry.last_seq, entry.preview) == ("s-1", 1, "hi")
                [conn] = first.connections
                assert conn._transport is not None
                conn._transport.abort()
                await wait_until(lambda: client.target is None)
                fresh = await anext(inbox)
                assert isinstance(fresh, InboxSnapshot) and inbox.resumes == 1
                assert [(e.session_id, e.last_seq) for e in fresh.entries] == [("s-1", 1)]
                await client.append("s-1", "again")
                delta = await anext(inbox)
                assert isinstance(delta, InboxDelta) and delta.entries[0].last_seq == 2
            assert second_handler.inboxes == {}

    run(main)


# -- shutdown --------------------------------------------------------------------------------------


def test_a_graceful_shutdown_reaches_the_client_as_a_retryable_error() -> None:
    async def main() -> None:
        first_handler, second_handler = two_servers_one_store()
        first_handler.fill("s-1", 2)
        first = await serve(first_handler)
        second = await serve(second_handler)
        client = await connect([target(first), target(second)], **FAST)
        async with client, second:
            sub = await client.subscribe("s-1")
            old = client._conn
            assert old is not None
            first_handler.hold = True
            call = asyncio.ensure_future(client.ping())
            await wait_until(lambda: len(first_handler.held) == 1)
            first.close("unavailable", "node shutting down")
            with pytest.raises(ClientError) as info:
                await call
            assert (info.value.code, info.value.retryable) == ("unavailable", True)
            assert "node shutting down" in info.value.message
            assert old.goodbye is not None and old.goodbye.retryable
            assert seqs(await take(sub, 2)) == [1, 2]  # resumed on the second node
            assert sub.resumes == 1 and client.target == second.address

    run(main)
