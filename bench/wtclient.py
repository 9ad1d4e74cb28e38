"""The bench's WebTransport client (``--via wt``, docs/web.md §8): a ``LoadClient`` of a node's
HTTP/3 listener, built on aioquic's client.

One QUIC connection and one WebTransport session (``/v1/wt?protocol=ctxstore.v1.msgpack``) per
client, as the WebSocket client has one socket: each request on a bidirectional stream of its
own (a 4-byte length, then the native msgpack body), its answer read from that stream and matched
by ``rid``.  The node's certificate is not verified (a local self-signed one).  A lost
connection fails its requests ``unavailable`` (retryable); the next call connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from typing import Any, Final

import msgspec
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent

from wire.client import ClientError, expect_response
from wire.protocol import PROTOCOL_VERSION, Hello, Push, Request, Response, Welcome

from .webclients import CLIENT_NAME, InFlight, WsClient, host_port, unavailable

HEADER: Final = struct.Struct(">I")
PATH: Final = "/v1/wt?protocol=ctxstore.v1.msgpack"
_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Response | Push)


class _WtConnection(QuicConnectionProtocol):
    """One QUIC connection carrying one session: requests in flight by ``rid``."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.loop = asyncio.get_running_loop()
        self.session: int | None = None
        self.accepted: asyncio.Future[None] = self.loop.create_future()
        self.buffers: dict[int, bytearray] = {}
        self.calls = InFlight(self.loop, 10.0)
        self.error: ClientError | None = None
        self._writable: asyncio.Future[None] | None = None  # (aioquic buffers: never paused)
        self.context: Any = None  # the client's ``connect`` context, exited on close
        self.on_push: Any = None  # called with each push (bench/subdelay.py)

    def open_session(self) -> None:
        sid = self._quic.get_next_available_stream_id()
        self.session = sid
        self.h3.send_headers(sid, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", b"localhost"),
            (b":path", PATH.encode()), (b":protocol", b"webtransport"),
        ])  # fmt: skip
        self.transmit()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.fail(unavailable(f"wt: connection closed: {event.reason_phrase}"))
            return
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived) and e.stream_id == self.session:
                status = dict(e.headers).get(b":status")
                if self.accepted.done():
                    continue
                if status == b"200":
                    self.accepted.set_result(None)
                else:
                    self.fail(unavailable(f"wt: the session was refused ({status!r})"))
            elif isinstance(e, WebTransportStreamDataReceived):
                self._stream_data(e.stream_id, e.data, e.stream_ended)

    def _stream_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        buf = self.buffers.setdefault(stream_id, bytearray())
        buf += data
        while len(buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(buf)
            if len(buf) < HEADER.size + n:
                break
            message = _decoder.decode(bytes(buf[HEADER.size : HEADER.size + n]))
            del buf[: HEADER.size + n]
            rid = getattr(message, "rid", None)
            future = None if rid is None else self.calls.pop(rid)
            if rid is None:
                if self.on_push is not None:
                    self.on_push(message)
            elif rid == 0:
                self.fail(unavailable(f"wt: goodbye: {message}"))
            elif future is not None and not future.done():
                future.set_result(message)
        if ended:
            self.buffers.pop(stream_id, None)

    def request(self, request: Request) -> asyncio.Future[Response]:
        future: asyncio.Future[Response] = self.loop.create_future()
        if self.error is not None or self.session is None:
            future.set_exception(self.error or unavailable("wt: no session"))
            return future
        body = _encoder.encode(request)
        sid = self.h3.create_webtransport_stream(self.session)
        # aioquic marks only the peer's WebTransport streams as such: mark ours for the answer
        with self.h3._get_or_create_stream(sid) as stream:
            stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            stream.session_id = self.session
        self._quic.send_stream_data(sid, HEADER.pack(len(body)) + body, end_stream=True)
        self._transmit_soon()
        self.calls.add(request.rid, future)
        return future

    def fail(self, error: ClientError) -> None:
        if self.error is not None:
            return
        self.error = error
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()
        self.calls.fail_all(error)
        with contextlib.suppress(Exception):
            self.close()


class WtClient(WsClient):
    """A client of one node's ``/v1/wt`` (``LoadClient``); the rest as ``WsClient``."""

    def __init__(self, address: str, token: str | None, timeout_s: float) -> None:
        super().__init__(address, "ctxstore.v1.msgpack", token, timeout_s)

    async def _open(self) -> Any:
        host, port = host_port(self.address)
        config = QuicConfiguration(
            is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536
        )
        config.verify_mode = ssl.CERT_NONE  # (a local node's self-signed certificate)
        context = connect(host, port, configuration=config, create_protocol=_WtConnection)
        async with asyncio.timeout(self.timeout_s):
            conn = await context.__aenter__()
        assert isinstance(conn, _WtConnection)
        conn.context = context
        conn.calls.timeout_s = self.timeout_s
        try:
            async with asyncio.timeout(self.timeout_s):
                conn.open_session()
                await conn.accepted
                hello = Hello(self.next_rid(), PROTOCOL_VERSION, CLIENT_NAME, self.token)
                expect_response(await conn.request(hello), Welcome, "Hello")
        except BaseException:
            conn.fail(unavailable("the handshake failed"))
            raise
        return conn

    async def _connect(self) -> Any:
        try:
            return await self._open()
        except (OSError, ConnectionError) as e:
            raise unavailable(f"wt {self.address}: {e!r}") from None
        except TimeoutError:
            raise unavailable(f"wt {self.address}: no session in {self.timeout_s} s") from None

    async def close(self) -> None:
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
            with contextlib.suppress(BaseException):
                await self.connecting
        conn: Any = self.conn
        if isinstance(conn, _WtConnection):
            conn.fail(unavailable("the client is closed"))
            with contextlib.suppress(Exception):
                await conn.context.__aexit__(None, None, None)


__all__ = ["WtClient"]
