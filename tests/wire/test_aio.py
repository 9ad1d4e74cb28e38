"""The asyncio server (``wire.aio``) on real sockets on 127.0.0.1, on uvloop and asyncio."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from wire.aio import Connection, Server, serve
from wire.errors import ClientError
from wire.framing import ProtocolError, ResponseReceived
from wire.protocol import (
    Append,
    Error,
    GetSession,
    Messages,
    Ping,
    Pong,
    Read,
    Request,
    Response,
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


def test_in_flight_bytes_bound(loop: LoopFactory) -> None:
    async def main() -> None:
        handler = StoreHandler()
        limit = 64 * 1024
        async with await serve(
            handler, max_frame_bytes=limit, max_in_flight_bytes=4 * limit
        ) as server:
            client = await RawClient.open(server.address)
            handler.hold = True
            big = "x" * (limit - 100)
            client.send(
                *[Append(r, "s", "user", "", "t", big, {}, None, None, None) for r in range(2, 12)]
            )
            await wait_until(lambda: len(handler.held) == 5)
            await asyncio.sleep(0.05)
            assert len(handler.seen) == 5  # the bound, overshot by at most one frame
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
