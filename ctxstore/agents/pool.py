"""Pooled webhook connections per origin, on the node's loop (docs/agents.md).

Per origin (scheme, host, port): at most ``calls_per_origin_max`` calls at once (the rest wait
for a slot, within the call's deadline); HTTP/2 origins share one connection (streams are
multiplexed; a new one replaces it after GOAWAY or an error); HTTP/1.1 origins keep up to
``idle_per_origin_max`` idle keep-alive connections (as many as calls may run, so a burst of
calls does not close connections it will open again a moment later), each closed once idle for
``idle_keepalive_s``; so is an HTTP/2 connection once its origin had no call for that long.
Which to speak: ``h1`` and ``h2`` as the agent says (``h2`` on ``http://`` is prior-knowledge
h2c); ``auto`` is ALPN over TLS
(``h2``, then ``http/1.1``) and HTTP/1.1 on ``http://``.  TLS with the stdlib ``ssl``
(the system's CAs; ``SSL_CERT_FILE`` points elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .http import Connection, H1Connection, H2Connection, HttpError, Response

Origin = tuple[str, str, int]


@dataclass(frozen=True)
class PoolLimits:
    calls_per_origin_max: int = 64
    idle_per_origin_max: int = 64
    idle_keepalive_s: float = 30.0  # an idle connection (HTTP/2: its origin's) is closed after
    connect_timeout_s: float = 10.0


class Pool:
    def __init__(
        self,
        limits: PoolLimits | None = None,
        ssl_context: Callable[[], ssl.SSLContext] = ssl.create_default_context,
    ) -> None:
        self.limits = limits or PoolLimits()
        self._new_ssl = ssl_context  # one context per ALPN choice
        self._ssl: dict[str, ssl.SSLContext] = {}
        # Per origin with calls in progress or waiting (the last one out removes it): its
        # slots and how many hold or wait for one.
        self._slots: dict[Origin, _Slots] = {}
        self._h2: dict[Origin, H2Connection] = {}
        self._h2_opening: dict[Origin, asyncio.Future[H2Connection | None]] = {}
        self._h2_idle: dict[Origin, float] = {}  # since when an HTTP/2 origin has had no call
        self._idle: dict[Origin, list[tuple[float, H1Connection]]] = {}  # (since, conn)
        self._sweep: asyncio.TimerHandle | None = None
        self._alpn: dict[Origin, str] = {}  # what an https origin chose last (while it has calls)
        self.connections_opened = 0
        self.closed = False

    @contextlib.asynccontextmanager
    async def slot(self, origin: Origin) -> AsyncIterator[None]:
        """Hold one of the origin's ``calls_per_origin_max`` slots (waiting for it).  What the
        pool knows of an origin lasts while it has calls: the last one out takes its slots and
        ALPN choice away (its connections are closed once idle for ``idle_keepalive_s``), so an
        origin no agent calls any more (a URL changed) keeps nothing."""
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = _Slots(self.limits.calls_per_origin_max)
            self._h2_idle.pop(origin, None)
        slots.users += 1
        try:
            async with slots.semaphore:
                yield
        finally:
            slots.users -= 1
            if slots.users == 0 and self._slots.get(origin) is slots:
                del self._slots[origin]
                self._alpn.pop(origin, None)
                if origin in self._h2 and not self.closed:
                    self._h2_idle[origin] = self._idle_since()

    async def request(
        self,
        origin: Origin,
        protocol: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        idle_s: float,
    ) -> Response:
        """Send a POST; the caller holds ``slot(origin)`` and reads ``Response.body`` to its
        end (or closes it) before releasing the slot."""
        if self.closed:
            raise HttpError("connection", "the pool is closed")
        conn = await self._connection(origin, protocol)
        return await conn.request(target, headers, body, idle_s)

    async def _connection(self, origin: Origin, protocol: str) -> Connection:
        h2c = self._h2.get(origin) if protocol != "h1" else None
        if h2c is not None and h2c.available():
            return h2c
        idle = self._idle.get(origin) if protocol != "h2" else None
        while idle:
            _, c = idle.pop()  # the most recently used: the least likely to be closed by now
            if not idle:
                del self._idle[origin]  # (none left: ``_release`` adds it again)
            if c.available() and not c.reader.at_eof():
                return c
            c.close()
        if protocol == "h1" or (origin[0] == "http" and protocol == "auto"):
            return await self._open(origin, "h1")
        if protocol == "auto" and self._alpn.get(origin) == "http/1.1":
            return await self._open(origin, protocol)
        opening = self._h2_opening.get(origin)
        if opening is not None:  # another call is opening it: share the result
            shared = await asyncio.shield(opening)
            if shared is not None and shared.available():
                return shared
        future: asyncio.Future[H2Connection | None] = asyncio.get_running_loop().create_future()
        self._h2_opening[origin] = future
        try:
            conn = await self._open(origin, protocol)
        except BaseException:
            future.set_result(None)
            raise
        finally:
            self._h2_opening.pop(origin, None)
        future.set_result(conn if isinstance(conn, H2Connection) else None)
        return conn

    async def _open(self, origin: Origin, protocol: str) -> Connection:
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            tls = self._tls(protocol)
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise HttpError("connect_timeout", f"connecting to {host}:{port} timed out") from None
        except ssl.SSLError as e:
            raise HttpError("tls", f"TLS with {host}:{port}: {e}") from None
        except OSError as e:
            raise HttpError("connect", f"connecting to {host}:{port}: {e}") from None
        self.connections_opened += 1
        authority = host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"
        chosen = "h2" if protocol == "h2" and scheme == "http" else "http/1.1"
        if tls is not None:
            sslobj = writer.get_extra_info("ssl_object")
            chosen = (sslobj.selected_alpn_protocol() if sslobj else None) or "http/1.1"
            self._alpn[origin] = chosen
            if protocol == "h2" and chosen != "h2":
                writer.close()
                raise HttpError("tls", f"{host}:{port} did not agree to HTTP/2 (ALPN)")
        if chosen == "h2":
            conn = H2Connection(reader, writer, authority, scheme,
                                lambda c: self._h2_ended(origin, c))  # fmt: skip
            conn.start()
            self._h2[origin] = conn
            return conn
        return H1Connection(reader, writer, authority, lambda c: self._release(origin, c))

    def _h2_ended(self, origin: Origin, conn: H2Connection) -> None:
        if self._h2.get(origin) is conn:
            del self._h2[origin]
            self._h2_idle.pop(origin, None)

    def _tls(self, protocol: str) -> ssl.SSLContext:
        ctx = self._ssl.get(protocol)
        if ctx is None:
            ctx = self._ssl[protocol] = self._new_ssl()
            ctx.set_alpn_protocols(
                {"h2": ["h2"], "h1": ["http/1.1"]}.get(protocol, ["h2", "http/1.1"])
            )
        return ctx

    def _release(self, origin: Origin, conn: H1Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self.closed or len(idle) >= self.limits.idle_per_origin_max:
            conn.close()
            return
        idle.append((self._idle_since(), conn))

    def _idle_since(self) -> float:
        """Now, for a connection (or an HTTP/2 origin) that becomes idle: ``_expire`` will
        look at it once ``idle_keepalive_s`` passed."""
        loop = asyncio.get_running_loop()
        if self._sweep is None:
            self._sweep = loop.call_later(self.limits.idle_keepalive_s, self._expire)
        return loop.time()

    def _expire(self) -> None:
        """Close the connections idle for ``idle_keepalive_s``; again later while any is idle."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        keepalive = self.limits.idle_keepalive_s
        cutoff = loop.time() - keepalive
        next_at = None
        for origin, idle in list(self._idle.items()):
            n = 0  # released in time order: the expired ones are a prefix
            while n < len(idle) and idle[n][0] <= cutoff:
                idle[n][1].close()
                n += 1
            del idle[:n]
            if not idle:
                del self._idle[origin]
            elif next_at is None or idle[0][0] + keepalive < next_at:
                next_at = idle[0][0] + keepalive
        for origin, since in list(self._h2_idle.items()):
            if since <= cutoff:
                del self._h2_idle[origin]
                h2c = self._h2.pop(origin, None)
                if h2c is not None:
                    h2c.close()  # (no call holds a slot: nothing in flight on it)
            elif next_at is None or since + keepalive < next_at:
                next_at = since + keepalive
        if next_at is not None:
            self._sweep = loop.call_at(next_at, self._expire)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for c in list(self._h2.values()):
            c.close()
        for idle in self._idle.values():
            for _, h1 in idle:
                h1.close()
        self._h2.clear()
        self._h2_idle.clear()
        self._idle.clear()


class _Slots:
    __slots__ = ("semaphore", "users")

    def __init__(self, calls_max: int) -> None:
        self.semaphore = asyncio.Semaphore(calls_max)
        self.users = 0  # calls holding or waiting for a slot


__all__ = ["Origin", "Pool", "PoolLimits"]
