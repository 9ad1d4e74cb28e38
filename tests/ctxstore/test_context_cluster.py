"""Context windows on a real 3-node cluster: racing compactions, every replica's window alike,
kill -9 and restart, a window brought to a returning node by InstallSnapshot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from bench.nodestats import fetch_metrics
from ctxstore.launcher import LocalCluster
from wire.client import ClientError, connect
from wire.protocol import Context, Manual, NewMessage

from .test_e2e import FAST, append_until_acked, run

pytestmark = pytest.mark.cluster
T = TypeVar("T")


def shape(c: Context) -> tuple[object, ...]:
    return (
        c.version, c.token_count, c.needs_compaction, c.window_first_seq, c.last_seq,
        [(s.from_seq, s.to_seq, s.count, s.compacted) for s in c.segments],
        [(m.seq, m.role, m.content, m.token_count) for m in c.messages],
    )  # fmt: skip


async def windows(cluster: LocalCluster, session_id: str, nodes: list[int]) -> list[Context]:
    """The window as each node serves it (each behind its own ReadIndex barrier)."""
    out = []
    for i in nodes:
        async with await connect(cluster.targets[i - 1], connect_attempts=10) as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    out.append(await c.get_context(session_id))
                    break
                except ClientError as e:  # a node just back: no leader known yet
                    assert e.retryable and time.monotonic() < deadline, e
                    await asyncio.sleep(0.2)
    return out


async def retried(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` again while it fails retryably (a leader change on a busy machine); every
    call retried here is idempotent or a read."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await call()
        except ClientError as e:
            if not e.retryable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_racing_compactions_one_wins_and_every_replica_keeps_the_same_window(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        args = [*FAST, "--snapshot-entries", "40"]
        cluster = LocalCluster(3, str(tmp_path), extra_args=args)
        await cluster.start()
        try:
            clients = [await connect(t) for t in cluster.targets]
            a, b = clients[0], clients[1]
            await retried(lambda: a.create_session("u", "agent", {}, "s"))
            await retried(lambda: a.set_context_config("s", 200, Manual(), 0.5))
            for i in range(1, 21):
                await append_until_acked(
                    clients[i % 3], "s", f"turn {i}: some words to count", f"t{i}"
                )
            before = await retried(lambda: a.get_context("s"))
            assert before.needs_compaction
            # Two summarisers on two nodes compact the same range from the same version.
            summaries = [
                NewMessage("system", "summary", f"summary by {who}", None, {}, None)
                for who in ("a", "b")
            ]
            outcomes = await asyncio.gather(
                a.compact("s", 1, 15, [summaries[0]], if_version=before.version),
                b.compact("s", 1, 15, [summaries[1]], if_version=before.version),
                return_exceptions=True,
            )
            won = [o for o in outcomes if not isinstance(o, BaseException)]
            lost = [o for o in outcomes if isinstance(o, ClientError) and o.code == "conflict"]
            unknown = [o for o in outcomes if isinstance(o, ClientError) and o.retryable]
            assert len(won) <= 1 and len(won) + len(lost) + len(unknown) == 2, outcomes
            for w in won:
                assert w.version == before.version + 1
            for e in lost:  # what the loser was told is the winner's version
                assert e.details["version"] == before.version + 1
            after = await windows(cluster, "s", [1, 2, 3])
            assert after[0].version == before.version + 1  # exactly one compaction applied
            assert len({repr(shape(w)) for w in after}) == 1, [shape(w) for w in after]
            first = after[0]
            assert first.messages[0].content in ("summary by a", "summary by b")
            assert [(s.from_seq, s.to_seq, s.compacted) for s in first.segments] == [
                (1, 15, True),
                (16, 20, False),
            ]
            history = await retried(lambda: a.read("s", 0, 100))
            assert len(history.messages) == 20  # untouched

            # kill -9 a node; the others go on (more appends: snapshots, log compaction)
            cluster.kill(3)
            await cluster.wait_exit(3)
            await clients[2].close()
            for i in range(21, 121):  # retried: a forward to node 3 may have died with it
                await append_until_acked(clients[i % 2], "s", f"turn {i}", f"t{i}")
            later = NewMessage("assistant", "summary", "later", None, {}, 3)
            # no guard: a retry after an unknown outcome finds the same range, replaces it again
            await retried(lambda: clients[0].compact("s", 16, 40, [later]))
            # back, node 3 is far behind a compacted log: it gets the window by snapshot
            await cluster.start_node(3)
            latest = await windows(cluster, "s", [1, 2, 3])
            assert len({repr(shape(w)) for w in latest}) == 1, [shape(w) for w in latest]
            scrape = await fetch_metrics(cluster.children[3].ops_target)
            received = sum(v for k, v in scrape.items() if k.startswith(
                "ctxstore_peer_snapshots_total") and 'event="received"' in k)  # fmt: skip
            assert received >= 1, "node 3 caught up without a snapshot: the test proves less"
            assert [(s.from_seq, s.to_seq, s.compacted) for s in latest[2].segments][:2] == [
                (1, 15, True),
                (16, 40, True),
            ]
            assert latest[2].last_seq == 120
            # and a full restart of every node (kill -9) keeps it too
            for i in (1, 2, 3):
                cluster.kill(i)
                await cluster.wait_exit(i)
            for c in clients[:2]:
                await c.close()
            for i in (1, 2, 3):
                await cluster.start_node(i, wait=False)
            await cluster.wait_ready(60)
            again = await windows(cluster, "s", [1, 2, 3])
            assert {repr(shape(w)) for w in again} == {repr(shape(latest[0]))}
        finally:
            await cluster.stop()

    run(main(), 240)
