"""A small WebSocket test client: wsproto over asyncio streams, speaking either subprotocol.

``WsClient.open`` does the handshake (``Refused`` carries a refusal's status and body);
``send`` encodes a native request for the connection's subprotocol (``send_text`` and
``send_bytes`` send anything); ``recv`` decodes the next response or push into its native
Struct, and raises ``Closed`` with the close code and reason once the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from wire.protocol import PROTOCOL_VERSION, Hello, Push, Response
from wire.protocol import Request as WireRequest
from wire.web_codec import JSON, SERVER_MESSAGE_TWINS, from_json_object, json_request

_msgpack_decoder = msgspec.msgpack.Decoder(Response | Push)
_json_decoder = msgspec.json.Decoder(SERVER_MESSAGE_TWINS)


class Refused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"{status}: {body!r}")
        self.status = status
        self.body = body


class Closed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class WsClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ws: WSConnection,
        subprotocol: str | None,
    ) -> None:
        self.reader, self.writer, self.ws = reader, writer, ws
        self.subprotocol = subprotocol
        self.json = subprotocol == JSON
        self.messages: list[str | bytes] = []
        self.close_event: CloseConnection | None = None
        self.pings = 0
        self._parts: list[Any] = []

    @classmethod
    async def open(
        cls,
        address: tuple[str, int],
        subprotocols: list[str],
        *,
        hello: bool = True,
        token: str | None = None,
        path: str = "/v1/ws",
        rcvbuf_bytes: int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> WsClient:
        sock = socket.socket()
        if rcvbuf_bytes is not None:  # (set before connecting: the window is negotiated then)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        reader, writer = await asyncio.open_connection(sock=sock)
        ws = WSConnection(ConnectionType.CLIENT)
        writer.write(
            ws.send(
                Request(
                    host="t", target=path, subprotocols=subprotocols, extra_headers=headers or []
                )
            )
        )
        status, body = 0, b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    client = cls(reader, writer, ws, event.subprotocol)
                    client._events()  # what came with the 101
                    if hello:
                        welcome = await client.request(Hello(1, PROTOCOL_VERSION, "t", token))
                        assert type(welcome).__name__ == "Welcome", welcome
                    return client
                if isinstance(event, RejectConnection):
                    status = event.status_code
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        writer.close()
                        raise Refused(status, body)
            if not data:
                raise Refused(status, body)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send_raw(self.ws.send(TextMessage(text)))

    async def send_bytes(self, data: bytes) -> None:
        await self.send_raw(self.ws.send(BytesMessage(data)))

    async def send(self, request: WireRequest) -> None:
        if self.json:
            await self.send_text(json_request(request).decode())
        else:
            await self.send_bytes(msgspec.msgpack.encode(request))

    async def request(self, request: WireRequest) -> Response | Push:
        await self.send(request)
        return await self.recv()

    async def recv_raw(self, timeout_s: float = 10) -> str | bytes:
        """The next message's payload; ``Closed`` once the server closed."""
        while not self.messages:
            if self.close_event is not None:
                raise Closed(self.close_event.code, self.close_event.reason or "")
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            if not data:
                if self.close_event is None:
                    raise Closed(None, "the connection ended without a close")
                continue
            self.ws.receive_data(data)
            self._events()
        return self.messages.pop(0)

    async def recv(self, timeout_s: float = 10) -> Response | Push:
        payload = await self.recv_raw(timeout_s)
        if isinstance(payload, str):
            return from_json_object(_json_decoder.decode(payload))  # type: ignore[return-value]
        return _msgpack_decoder.decode(payload)

    async def pump(self, duration_s: float) -> None:
        """Read (and answer pings) for ``duration_s``; messages are kept for ``recv``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration_s
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                return
            if not data:
                return
            self.ws.receive_data(data)
            self._events()

    async def closed(self, timeout_s: float = 10) -> Closed:
        """Read until the server closes; its close (the messages before it are dropped)."""
        while True:
            try:
                await self.recv_raw(timeout_s)
            except Closed as e:
                return e

    def _events(self) -> None:
        for event in self.ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    empty: Any = "" if isinstance(event, TextMessage) else b""
                    self.messages.append(empty.join(self._parts))
                    self._parts = []
            elif isinstance(event, Ping):
                self.pings += 1
                self.writer.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_event = event
                if self.ws.state.name == "REMOTE_CLOSING":
                    self.writer.write(self.ws.send(event.response()))

    async def close(self) -> None:
        if self.ws.state.name == "OPEN":
            self.writer.write(self.ws.send(CloseConnection(1000)))
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
