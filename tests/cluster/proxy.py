"""A fault-injecting TCP proxy (asyncio) to put between two Raft nodes.

``LinkProxy`` listens on 127.0.0.1 and forwards every accepted connection to one upstream
address.  The transport keeps one connection per pair of nodes, dialled by the lower id
(raft/transport.py), so one proxy per *pair* controls all the traffic of that pair, both ways:
the lower-id node is told that the higher-id node listens at the proxy.

Modes (``LinkProxy.mode``):

- ``PASS``: bytes flow both ways.
- ``CUT``: the link is down.  Open connections are aborted (both sides see a reset or EOF at
  once) and new ones are accepted and aborted straight away, as a refused connection would be.
- ``BLACKHOLE``: the link silently eats bytes.  Open connections stay open but everything read
  from either side is dropped; new connections are accepted and never reach the upstream.
  Nothing tells the nodes the link is bad: only their own liveness checks can.
- ``heal()`` goes back to ``PASS``.  Connections that lost bytes in a blackhole are aborted
  (their byte streams are no longer well framed); the nodes dial again.

The proxy keeps counts (``accepted``, ``forwarded_bytes``, ``dropped_bytes``, ``aborted``) so a
test can check that a fault really happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
from typing import cast

logger = logging.getLogger(__name__)

Address = tuple[str, int]


class Mode(enum.Enum):
    PASS = "pass"
    CUT = "cut"
    BLACKHOLE = "blackhole"


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; hands its bytes to its ``_Pair``."""

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.pair.closed:  # refused (CUT) or closed before this side was made
            self.transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.pair.received(self, data)

    def eof_received(self) -> bool:
        self.pair.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.close()

    # Backpressure: while this side cannot write, stop reading the other side.
    def pause_writing(self) -> None:
        other = self.pair.other(self)
        if other is not None and other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.pair.other(self)
        if other is not None and other.transport is not None:
            other.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Pair:
    """An accepted (downstream) connection and its upstream connection."""

    def __init__(self, proxy: LinkProxy) -> None:
        self.proxy = proxy
        self.down = _Side(self)
        self.up: _Side | None = None  # once the upstream connection is made
        self.pending = bytearray()  # downstream bytes read before the upstream connected
        self.tainted = False  # bytes were dropped: the stream is no longer well framed
        self.closed = False
        self.connector: asyncio.Task[None] | None = None

    def other(self, side: _Side) -> _Side | None:
        return self.up if side is self.down else self.down

    def received(self, side: _Side, data: bytes) -> None:
        if self.closed:
            return
        if self.proxy.mode is not Mode.PASS or self.tainted:
            self.tainted = True
            self.proxy.dropped_bytes += len(data)
            return
        other = self.other(side)
        if other is None or other.transport is None:
            self.pending += data  # the upstream is still connecting
            return
        self.proxy.forwarded_bytes += len(data)
        other.transport.write(data)

    def upstream_made(self, up: _Side) -> None:
        self.up = up
        if self.pending and up.transport is not None:
            self.proxy.forwarded_bytes += len(self.pending)
            up.transport.write(bytes(self.pending))
        self.pending.clear()

    def close(self) -> None:
        """Abort both sides (a half-closed link is of no use to the transport)."""
        if self.closed:
            return
        self.closed = True
        self.proxy.pairs.discard(self)
        if self.connector is not None and not self.connector.done():
            self.connector.cancel()
        self.down.abort()
        if self.up is not None:
            self.up.abort()


class LinkProxy:
    """Forwards connections accepted on ``address`` to ``upstream``; see the module docstring."""

    def __init__(self, upstream: Address, name: str = "") -> None:
        self.upstream = upstream
        self.name = name or f"proxy->{upstream[0]}:{upstream[1]}"
        self.mode = Mode.PASS
        self.pairs: set[_Pair] = set()
        self.accepted = 0
        self.aborted = 0
        self.forwarded_bytes = 0
        self.dropped_bytes = 0
        self._server: asyncio.Server | None = None
        self._address: Address | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port)
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])
        return self._address

    @property
    def address(self) -> Address:
        assert self._address is not None, "proxy not started"
        return self._address

    async def close(self) -> None:
        for pair in list(self.pairs):
            pair.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # faults ---------------------------------------------------------------------------------------

    def cut(self) -> None:
        """Abort every connection and refuse new ones until ``heal``."""
        self.mode = Mode.CUT
        self._abort(list(self.pairs))

    def blackhole(self) -> None:
        """Keep connections open but drop every byte, both ways, until ``heal``."""
        self.mode = Mode.BLACKHOLE

    def heal(self) -> None:
        """Forward again; connections that lost bytes are aborted so the nodes dial afresh."""
        self.mode = Mode.PASS
        self._abort([p for p in self.pairs if p.tainted])

    def _abort(self, pairs: list[_Pair]) -> None:
        for pair in pairs:
            self.aborted += 1
            pair.close()

    # connections ----------------------------------------------------------------------------------

    def _accept(self) -> _Side:
        self.accepted += 1
        pair = _Pair(self)
        self.pairs.add(pair)
        if self.mode is Mode.CUT:
            self._abort([pair])  # the socket is aborted as soon as it is made
        elif self.mode is Mode.BLACKHOLE:
            pair.tainted = True  # never connected upstream; dropped bytes are counted
        else:
            pair.connector = asyncio.get_running_loop().create_task(self._connect(pair))
        return pair.down

    async def _connect(self, pair: _Pair) -> None:
        loop = asyncio.get_running_loop()
        up = _Side(pair)
        host, port = self.upstream
        try:
            await loop.create_connection(lambda: up, host, port)
        except OSError as e:
            logger.debug("%s: upstream connect failed: %s", self.name, e)
            pair.close()
            return
        if pair.closed:
            up.abort()
            return
        pair.upstream_made(up)
