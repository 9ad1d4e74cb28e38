"""The webhook pool's HTTP/1.1 keep-alive: reuse through bursts, idle expiry, the idle cap."""

from __future__ import annotations

import asyncio
import json

from ctxstore.agents.http import H1Connection, H2Connection
from ctxstore.agents.pool import Pool, PoolLimits

from .agent_server import agent_server

BODY = json.dumps({"messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]})
HEADERS = [(b"content-type", b"application/json")]


async def call(pool: Pool, port: int) -> bytes:
    origin = ("http", "127.0.0.1", port)
    async with pool.slot(origin):
        response = await pool.request(origin, "h1", "/sse", HEADERS, BODY.encode(), 5.0)
        assert response.status == 200
        return b"".join([piece async for piece in response.body])


def test_a_burst_of_calls_reuses_every_connection_it_opened() -> None:
    async def main() -> None:
        async with agent_server() as srv:
            pool = Pool()
            for _ in range(3):  # three bursts of 16 calls at once
                bodies = await asyncio.gather(*(call(pool, srv.port) for _ in range(16)))
                assert all(b"[DONE]" in b for b in bodies)
            # the first burst opened 16; the next two found them idle (a cap of 8 idle ones
            # closed half of them after each burst and opened 8 again)
            assert pool.connections_opened == 16
            assert pool.idle_connections() == 16
            pool.close()
            assert pool.idle_connections() == 0

    asyncio.run(main())


def test_a_connection_idle_for_the_keepalive_is_closed() -> None:
    async def main() -> None:
        async with agent_server() as srv:
            pool = Pool(PoolLimits(idle_keepalive_s=0.2))
            await call(pool, srv.port)
            await asyncio.sleep(0.1)
            await call(pool, srv.port)  # reused, and idle again from now
            assert (pool.connections_opened, pool.idle_connections()) == (1, 1)
            await asyncio.sleep(0.12)  # 0.22 s after the first release: still idle < 0.2 s
            assert pool.idle_connections() == 1
            await asyncio.sleep(0.2)
            assert pool.idle_connections() == 0
            await call(pool, srv.port)
            assert pool.connections_opened == 2
            pool.close()

    asyncio.run(main())


def test_idle_connections_past_the_cap_are_closed() -> None:
    async def main() -> None:
        async with agent_server() as srv:
            pool = Pool(PoolLimits(idle_per_origin_max=2))
            await asyncio.gather(*(call(pool, srv.port) for _ in range(5)))
            assert (pool.connections_opened, pool.idle_connections()) == (5, 2)
            pool.close()

    asyncio.run(main())


def test_a_body_closed_unread_ends_its_request() -> None:
    """An error answer's body is closed without a read (the engine fails the attempt on its
    status): the HTTP/1.1 connection is closed (it was left busy and open, with an idle timer
    rescheduling itself for ever) and the HTTP/2 stream forgotten, its data's flow-control
    window given back (it stayed in the connection's streams, the window spent, for good)."""

    async def main() -> None:
        async with agent_server() as srv:
            pool = Pool()
            origin = ("http", "127.0.0.1", srv.port)
            for protocol in ("h1", "h2"):
                for _ in range(3):
                    async with pool.slot(origin):
                        conn = await pool._connection(origin, protocol)
                        response = await conn.request("/500", HEADERS, BODY.encode(), 5.0)
                        assert response.status == 500
                        await asyncio.sleep(0.05)  # its body ("no") came meanwhile
                        await response.body.aclose()
                    if isinstance(conn, H1Connection):
                        watch = conn._watch
                        assert conn.closed and not conn.busy
                        assert watch is not None and watch._handle.cancelled()
            assert isinstance(conn, H2Connection) and conn.available()
            assert conn.streams == {}
            window = conn.h2._inbound_flow_control_window_manager
            assert window.current_window_size + window._bytes_processed == window.max_window_size
            pool.close()

    asyncio.run(main())


def test_an_origin_without_calls_leaves_nothing_behind() -> None:
    """What the pool keeps per origin (its slots, its HTTP/2 connection, its idle HTTP/1.1 ones)
    leaves with its last call and its connections: agents whose URLs change do not grow it
    (one entry per origin ever called, for the node's life, before)."""

    async def main() -> None:
        pool = Pool(PoolLimits(idle_keepalive_s=0.2))
        for protocol in ("h1", "h2", "h1", "h2"):
            async with agent_server() as srv:  # a new port: a new origin each time
                origin = ("http", "127.0.0.1", srv.port)
                async with pool.slot(origin):
                    response = await pool.request(origin, protocol, "/sse", HEADERS,
                                                  BODY.encode(), 5.0)  # fmt: skip
                    assert response.status == 200
                    assert b"[DONE]" in b"".join([piece async for piece in response.body])
                assert pool._slots == {}
            await asyncio.sleep(0.05)  # the server is gone: so is its HTTP/2 connection
            assert pool._h2 == {}
        await asyncio.sleep(0.3)  # the idle HTTP/1.1 connections expired
        assert pool._idle == {} and pool.idle_connections() == 0
        pool.close()

    asyncio.run(main())


def test_an_http2_connection_whose_origin_has_no_call_is_closed_after_the_keepalive() -> None:
    """An HTTP/2 connection to an origin no agent calls any more (its server still up) is
    closed once the origin had no call for ``idle_keepalive_s``, as an idle HTTP/1.1 one is;
    a call in between keeps it."""

    async def main() -> None:
        pool = Pool(PoolLimits(idle_keepalive_s=0.6))
        async with agent_server() as srv:
            origin = ("http", "127.0.0.1", srv.port)

            async def call() -> None:
                async with pool.slot(origin):
                    response = await pool.request(origin, "h2", "/sse", HEADERS,
                                                  BODY.encode(), 5.0)  # fmt: skip
                    assert response.status == 200
                    assert b"[DONE]" in b"".join([piece async for piece in response.body])

            await call()
            first = pool._h2[origin]
            await asyncio.sleep(0.3)
            await call()  # within the keepalive: the same connection, kept
            assert pool._h2[origin] is first and not first.closed
            await asyncio.sleep(0.4)  # 0.7 s after the first call, 0.4 after the last
            assert pool._h2[origin] is first and not first.closed
            await asyncio.sleep(0.5)
            assert first.closed and pool._h2 == {} and pool._h2_idle == {}
            await call()  # a new call opens a new one
            assert pool._h2[origin] is not first
            assert pool.connections_opened == 2
        pool.close()

    asyncio.run(main())
