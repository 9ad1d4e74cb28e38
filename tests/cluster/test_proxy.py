"""The fault-injecting proxy on its own, in front of an echo server: bytes flow both ways; a cut
resets open connections and refuses new ones; a blackhole keeps connections open but drops
every byte; heal restores forwarding (and closes the connections a blackhole corrupted)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from .harness import run
from .proxy import LinkProxy, Mode

pytestmark = pytest.mark.cluster


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def echo_behind_proxy() -> AsyncIterator[LinkProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    upstream = server.sockets[0].getsockname()[:2]
    proxy = LinkProxy(upstream, "test")
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def connect(proxy: LinkProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*proxy.address)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the other end closed or reset the connection."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        return True


def test_bytes_flow_both_ways() -> None:
    """A large payload goes through and comes back intact (backpressure included)."""

    async def body() -> None:
        async with echo_behind_proxy() as proxy:
            reader, writer = await connect(proxy)
            payload = bytes(range(256)) * 40_000  # ~10 MB: more than any socket buffer
            writer.write(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
            assert got == payload
            assert proxy.forwarded_bytes == 2 * len(payload)
            writer.close()

    run(body, 30)


def test_cut_resets_and_refuses_then_heal() -> None:
    """cut(): the open connection is closed at once and a new one is closed on arrival;
    heal(): new connections work again."""

    async def body() -> None:
        async with echo_behind_proxy() as proxy:
            reader, writer = await connect(proxy)
            assert await roundtrip(reader, writer, b"hello") == b"hello"
            proxy.cut()
            assert proxy.mode is Mode.CUT
            assert await closed_by_peer(reader)
            reader2, writer2 = await connect(proxy)  # accepted by the kernel, then aborted
            with contextlib.suppress(ConnectionError):
                writer2.write(b"anyone?")
            assert await closed_by_peer(reader2)
            proxy.heal()
            reader3, writer3 = await connect(proxy)
            assert await roundtrip(reader3, writer3, b"back") == b"back"
            for w in (writer, writer2, writer3):
                w.close()

    run(body, 30)


def test_blackhole_drops_silently_then_heal() -> None:
    """blackhole(): the connection stays open but nothing comes back; a new connection is
    accepted but silent too.  heal(): those corrupted connections are closed, fresh ones
    work."""

    async def body() -> None:
        async with echo_behind_proxy() as proxy:
            reader, writer = await connect(proxy)
            assert await roundtrip(reader, writer, b"ping") == b"ping"
            proxy.blackhole()
            writer.write(b"lost")
            await writer.drain()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.5)  # open, but silent
            reader2, writer2 = await connect(proxy)
            writer2.write(b"lost too")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader2.read(1), 0.3)
            assert proxy.dropped_bytes >= len(b"lost") + len(b"lost too")
            proxy.heal()
            assert await closed_by_peer(reader)
            assert await closed_by_peer(reader2)
            reader3, writer3 = await connect(proxy)
            assert await roundtrip(reader3, writer3, b"healed") == b"healed"
            for w in (writer, writer2, writer3):
                w.close()

    run(body, 30)
