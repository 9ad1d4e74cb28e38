"""The webhook pool's HTTP/1.1 keep-alive: reuse through bursts, idle expiry, the idle cap."""

from __future__ import annotations

import asyncio
import json

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
