"""The wire limits against a real node (``ctxstore`` on this loop, real sockets): nesting depth
(issue 27 item 5), queued response bytes (item 4) and connection caps (item 6)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.ctxstore.test_ops import run, single_node
from wire.client import connect
from wire.framing import ResponseReceived
from wire.protocol import METADATA_DEPTH_MAX, Append, CreateSession, Error, Message, Ping, Pong

from .helpers import RawClient, frame


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def answer(event: Any) -> Any:
    assert isinstance(event, ResponseReceived), event
    return event.response


def test_deep_nesting_is_refused_at_the_boundary_and_the_limit_round_trips(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            raw = await RawClient.open(h.clients.address)
            too_deep = nested(METADATA_DEPTH_MAX + 1)
            raw.send(CreateSession(2, "u", "a", too_deep, "deep"))
            raw.send(Append(3, "deep", "user", "u", "text", "hi", too_deep, None, None, None))
            raw.write(frame(b"\x93\xa4ping\x04" + b"\x91" * 100_000 + b"\xc0"))  # an extra field
            raw.send(Ping(5))
            events = [answer(e) for e in await raw.events(4)]
            by_rid = {r.rid: r for r in events}
            for rid in (2, 3, 4):
                assert type(by_rid[rid]) is Error and by_rid[rid].code == "bad_request"
            assert by_rid[2].details == by_rid[3].details == {"field": "metadata"}
            assert type(by_rid[5]) is Pong  # the connection goes on
            raw.close()

            at_limit = nested(METADATA_DEPTH_MAX)
            client = await connect(h.target, timeout_s=5)
            try:
                info = await client.create_session("u", "a", at_limit, session_id="ok")
                assert info.session.metadata == at_limit
                await client.append("ok", "hi", metadata=at_limit)
                async with client.subscribe("ok", after_seq=0) as sub:
                    message = await asyncio.wait_for(anext(sub), 5)
                assert isinstance(message, Message) and message.metadata == at_limit
            finally:
                await client.close()

    run(main())
