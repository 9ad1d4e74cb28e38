"""A test client of the HTTP/3 listener (``ctxstore/web_h3.py``) built on aioquic's own client:
HTTP/3 requests and WebTransport sessions (``ctxstore/webtransport.py``); and a lossy UDP relay
(drops, reordering, an address change) to put between them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent

HEADER = struct.Struct(">I")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


@dataclass
class _Incoming:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    got_headers: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class WtStream:
    buf: bytearray = field(default_factory=bytearray)
    messages: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each message was received
    ended: bool = False


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.incoming: dict[int, _Incoming] = {}
        self.wt: dict[int, WtStream] = {}  # stream id -> what came on it
        self.uni: list[int] = []  # the server's unidirectional streams, in order of arrival
        self.json = True
        self.changed = asyncio.Event()
        self.terminated: ConnectionTerminated | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
            for inc in self.incoming.values():
                inc.done.set()
                inc.got_headers.set()
            self.changed.set()
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived):
                inc = self.incoming.setdefault(e.stream_id, _Incoming())
                inc.headers += e.headers
                inc.got_headers.set()
                if e.stream_ended:
                    inc.done.set()
            elif isinstance(e, DataReceived):
                inc = self.incoming.setdefault(e.stream_id, _Incoming())
                inc.body += e.data
                if e.stream_ended:
                    inc.done.set()
                self.changed.set()
            elif isinstance(e, WebTransportStreamDataReceived):
                st = self.wt.get(e.stream_id)
                if st is None:
                    st = self.wt[e.stream_id] = WtStream()
                    if e.stream_id & 2:
                        self.uni.append(e.stream_id)
                st.buf += e.data
                now = asyncio.get_running_loop().time()
                while len(st.buf) >= 4:
                    (n,) = HEADER.unpack_from(st.buf)
                    if len(st.buf) < 4 + n:
                        break
                    raw = bytes(st.buf[4 : 4 + n])
                    del st.buf[: 4 + n]
                    st.messages.append(
                        msgspec.json.decode(raw) if self.json else msgspec.msgpack.decode(raw)
                    )
                    st.times.append(now)
                st.ended = st.ended or e.stream_ended
                self.changed.set()

    # HTTP/3 ------------------------------------------------------------------------------------
    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        sid = self._quic.get_next_available_stream_id()
        raw = (
            b"" if body is None else body if isinstance(body, bytes) else msgspec.json.encode(body)
        )
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path.encode()),
            *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
        ]
        inc = self.incoming[sid] = _Incoming()
        self.h3.send_headers(sid, head, end_stream=not raw)
        if raw:
            self.h3.send_data(sid, raw, end_stream=True)
        self.transmit()
        await asyncio.wait_for(inc.done.wait(), 10)
        if self.terminated is not None and not inc.headers:
            raise ConnectionError(self.terminated.reason_phrase)
        hd = {k.decode(): v.decode() for k, v in inc.headers}
        return Reply(int(hd[":status"]), hd, bytes(inc.body))

    def open_request(self, path: str, headers: dict[str, str] | None = None) -> int:
        """A GET whose answer is read as it comes (``incoming[stream]``): an event stream."""
        sid = self._quic.get_next_available_stream_id()
        self.incoming[sid] = _Incoming()
        head = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path.encode()),
            *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
        ]
        self.h3.send_headers(sid, head, end_stream=True)
        self.transmit()
        return sid

    # WebTransport ------------------------------------------------------------------------------
    async def open_session(
        self, path: str = "/v1/wt", headers: dict[str, str] | None = None
    ) -> tuple[int, int]:
        """(session id, status)."""
        sid = self._quic.get_next_available_stream_id()
        inc = self.incoming[sid] = _Incoming()
        self.h3.send_headers(
            sid,
            [
                (b":method", b"CONNECT"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", path.encode()),
                (b":protocol", b"webtransport"),
                *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        )
        self.transmit()
        await asyncio.wait_for(inc.got_headers.wait(), 10)
        hd = dict(inc.headers)
        self.json = b"msgpack" not in path.encode()
        return sid, int(hd[b":status"])

    def encode(self, message: Any) -> bytes:
        raw = msgspec.json.encode(message) if self.json else msgspec.msgpack.encode(message)
        return HEADER.pack(len(raw)) + raw

    def send(self, session: int, *messages: Any, end: bool = True) -> int:
        sid = self.h3.create_webtransport_stream(session)
        # aioquic's H3Connection marks only the peer's WebTransport streams as such: mark ours
        # so that the answers on it come as WebTransportStreamDataReceived
        with self.h3._get_or_create_stream(sid) as stream:
            stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            stream.session_id = session
        self.wt[sid] = WtStream()
        self._quic.send_stream_data(sid, b"".join(self.encode(m) for m in messages), end)
        self.transmit()
        return sid

    async def wait_for(self, pred: Callable[[], Any], timeout_s: float = 10) -> Any:
        async def loop() -> Any:
            while True:
                value = pred()
                if value:
                    return value
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(loop(), timeout_s)

    async def call(self, session: int, message: Any) -> Any:
        sid = self.send(session, message)
        st = self.wt[sid]
        await self.wait_for(lambda: st.messages)
        return st.messages[0]

    def pushes(self, sub_id: int) -> list[Any]:
        out: list[Any] = []
        for sid in self.uni:
            for m in self.wt[sid].messages:
                if (m.get("sub_id") if isinstance(m, dict) else m[1]) == sub_id:
                    out.append(m)
        return out


def client_configuration() -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536
    )
    config.verify_mode = ssl.CERT_NONE  # (the node's certificate is self-signed)
    return config


@contextlib.asynccontextmanager
async def h3_client(address: tuple[str, int]) -> AsyncIterator[H3Client]:
    async with connect(
        address[0], address[1], configuration=client_configuration(), create_protocol=H3Client
    ) as client:
        assert isinstance(client, H3Client)
        yield client


class LossyRelay(asyncio.DatagramProtocol):
    """A UDP relay between one client and the server: drops ``loss`` of the datagrams each way
    (seeded), holds ``reorder`` of them back behind the next one, can drop the large datagrams
    to the client for a while (``drop_large_until``) and can move to a new upstream socket (a
    new client address, as after a network change: ``rebind``)."""

    def __init__(self, server: tuple[str, int], loss: float = 0.0, reorder: float = 0.0) -> None:
        self.server = server
        self.loss = loss
        self.reorder = reorder
        self.rng = random.Random(26)
        self.client: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None
        self.held: dict[str, tuple[bytes, Callable[[bytes], None]] | None] = {
            "up": None,
            "down": None,
        }
        self.dropped = 0
        self.drop_large_until = 0.0  # drop every datagram of >= large bytes to the client until
        self.large = 1000
        self.dropped_large: list[float] = []

    @classmethod
    async def start(cls, server: tuple[str, int], **kw: Any) -> LossyRelay:
        loop = asyncio.get_running_loop()
        relay = cls(server, **kw)
        await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
        await relay.rebind()
        return relay

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # from the client
        self.client = addr
        upstream = self.upstream
        if upstream is not None:
            self._forward("up", data, lambda d: upstream.sendto(d, self.server))

    def _down(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        if len(data) >= self.large and now < self.drop_large_until:
            self.dropped_large.append(now)
            return
        if self.client is not None and self.transport is not None:
            client, transport = self.client, self.transport
            self._forward("down", data, lambda d: transport.sendto(d, client))

    def _forward(self, way: str, data: bytes, send: Callable[[bytes], None]) -> None:
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        if self.held[way] is None and self.rng.random() < self.reorder:
            self.held[way] = (data, send)  # sent after the next one
            return
        send(data)
        held, self.held[way] = self.held[way], None
        if held is not None:
            held[1](held[0])

    async def rebind(self) -> None:
        """A new upstream socket: the server sees the client at a new address."""
        loop = asyncio.get_running_loop()
        old = self.upstream
        relay = self

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if relay.upstream is transport:
                    relay._down(data)

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport, _ = await loop.create_datagram_endpoint(Up, sock=sock)
        self.upstream = transport
        if old is not None:
            old.close()

    @property
    def upstream_port(self) -> int:
        assert self.upstream is not None
        return int(self.upstream.get_extra_info("sockname")[1])

    def close(self) -> None:
        for t in (self.transport, self.upstream):
            if t is not None:
                t.close()
