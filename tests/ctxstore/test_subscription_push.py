"""The subscription push path (ctxstore/subscriptions.py): live pushes are split to fit the
connection's frames, and no failure skips a message silently (units with a fake connection)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from ctxstore.records import StoredMessage
from ctxstore.subscriptions import SubscriptionLimits, Subscriptions
from wire.errors import LocalProtocolError
from wire.protocol import GapEvent, MessageEvent, SubscriptionClosed

_encode = msgspec.msgpack.Encoder().encode


class _Conn:
    """What Subscriptions uses of a connection; frames are limited like the real one."""

    def __init__(self, frame_bytes_max: int, fail: bool = False) -> None:
        self.frame_bytes_max = frame_bytes_max
        self.fail = fail
        self.pushes: list[Any] = []
        self.closed = False
        self.writable = True
        self.backlog_bytes = 0

    def push(self, event: Any) -> int:
        if self.fail and isinstance(event, MessageEvent):
            raise RuntimeError("a bug while pushing")
        size = len(_encode(event))
        if size > self.frame_bytes_max:
            raise LocalProtocolError("too_large", f"a push of {size} bytes")
        self.pushes.append(event)
        return size


def _message(seq: int, size: int) -> StoredMessage:
    return StoredMessage("s", seq, "user", "u", "text", "x" * size, {}, None, 0, None)


def _live(conn: _Conn, page_bytes: int = 1 << 20) -> Subscriptions:
    subs = Subscriptions(None, None, SubscriptionLimits(page_bytes=page_bytes))  # type: ignore[arg-type]
    subs.start(conn, 1, "s", 0, after_seq=0, last_seq=0)  # type: ignore[arg-type]
    return subs


def test_live_pushes_are_split_to_fit_and_a_message_no_frame_holds_is_a_gap() -> None:
    async def main() -> None:
        conn = _Conn(frame_bytes_max=10_000)
        subs = _live(conn)
        sizes = [100, 4_000, 4_000, 4_000, 20_000, 100]
        for seq, size in enumerate(sizes, 1):
            subs.on_message(_message(seq, size))
        await asyncio.sleep(0.01)
        seen: list[int] = []
        for event in conn.pushes:
            if isinstance(event, GapEvent):
                assert (event.from_seq, event.to_seq, event.reason) == (5, 5, "unavailable")
                seen.append(event.from_seq)
            else:
                assert isinstance(event, MessageEvent) and len(_encode(event)) <= 10_000
                seen += [m.seq for m in event.messages]
        assert seen == [1, 2, 3, 4, 5, 6]
        assert subs.unpushable == 1 and subs.pushed_messages == 6

    asyncio.run(main())


def test_a_failure_while_pushing_closes_the_subscription_instead_of_skipping() -> None:
    async def main() -> None:
        conn = _Conn(frame_bytes_max=10_000, fail=True)
        subs = _live(conn)
        subs.on_message(_message(1, 10))
        await asyncio.sleep(0.01)
        assert len(conn.pushes) == 1 and isinstance(conn.pushes[0], SubscriptionClosed)
        assert conn.pushes[0].reason == "unavailable" and subs.count == 0

    asyncio.run(main())
