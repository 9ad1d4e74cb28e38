"""Size limits end to end on real ``ctxstore serve`` processes (ctxstore/limits.py,
docs/ctxstore.md "Limits"): a message of ``MESSAGE_BYTES_MAX`` is stored, read back, delivered
live and on replay; one byte more is ``too_large``; a maximal message never freezes its group."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import msgspec
import pytest

from ctxstore.launcher import LocalCluster
from ctxstore.placement import group_of
from wire.client import Client, ClientError, connect
from wire.protocol import FRAME_BYTES_MAX, MESSAGE_BYTES_MAX, READ_BYTES_MAX, Append, Message

from .test_e2e import FAST, read_all, run

pytestmark = pytest.mark.cluster

GROUPS = 64  # FAST's --groups
WIDE = "\U0001f600"  # 4 bytes in UTF-8


def content_of(payload_bytes: int, metadata: dict[str, str] | None = None) -> str:
    """A content that makes the message's payload (content in UTF-8 + metadata encoded; ``{}``
    is 1 byte) exactly ``payload_bytes``, mostly of 4-byte characters."""
    rest = payload_bytes - len(msgspec.msgpack.encode(metadata or {}))
    n, r = divmod(rest, 4)
    return "a" * r + WIDE * n


async def take(sub: object, n: int) -> list[Message]:
    out: list[Message] = []
    async for item in sub:  # type: ignore[attr-defined]
        assert isinstance(item, Message), item  # no gap: every message is delivered
        out.append(item)
        if len(out) == n:
            return out
    raise AssertionError("the subscription ended")


async def timed_append(client: Client, sid: str, content: str, msg_id: str) -> float:
    """Seconds until the append was acknowledged; it must be within the request timeout."""
    start = time.monotonic()
    await asyncio.wait_for(client.append(sid, content, client_msg_id=msg_id), 5.5)
    return time.monotonic() - start


def test_a_maximal_message_is_stored_read_and_delivered_and_its_group_keeps_writing(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path), extra_args=FAST)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                await c.create_session("u", "a", {}, "big")
                routes = await c.get_routes()
            leader = routes.leaders[group_of("big", GROUPS)]
            targets = [routes.addresses[leader]] + [
                a for n, a in sorted(routes.addresses.items()) if n != leader
            ]
            clients = [await connect(t, timeout_s=30, connect_attempts=1) for t in targets]
            lead, follower = clients[0], clients[1]
            try:
                live = follower.subscribe("big", 0)
                await live

                # The message: ~1 Mi characters of 4 bytes, a request frame just under
                # 4 MiB whose AppendEntries the peer transport could never queue: the leader
                # used to answer nothing at all (not even at the deadline).  Now: too_large.
                huge = "a" * 4 + WIDE * (1024 * 1024 - 17)  # 4 MiB - 64 bytes
                request = Append(1, "big", "user", "", "text", huge, {}, "huge", None, None)
                assert len(msgspec.msgpack.encode(request)) < FRAME_BYTES_MAX
                with pytest.raises(ClientError) as e:
                    await lead.append("big", huge, client_msg_id="huge")
                assert e.value.code == "too_large" and not e.value.retryable
                meta = {"k": "v" * 1000}
                for content, metadata in (
                    (content_of(MESSAGE_BYTES_MAX + 1), None),
                    (content_of(MESSAGE_BYTES_MAX + 1, meta), meta),
                ):
                    with pytest.raises(ClientError) as e:
                        await lead.append("big", content, metadata=metadata)
                    assert e.value.code == "too_large", e.value
                    assert e.value.details["limit"] == MESSAGE_BYTES_MAX

                # Maximal messages, four at once through the leader, one with metadata, and
                # one through a follower (forwarded): all acknowledged.
                biggest = content_of(MESSAGE_BYTES_MAX)
                with_meta = content_of(MESSAGE_BYTES_MAX, meta)
                acks = await asyncio.wait_for(
                    asyncio.gather(
                        lead.append("big", biggest, client_msg_id="max-0"),
                        lead.append("big", biggest, client_msg_id="max-1"),
                        lead.append("big", with_meta, metadata=meta, client_msg_id="max-2"),
                        lead.append("big", biggest, client_msg_id="max-3"),
                    ),
                    5.5,
                )
                assert sorted(a.seq for a in acks) == [1, 2, 3, 4]
                await timed_append(follower, "big", biggest, "max-4")

                # The group keeps writing, through every node, within the request timeout.
                for i, client in enumerate(clients):
                    for j in range(3):
                        assert await timed_append(client, "big", f"small {i} {j}", f"s{i}{j}") < 5

                n = 5 + 3 * len(clients)
                for client in clients:  # read back, in pages that fit the read budget
                    page = await client.read("big", 0, 1000)
                    assert 1 <= len(page.messages) < 5
                    size = len(msgspec.msgpack.encode(page.messages))
                    assert size <= READ_BYTES_MAX or len(page.messages) == 1
                    history = await read_all(client, "big")
                    assert [m.seq for m in history] == list(range(1, n + 1))
                    by_id = {m.client_msg_id: m for m in history}
                    assert by_id["max-0"].content == biggest
                    assert by_id["max-2"].content == with_meta
                    assert by_id["max-2"].metadata == meta

                delivered = await asyncio.wait_for(take(live, n), 20)
                assert [m.seq for m in delivered] == list(range(1, n + 1))
                assert delivered[0].content in (biggest, with_meta)
                replayed = await asyncio.wait_for(take(clients[2].subscribe("big", 0), n), 20)
                assert [(m.seq, m.content) for m in replayed] == [
                    (m.seq, m.content) for m in history
                ]
            finally:
                for client in clients:
                    await client.close()

            # The CLI reads them all, page by page.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ctxstore", "client", "--target", targets[1],
                "read", "big", stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0
            lines = [json.loads(line) for line in out.splitlines()]
            assert [m["seq"] for m in lines] == list(range(1, n + 1))
        finally:
            await cluster.stop()

    run(main())
