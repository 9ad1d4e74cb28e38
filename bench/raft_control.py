"""The control protocol of the Raft test node (``python -m bench.raft_testnode``), and its client.

Requests and replies are msgpack arrays (Structs below) in frames of a 4-byte big-endian length,
pipelined on one connection and matched by ``rid``:

    Propose(rid, group, data)                      -> Reply(value = 1-based position in the history)
    Read(rid, group, after, limit, linearizable)   -> Reply(value = [applied, [data...]])
    Status(rid)                                    -> Reply(value = {...})
    Transfer(rid, group, to) / Compact(rid, group) -> Reply(value = None)

An error comes back as ``Reply(ok=False, code, message, leader)`` with a code of raft.errors, or
``timeout`` or ``bad_request``; ``ControlClient.call`` raises it as ``ControlError``.  Both ends
cut frames with the one ``Framer``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any, Final, cast

import msgspec

FRAME_BYTES_MAX: Final = 16 << 20
READ_LIMIT_MAX: Final = 100_000
HEADER: Final = struct.Struct(">I")


class Propose(msgspec.Struct, tag="propose", array_like=True, forbid_unknown_fields=True):
    rid: int
    group: int
    data: bytes


class Read(msgspec.Struct, tag="read", array_like=True, forbid_unknown_fields=True):
    rid: int
    group: int
    after: int
    limit: int
    linearizable: bool


class Status(msgspec.Struct, tag="status", array_like=True, forbid_unknown_fields=True):
    rid: int


class Transfer(msgspec.Struct, tag="transfer", array_like=True, forbid_unknown_fields=True):
    rid: int
    group: int
    to: int


class Compact(msgspec.Struct, tag="compact", array_like=True, forbid_unknown_fields=True):
    rid: int
    group: int


Request = Propose | Read | Status | Transfer | Compact


class Reply(msgspec.Struct, array_like=True):
    rid: int
    ok: bool
    value: Any = None
    code: str = ""
    message: str = ""
    leader: int = 0


class ControlError(Exception):
    """An error reply (or a refusal of the node's): ``code``, and the leader it knows of."""

    def __init__(self, code: str, message: str, leader: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.leader = leader


request_decoder: Final = msgspec.msgpack.Decoder(Request)
_reply_decoder: Final = msgspec.msgpack.Decoder(Reply)
_encoder: Final = msgspec.msgpack.Encoder()


def frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


class Framer:
    """Bytes in, frame bodies out, sans I/O.  A declared length over ``FRAME_BYTES_MAX`` raises
    ``ValueError`` before its body is waited for; the buffer is compacted once per ``feed``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = HEADER.unpack_from(buf, pos)
            if n > FRAME_BYTES_MAX:
                raise ValueError(f"frame of {n} bytes exceeds {FRAME_BYTES_MAX}")
            if end - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


class ControlClient(asyncio.Protocol):
    """A pipelined connection to one node's control port.  A request on a lost connection fails
    at once with ``ConnectionError``, and so do those in flight when it is lost."""

    def __init__(self) -> None:
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._framer = Framer()
        self._rid = 0
        self._waiting: dict[int, asyncio.Future[Reply]] = {}

    @classmethod
    async def connect(cls, host: str, port: int) -> ControlClient:
        _, client = await asyncio.get_running_loop().create_connection(cls, host, port)
        return client

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self._framer.feed(data)
        except ValueError as e:
            self._lost(f"bad reply: {e}")
            return
        for body in bodies:
            reply = _reply_decoder.decode(body)
            future = self._waiting.pop(reply.rid, None)
            if future is not None and not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"control connection lost: {exc!r}")

    def _lost(self, why: str) -> None:
        self.closed = True
        self.close()
        self._transport = None
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ConnectionError(why))

    # requests ------------------------------------------------------------------------------------

    def send(self, make: Callable[..., msgspec.Struct], *args: Any) -> asyncio.Future[Reply]:
        """Send ``make(rid, *args)``; the future completes with the node's reply."""
        if self.closed or self._transport is None:
            raise ConnectionError("control connection closed")
        self._rid += 1
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[self._rid] = future
        self._transport.write(frame(make(self._rid, *args)))
        return future

    async def call(self, make: Callable[..., msgspec.Struct], *args: Any) -> Any:
        """``send``, then the reply's value; raises ``ControlError`` for an error reply."""
        reply = await self.send(make, *args)
        if not reply.ok:
            raise ControlError(reply.code, reply.message, reply.leader)
        return reply.value

    async def propose(self, group: int, data: bytes) -> int:
        return int(await self.call(Propose, group, data))

    async def read(
        self, group: int, after: int = 0, limit: int = READ_LIMIT_MAX, linearizable: bool = False
    ) -> tuple[int, list[bytes]]:
        applied, items = await self.call(Read, group, after, limit, linearizable)
        return int(applied), list(items)

    async def status(self) -> dict[str, Any]:
        return dict(await self.call(Status))

    async def transfer(self, group: int, to: int) -> None:
        await self.call(Transfer, group, to)

    async def compact(self, group: int) -> None:
        await self.call(Compact, group)
