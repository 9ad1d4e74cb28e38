"""The asyncio server (``wire.aio``) on real sockets on 127.0.0.1, on uvloop and asyncio: requests
and answers, bounds, pushes, backlog and goodbyes."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from msgspec.structs import replace

from wire.aio import Connection, Server, serve
from wire.errors import ClientError, LocalProtocolError
from wire.framing import ClientConnection, ProtocolError, PushReceived, ResponseReceived
from wire.protocol import (
    Append,
    Error,
    GapEvent,
    GetSession,
    Message,
    MessageEvent,
    Messages,
    Ping,
    Pong,
    Read,
    Request,
    Response,
    Subscribe,
    Subscribed,
)

from .helpers import (
    LOOP_IDS,
    LOOPS,
    RawClient,
    StoreHandler,
    frame,
    hello,
    raw,
    run,
    wait_until,
)
from .samples import MESSAGES

pytestmark = pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def only_connection(server: Server) -> Connection:
    [conn] = server.connections
    return conn


def pongs(events: list[Any]) -> list[int]:
    assert all(isinstance(e, ResponseReceived) and type(e.response) is Pong for e in events)
    return [e.response.rid for e in events]


def test_handshake_and_ping(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler) as server:
            client = await RawClient.open(server.address)
            client.send(Ping(2))
            assert pongs(await client.events(1)) == [2]
            conn = only_connection(server)
            assert conn.hello == hello()
            client.close()
            await wait_until(lambda: handler.closed == [conn])

    run(main, loop)


def test_answers_leave_in_completion_order_matched_by_rid(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler) as server:
            client = await RawClient.open(server.address)
            handler.hold = True
            client.send(*[Ping(rid) for rid in range(2, 22)])
            await wait_until(lambda: len(handler.held) == 20)
            handler.release(reverse=True)
            assert pongs(await client.events(20)) == list(reversed(range(2, 22)))

    run(main, loop)


def test_in_flight_bound_stops_reading_until_answers_free_room(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler, max_in_flight=16) as server:
            client = await RawClient.open(server.address)
            handler.hold = True
            client.send(*[Ping(rid) for rid in range(2, 2002)])
            await wait_until(lambda: len(handler.held) == 16)
            await asyncio.sleep(0.05)
            conn = only_connection(server)
            assert len(handler.seen) == 16 and conn.core.in_flight == 16
            assert conn._reading_paused
            handler.release()  # frees all 16: the next 16 are handed out at once
            await wait_until(lambda: len(handler.held) == 16)
            assert len(handler.seen) == 32
            handler.hold = False
            handler.release()
            assert sorted(pongs(await client.events(2000))) == list(range(2, 2002))
            assert handler.max_outstanding == 16
            assert not conn._reading_paused

    run(main, loop)


def test_pending_bytes_bound_counts_request_frames(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        limit = 64 * 1024
        async with await serve(
            handler, max_frame_bytes=limit, pending_bytes_max=4 * limit
        ) as server:
            client = await RawClient.open(server.address)
            handler.hold = True
            big = "x" * (limit - 100)
            client.send(
                *[Append(r, "s", "user", "", "t", big, {}, None, None, None) for r in range(2, 12)]
            )
            await wait_until(lambda: len(handler.held) == 4)
            await asyncio.sleep(0.05)
            # each is charged its frame and a small answer's reserve: the 4th reaches the bound
            assert len(handler.seen) == 4
            handler.hold = False
            handler.release()
            events = await client.events(10)
            assert sorted(e.response.rid for e in events) == list(range(2, 12))

    run(main, loop)


def test_a_slow_reader_stops_the_server_handing_out_requests(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        answer = handler.answer
        message = msgspec.structs.replace(MESSAGES[0], content="x" * 200_000)

        def big_answer(request: Request) -> Response:
            if isinstance(request, Read):
                return Messages(request.rid, [message], 1)
            return answer(request)

        handler.answer = big_answer  # type: ignore[method-assign]
        async with await serve(handler, write_buffer_high_bytes=64 * 1024) as server:
            client = await RawClient.open(server.address)
            client.send(*[Read(rid, "s", 0, 10) for rid in range(2, 302)])
            await asyncio.sleep(0.2)  # the client reads nothing meanwhile
            seen = len(handler.seen)
            assert seen < 150, seen  # the socket buffers' worth (a few MB), not all 300
            conn = only_connection(server)
            assert conn._write_paused and conn._reading_paused
            events = await client.events(300)
            assert sorted(e.response.rid for e in events) == list(range(2, 302))

    run(main, loop)


def test_coroutine_and_callback_handlers(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        loop_ = asyncio.get_running_loop()

        async def slow_pong(rid: int) -> Response:
            await asyncio.sleep(0.01)
            return Pong(rid)

        def on_request(conn: Connection, request: Request) -> Any:
            if request.rid % 3 == 0:
                return slow_pong(request.rid)  # a coroutine: run as a task
            if request.rid % 3 == 1:
                loop_.call_later(0.005, conn.reply, Pong(request.rid))  # answered later
                return None
            return Pong(request.rid)  # answered now

        handler.on_request = on_request  # type: ignore[method-assign]
        async with await serve(handler) as server:
            client = await RawClient.open(server.address)
            client.send(*[Ping(rid) for rid in range(2, 32)])
            assert sorted(pongs(await client.events(30))) == list(range(2, 32))

    run(main, loop)


def test_handler_exceptions_become_errors(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()

        def on_request(conn: Connection, request: Request) -> Any:
            if request.rid == 2:
                raise ClientError("not_found", "no such thing", details={"x": 1})
            if request.rid == 3:
                raise ValueError("a bug")

            async def failing() -> Response:
                raise ClientError("unavailable", "no leader")

            return failing()

        handler.on_request = on_request  # type: ignore[method-assign]
        async with await serve(handler) as server:
            client = await RawClient.open(server.address)
            client.send(Ping(2), Ping(3), Ping(4))
            answers = {e.response.rid: e.response for e in await client.events(3)}
            assert answers[2] == Error(2, "not_found", "no such thing", False, {})
            assert answers[3] == Error(3, "internal", "internal error", False, {})
            assert answers[4] == Error(4, "unavailable", "no leader", True, {})

    run(main, loop)


def test_a_bad_token_is_refused_and_closed(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler(tokens={"good"})
        async with await serve(handler) as server:
            client = await RawClient.open(server.address, greet=False)
            client.send(hello(token="bad"), Ping(2))
            [event] = await client.events(2)
            assert event.response.code == "unauthorized"
            assert await client.closed()
            assert handler.seen == []  # the pipelined Ping was never handled
            client = await RawClient.open(server.address, greet=False)
            client.send(hello(token="good"))
            [event] = await client.events(1)
            assert event.response.node_id == 1

    run(main, loop)


def test_an_oversize_frame_gets_too_large_before_its_body(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler(), max_frame_bytes=1024) as server:
            client = await RawClient.open(server.address)
            client.write(struct.pack(">I", 1025))  # no body ever follows
            [event] = await client.events(1)
            assert isinstance(event, ProtocolError) and event.code == "too_large"
            assert await client.closed()

    run(main, loop)


def test_the_first_frame_must_be_a_hello(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler()) as server:
            client = await RawClient.open(server.address, greet=False)
            client.write(raw(["ping", 1]))
            client.core.send(hello())  # so the client core expects answers
            client.core.data_to_send()
            [event] = await client.events(1)
            assert isinstance(event, ProtocolError) and "hello" in event.message
            assert await client.closed()

    run(main, loop)


def test_a_bad_request_keeps_the_connection(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler()) as server:
            client = await RawClient.open(server.address)
            client.write(raw(["get_session", 2, ""]) + frame(b"\x92\xa4ping\x03"))
            first, second = await client.events(2)
            assert first.response.code == "bad_request"
            assert first.response.details == {"field": "session_id"}
            assert second.response == Pong(3)
            client.send(GetSession(4, "nope"))
            [event] = await client.events(1)
            assert event.response.code == "not_found"

    run(main, loop)


def test_a_half_closed_client_still_gets_its_answers(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler, max_in_flight=4) as server:
            client = await RawClient.open(server.address)
            handler.hold = True
            client.send(*[Ping(rid) for rid in range(2, 12)])
            client.writer.write_eof()
            for _ in range(2):
                await wait_until(lambda: len(handler.held) == 4)
                handler.release()
            await wait_until(lambda: len(handler.held) == 2)
            handler.release()
            events = await client.events(11)
            assert pongs(events[:10]) == list(range(2, 12))
            assert len(events) == 11 and type(events[10]).__name__ == "ConnectionClosed"

    run(main, loop)


def test_a_silent_connection_is_closed_after_the_hello_timeout(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler(), hello_timeout_s=0.1) as server:
            client = await RawClient.open(server.address, greet=False)
            await asyncio.wait_for(client.closed(), 2)
            greeted = await RawClient.open(server.address)
            await asyncio.sleep(0.2)  # a completed handshake is not timed out
            greeted.send(Ping(2))
            assert pongs(await greeted.events(1)) == [2]

    run(main, loop)


def test_closing_the_server_closes_its_connections(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        server = await serve(handler)
        client = await RawClient.open(server.address)
        server.close()
        await server.wait_closed()
        assert await client.closed()
        await wait_until(lambda: len(handler.closed) == 1)
        assert not server.connections

    run(main, loop)


def test_replies_after_close_are_discarded_and_double_replies_raise(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler) as server:
            client = await RawClient.open(server.address)
            handler.hold = True
            client.send(Ping(2), Ping(3))
            await wait_until(lambda: len(handler.held) == 2)
            (conn, _), _ = handler.held
            conn.reply(Pong(2))
            with pytest.raises(Exception, match="no request 2 in flight"):
                conn.reply(Pong(2))
            client.close()
            await wait_until(lambda: conn.closed)
            conn.reply(Pong(3))  # the peer is gone: discarded

    run(main, loop)


# -- pushes, backlog, goodbye ----------------------------------------------------------------------


class PushingHandler(StoreHandler):
    """Answers a Ping with Pong, then pushes ``per_ping`` MessageEvents of ``message`` while the
    connection is writable; ``on_writable`` pushes the rest (``left``)."""

    def __init__(self, message: Message, per_ping: int = 1) -> None:
        super().__init__()
        self.message = message
        self.left = 0
        self.per_ping = per_ping
        self.writable_calls = 0
        self.pushed = 0
        self.fail_on_writable = False

    def on_request(self, conn: Connection, request: Request) -> Any:
        conn.reply(Pong(request.rid))  # the reply first: the client learns of the sub first
        self.left += self.per_ping
        self.pump(conn)
        return None

    def pump(self, conn: Connection) -> None:
        while self.left and conn.writable:
            self.pushed += 1
            self.left -= 1
            assert conn.push(MessageEvent(1, [replace(self.message, seq=self.pushed)])) > 0

    def on_writable(self, conn: Connection) -> None:
        self.writable_calls += 1
        if self.fail_on_writable:
            raise RuntimeError("a handler bug")
        self.pump(conn)


def test_a_push_follows_the_reply_in_the_same_write(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = PushingHandler(MESSAGES[0])
        async with await serve(handler) as server:
            client = await RawClient.open(server.address)
            client.send(Ping(2))
            first, second = await client.events(2)
            assert first == ResponseReceived(Pong(2))
            assert second == PushReceived(MessageEvent(1, [replace(MESSAGES[0], seq=1)]))
            conn = only_connection(server)
            assert conn.writable and conn.backlog_bytes == 0
            assert conn.core.in_flight == 0

    run(main, loop)


def test_a_push_over_the_frame_limit_raises_and_the_connection_goes_on(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler(), max_frame_bytes=1024) as server:
            client = await RawClient.open(server.address)
            conn = only_connection(server)
            big = MessageEvent(1, [replace(MESSAGES[0], content="x" * 2000)])
            with pytest.raises(LocalProtocolError) as info:
                conn.push(big)
            assert info.value.code == "too_large"
            assert conn.push(GapEvent(1, 1, 2, "retention")) > 0
            client.send(Ping(2))
            events = await client.events(2)
            assert events == [
                PushReceived(GapEvent(1, 1, 2, "retention")),
                ResponseReceived(Pong(2)),
            ]

    run(main, loop)


def test_pushes_to_a_closing_connection_are_discarded(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler()) as server:
            client = await RawClient.open(server.address)
            conn = only_connection(server)
            conn.close()
            assert not conn.writable
            assert conn.push(GapEvent(1, 1, 2, "retention")) == 0
            assert await client.closed()
            await wait_until(lambda: conn.closed)
            assert conn.push(GapEvent(1, 1, 2, "retention")) == 0
            assert conn.backlog_bytes == 0

    run(main, loop)


def test_a_reader_that_stops_makes_the_connection_unwritable_until_it_drains(
    loop: LoopFactory,
) -> None:
    async def main() -> None:
        message = replace(MESSAGES[0], content="x" * 60_000)
        handler = PushingHandler(message, per_ping=2000)  # 120 MB if nothing stopped it
        high = 64 * 1024
        async with await serve(handler, write_buffer_high_bytes=high) as server:
            client = await RawClient.open(server.address)
            client.send(Ping(2))  # and read nothing for now
            conn = only_connection(server)
            await wait_until(lambda: not conn.writable)
            await asyncio.sleep(0.05)
            assert not conn.writable and conn.backlog_bytes > high
            assert 0 < handler.pushed < 2000 and handler.left  # it stopped pushing
            events = await client.events(2001)  # read everything: on_writable pushes the rest
            assert events[0] == ResponseReceived(Pong(2))
            assert [e.push.messages[0].seq for e in events[1:]] == list(range(1, 2001))
            assert handler.writable_calls > 0 and handler.left == 0
            await wait_until(lambda: conn.backlog_bytes == 0)
            assert conn.writable

    run(main, loop)


def test_a_failing_on_writable_is_logged_not_fatal(
    loop: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        handler = PushingHandler(replace(MESSAGES[0], content="x" * 60_000), per_ping=200)
        handler.fail_on_writable = True
        async with await serve(handler, write_buffer_high_bytes=64 * 1024) as server:
            client = await RawClient.open(server.address)
            client.send(Ping(2))
            conn = only_connection(server)
            await wait_until(lambda: not conn.writable)
            pushed = handler.pushed
            await client.events(pushed + 1)
            await wait_until(lambda: handler.writable_calls > 0)
            assert conn.writable and not conn.closed
            client.send(Ping(3))  # the connection still answers
            [pong] = [e for e in await client.events(1) if isinstance(e, ResponseReceived)]
            assert pong.response == Pong(3)

    with caplog.at_level(logging.ERROR, logger="wire.aio"):
        run(main, loop)
    assert "handler.on_writable failed" in caplog.text


def test_server_close_with_a_code_says_a_retryable_goodbye(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        server = await serve(handler)
        address = server.address
        client = await RawClient.open(address)
        handler.hold = True
        client.send(Ping(2))
        await wait_until(lambda: len(handler.held) == 1)
        server.close("unavailable", "node shutting down")
        await server.wait_closed()
        [event] = await client.events(1)
        assert event == ProtocolError("unavailable", "node shutting down", retryable=True)
        assert await client.closed()
        handler.release()  # the late answer is discarded
        with pytest.raises(OSError):
            await RawClient.open(address)  # no longer listening

    run(main, loop)


def test_closing_one_connection_with_a_code(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler()) as server:
            client = await RawClient.open(server.address)
            only_connection(server).close("internal", "bye")
            [event] = await client.events(1)
            assert event == ProtocolError("internal", "bye", retryable=False)
            assert await client.closed()

    run(main, loop)


def test_stop_listening_keeps_the_open_connections(loop: LoopFactory) -> None:
    async def main() -> None:
        server = await serve(StoreHandler())
        address = server.address
        client = await RawClient.open(address)
        server.stop_listening()  # (not wait_closed: from 3.12 on it waits for the connections)
        with pytest.raises(OSError):
            await RawClient.open(address)
        client.send(Ping(2))  # the open connection still answers
        assert pongs(await client.events(1)) == [2]
        server.close("unavailable", "node shutting down")
        [event] = await client.events(1)
        assert event == ProtocolError("unavailable", "node shutting down", retryable=True)

    run(main, loop)


# -- queued answers: bounded per connection and per node (issue 27 item 4) ------------------------

MiB = 1024 * 1024


def big_reads(handler: StoreHandler, content_bytes: int) -> None:
    """Make ``handler`` answer every ``read`` with one message of ``content_bytes``."""
    answer = handler.answer
    message = msgspec.structs.replace(MESSAGES[0], content="x" * content_bytes)

    def big_answer(request: Request) -> Response:
        if isinstance(request, Read):
            return Messages(request.rid, [message], 1)
        return answer(request)

    handler.answer = big_answer  # type: ignore[method-assign]


async def release_while_unread(handler: StoreHandler, server: Server, bound: int) -> int:
    """Answer what the server hands out, for a while, with the clients reading nothing; the most
    the server held meanwhile (charges and unwritten answers), checked against ``bound``."""
    most = 0
    for _ in range(40):
        handler.release()
        await asyncio.sleep(0.01)
        held = sum(c.core.bytes_to_send + c.backlog_bytes for c in server.connections)
        held += sum(c.pending_bytes - c._unwritten_charged for c in server.connections)
        most = max(most, held, server.pending_bytes)
        assert most <= bound, (most, bound)
    return most


def test_unread_answers_stay_within_the_connection_bound(loop: LoopFactory) -> None:
    """1 000 pipelined reads whose 256 KiB answers are never read: the server holds about its
    ``pending_bytes_max`` plus the writer's high-water mark, not 250 MiB; then all arrive."""

    async def main() -> None:
        handler = StoreHandler()
        big_reads(handler, 256 * 1024)
        limit, high = 1 * MiB, 256 * 1024
        async with await serve(
            handler,
            max_frame_bytes=limit,
            pending_bytes_max=8 * MiB,
            write_buffer_high_bytes=high,
        ) as server:
            client = await RawClient.open(server.address)
            handler.hold = True  # answers come later (a read waiting on its ReadIndex)
            client.send(*[Read(rid, "s", 0, 10) for rid in range(2, 1002)])
            await wait_until(lambda: len(handler.held) >= 7)
            await asyncio.sleep(0.05)
            assert len(handler.held) == 8  # 8 MiB / (1 MiB reserved for each answer)
            bound = 8 * MiB + high + limit + 64 * 1024  # the bound, a frame over, a socket's slack
            most = await release_while_unread(handler, server, bound)
            assert most > 4 * MiB  # (the bound was reached)
            assert len(handler.seen) < 100
            handler.hold = False
            handler.release()
            events = await client.events(1000)
            assert sorted(e.response.rid for e in events) == list(range(2, 1002))
            assert server.pending_bytes == only_connection(server).pending_bytes == 0

    run(main, loop)


def test_unread_answers_stay_within_the_node_bound_and_every_connection_gets_its_turn(
    loop: LoopFactory,
) -> None:
    """Four connections pipelining big reads that are not read: together they hold about the
    node's ``node_pending_bytes_max``; the ones stopped by it are woken in turn (none starves)
    and every answer arrives once the clients read."""

    async def main() -> None:
        handler = StoreHandler()
        big_reads(handler, 256 * 1024)
        limit, high = 1 * MiB, 256 * 1024
        async with await serve(
            handler,
            max_frame_bytes=limit,
            pending_bytes_max=4 * MiB,
            node_pending_bytes_max=8 * MiB,
            write_buffer_high_bytes=high,
        ) as server:
            clients = [await RawClient.open(server.address) for _ in range(4)]
            handler.hold = True
            for client in clients:
                client.send(*[Read(rid, "s", 0, 10) for rid in range(2, 202)])
            await wait_until(lambda: len(handler.held) >= 8)
            await asyncio.sleep(0.05)
            assert len(handler.held) == 8 and server.pending_bytes >= 8 * MiB
            assert len(server._waiting) == 2  # two connections wait for the node's room
            bound = 8 * MiB + 4 * (high + 64 * 1024) + limit
            await release_while_unread(handler, server, bound)
            handler.hold = False
            handler.release()
            for client in clients:
                events = await asyncio.wait_for(client.events(200), 20)
                assert sorted(e.response.rid for e in events) == list(range(2, 202))
            assert server.pending_bytes == 0 and not server._waiting

    run(main, loop)


def test_small_appends_pipelined_256_deep_pay_only_a_small_reserve(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler) as server:
            client = await RawClient.open(server.address)
            handler.hold = True
            client.send(
                *[
                    Append(r, "s", "user", "", "t", "hi", {}, None, None, None)
                    for r in range(2, 258)
                ]
            )
            await wait_until(lambda: len(handler.held) == 256)
            conn = only_connection(server)
            assert conn.pending_bytes == server.pending_bytes < 256 * 4200
            handler.hold = False
            handler.release()
            assert len(await client.events(256)) == 256
            assert server.pending_bytes == 0

    run(main, loop)


# -- connection caps and the idle timeout (issue 27 item 6) ----------------------------------------


async def goodbye_of(reader: asyncio.StreamReader) -> ProtocolError:
    """The goodbye (``Error{rid: 0}``) a refused or closed connection reads before its end."""
    core = ClientConnection()
    core.receive_data(await asyncio.wait_for(reader.read(), 5))
    event = core.next_event()
    assert isinstance(event, ProtocolError) and event.retryable, event
    return event


def test_connections_over_the_cap_are_refused_with_a_goodbye_and_one_log_line(
    loop: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler, connections_max=8, connections_per_source_max=8) as server:
            bare = [await asyncio.open_connection(*server.address) for _ in range(8)]
            await wait_until(lambda: len(server.connections) == 8)
            refused = [await asyncio.open_connection(*server.address) for _ in range(50)]
            for reader, _ in refused:
                error = await goodbye_of(reader)
                assert error.code == "unavailable" and "too many connections" in error.message
            assert server.refused.count == 50 and len(server.connections) == 8
            bare[0][1].close()
            await wait_until(lambda: len(server.connections) == 7)
            client = await RawClient.open(server.address)  # room again: a real client
            client.send(Ping(2))
            assert pongs(await client.events(1)) == [2]
            for _, writer in bare[1:] + refused:
                writer.close()
        lines = [r for r in caplog.records if "refusing client connections" in r.getMessage()]
        assert len(lines) == 1, lines  # one line per interval, with a count

    with caplog.at_level(logging.WARNING, logger="wire.aio"):
        run(main, loop)


def test_the_per_source_cap_leaves_room_for_other_addresses(loop: LoopFactory) -> None:
    async def main() -> None:
        async with await serve(StoreHandler(), connections_per_source_max=3) as server:
            mine = [await asyncio.open_connection(*server.address) for _ in range(3)]
            await wait_until(lambda: len(server.connections) == 3)
            reader, writer = await asyncio.open_connection(*server.address)
            assert "from 127.0.0.1" in (await goodbye_of(reader)).message
            other, other_writer = await asyncio.open_connection(
                *server.address, local_addr=("127.0.0.2", 0)
            )
            await wait_until(lambda: len(server.connections) == 4)
            for _, w in [*mine, (reader, writer), (other, other_writer)]:
                w.close()

    run(main, loop)


def test_a_late_answer_is_not_lost_to_the_idle_check_before_its_flush(
    loop: LoopFactory,
) -> None:
    """A request held past the idle timeout, then answered: the idle check that runs before the
    answer is flushed (its timer polls while the request is in flight) sees the answer as
    activity, and the answer arrives.  (It used to see nothing in flight, the request received
    long ago and unflushed bytes, and abort: the answer was lost with the connection.)"""

    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler, idle_timeout_s=0.2) as server:
            busy = await RawClient.open(server.address)
            handler.hold = True
            busy.send(Ping(2))
            await wait_until(lambda: len(handler.held) == 1)
            await asyncio.sleep(0.4)  # past the idle timeout, with the request in flight
            (conn,) = server.connections
            handler.hold = False
            handler.release()  # the answer is queued, flushed at the end of this iteration...
            conn._idle_check()  # ... after an idle check that comes first
            assert pongs(await busy.events(1)) == [2]
            [goodbye] = await asyncio.wait_for(busy.events(1), 2)  # idle 0.2 s after it
            assert isinstance(goodbye, ProtocolError) and goodbye.code == "unavailable"

    run(main, loop)


def test_idle_connections_are_closed_busy_and_subscribed_ones_are_kept(
    loop: LoopFactory,
) -> None:
    async def main() -> None:
        handler = StoreHandler()
        answer = handler.answer

        def subscribing(request: Request) -> Response:
            if isinstance(request, Subscribe):
                return Subscribed(request.rid, 1, 0)
            return answer(request)

        handler.answer = subscribing  # type: ignore[method-assign]
        async with await serve(handler, idle_timeout_s=0.2) as server:
            idle = await RawClient.open(server.address)
            busy = await RawClient.open(server.address)
            subscribed = await RawClient.open(server.address)
            subscribed.send(Subscribe(2, "s", 0))
            [event] = await subscribed.events(1)
            assert type(event.response) is Subscribed
            handler.hold = True
            busy.send(Ping(2))  # in flight for longer than the timeout
            await wait_until(lambda: len(handler.held) == 1)
            [goodbye] = await asyncio.wait_for(idle.events(1), 2)
            assert isinstance(goodbye, ProtocolError) and goodbye.code == "unavailable"
            assert "idle" in goodbye.message and await idle.closed()
            await asyncio.sleep(0.5)
            assert len(server.connections) == 2 and server.idle_closed == 1
            handler.hold = False
            handler.release()
            assert pongs(await busy.events(1)) == [2]
            [goodbye] = await asyncio.wait_for(busy.events(1), 2)  # idle once answered
            assert isinstance(goodbye, ProtocolError)
            subscribed.send(Ping(3))
            assert pongs(await subscribed.events(1)) == [3]
            assert len(server.connections) == 1

    run(main, loop)


def test_a_client_that_reads_nothing_is_aborted_and_gives_back_what_it_held(
    loop: LoopFactory,
) -> None:
    """A client pipelines big reads and reads nothing: once its writer has stayed paused for
    ``write_stall_timeout_s`` (the kernel's buffers full too), the connection is aborted and its
    share of the node's bound is free again; a client that reads is never aborted."""

    async def main() -> None:
        handler = StoreHandler()
        limit = 1 * MiB
        big_reads(handler, limit - 4096)
        async with await serve(
            handler, max_frame_bytes=limit, pending_bytes_max=8 * MiB, write_stall_timeout_s=0.5
        ) as server:
            stuck = await RawClient.open(server.address)
            stuck.send(*[Read(rid, "s", 0, 10) for rid in range(2, 202)])
            await wait_until(lambda: not only_connection(server).writable)
            assert server.pending_bytes > 1 * MiB  # (its unwritten answers, charged)
            reader = await RawClient.open(server.address)
            for rid in range(2, 22):  # slower than the timeout in all, reading as it goes
                reader.send(Read(rid, "s", 0, 10))
                [event] = await reader.events(1)
                assert event.response.rid == rid
                await asyncio.sleep(0.05)
            await wait_until(lambda: len(server.connections) == 1)
            assert server.stalled_closed == 1 and await stuck.closed()
            assert server.pending_bytes == only_connection(server).pending_bytes == 0

    run(main, loop)


async def fill_the_node_bound(server: Server, handler: StoreHandler) -> RawClient:
    """A client whose 200 reads, held on their ReadIndex, fill the node's 16 MiB bound."""
    busy = await RawClient.open(server.address)
    handler.hold = True
    busy.send(*[Read(rid, "s", 0, 10) for rid in range(2, 202)])
    await wait_until(lambda: server.pending_bytes >= 16 * MiB)
    return busy


def test_a_new_client_gets_its_welcome_while_the_node_bound_is_full(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(
            handler, pending_bytes_max=16 * MiB, node_pending_bytes_max=16 * MiB
        ) as server:
            _busy = await fill_the_node_bound(server, handler)  # (kept open)
            late = await asyncio.wait_for(RawClient.open(server.address), 2)  # its Welcome
            late.send(Ping(2))
            await wait_until(lambda: server.waiting == 1)  # then it waits for room
            handler.hold = False
            handler.release()
            assert pongs(await asyncio.wait_for(late.events(1), 5)) == [2]

    run(main, loop)


def test_a_connection_closed_while_it_waits_for_the_node_bound_leaves_the_queue(
    loop: LoopFactory,
) -> None:
    """A connection stopped by ``node_pending_bytes_max`` that is closed (aborted: its write
    stalled, or the node closed it) leaves the queue at once, not when the node next falls
    below half its bound: under a load that keeps it above, the queue would hold connections
    no longer counted in ``connections`` (so not bounded by ``connections_max``)."""

    async def main() -> None:
        handler = StoreHandler()
        async with await serve(
            handler, pending_bytes_max=16 * MiB, node_pending_bytes_max=16 * MiB
        ) as server:
            busy = await fill_the_node_bound(server, handler)
            for _ in range(3):
                late = await asyncio.wait_for(RawClient.open(server.address), 2)
                late.send(Ping(2))
                await wait_until(lambda: server.waiting == 1)
                [waiting] = [c for c in server.connections if c._waiting]
                assert waiting._transport is not None
                waiting._transport.abort()
                await wait_until(lambda: len(server.connections) == 1)
                assert server.waiting == 0
                late.close()
            handler.hold = False
            handler.release()
            assert len(await asyncio.wait_for(busy.events(200), 10)) == 200

    run(main, loop)


# -- requests_per_pass: one connection's burst does not hold the others back ----------------------


class PassCountingHandler(StoreHandler):
    """Counts the requests handed out in each loop iteration, per connection."""

    def __init__(self) -> None:
        super().__init__()
        self.this_pass: dict[Connection, int] = {}
        self.most_per_pass = 0
        self.order: list[Connection] = []

    def on_request(self, conn: Connection, request: Request) -> Any:
        if not self.this_pass:
            asyncio.get_running_loop().call_soon(self.this_pass.clear)
        count = self.this_pass[conn] = self.this_pass.get(conn, 0) + 1
        self.most_per_pass = max(self.most_per_pass, count)
        self.order.append(conn)
        return super().on_request(conn, request)


@pytest.mark.parametrize("per_pass", [0, 4])
def test_requests_per_pass_bounds_a_burst_and_lets_another_connection_in(
    loop: LoopFactory, per_pass: int
) -> None:
    async def main() -> None:
        handler = PassCountingHandler()
        async with await serve(handler, requests_per_pass=per_pass) as server:
            bulk = await RawClient.open(server.address)
            other = await RawClient.open(server.address)
            await wait_until(lambda: len(server.connections) == 2)
            bulk.send(*[Ping(rid) for rid in range(2, 402)])  # one write
            other.send(Ping(2))
            assert sorted(pongs(await bulk.events(400))) == list(range(2, 402))
            assert pongs(await other.events(1)) == [2]
            [bulk_conn] = [c for c in server.connections if handler.order.count(c) == 400]
            [other_conn] = [c for c in server.connections if c is not bulk_conn]
            if per_pass:
                assert handler.most_per_pass == per_pass
                # the other connection's ping was handed out long before the burst's last one
                assert handler.order.index(other_conn) < 200
            else:
                assert handler.most_per_pass > 4  # the burst in one go: the test can fail
            await wait_until(lambda: not bulk_conn._reading_paused and not bulk_conn._yielded)
            bulk.send(Ping(500))  # reading resumed after the burst
            assert pongs(await bulk.events(1)) == [500]

    run(main, loop)


def test_requests_per_pass_must_not_be_negative(loop: LoopFactory) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="requests_per_pass"):
            await serve(StoreHandler(), requests_per_pass=-1)

    run(main, loop)
