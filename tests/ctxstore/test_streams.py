"""Subscriptions, inboxes, the local archive, retention and graceful shutdown, end to end on real
``ctxstore serve`` processes (design §4.1, §5.4, §5.7, §6; invariants 3, 5, 7)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from ctxstore.launcher import LocalCluster
from wire.client import Client, ClientError, connect
from wire.protocol import GapEvent, InboxDelta, InboxSnapshot, Message

from .test_e2e import FAST, append_until_acked, leader_counts, read_all, run

pytestmark = pytest.mark.cluster


def cluster_pid(cluster: LocalCluster, i: int) -> int:
    process = cluster.children[i].process
    assert process is not None
    return process.pid


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def append_many(client: Client, sid: str, n: int, start: int = 0, width: int = 256) -> None:
    """``n`` appends to ``sid`` with ``width`` in flight, contents ``m<i>``."""
    sem = asyncio.Semaphore(width)

    async def one(i: int) -> None:
        async with sem:
            await client.append_with_retry(sid, f"m{i}", client_msg_id=f"{sid}-{i}")

    await asyncio.gather(*(one(i) for i in range(start, start + n)))


def test_a_subscriber_resuming_at_random_points_and_across_kill_9_gets_every_seq_once(
    tmp_path: Path,
) -> None:
    """20 writers append to one session on 3 nodes.  A subscriber connected to node 1 closes
    its subscription at random points and subscribes again after the last seq it processed;
    mid-way node 1 is killed (-9) and the client resumes on another node.  It sees every seq
    exactly once, in order, each with the content that was acknowledged at that seq."""
    writers, per_writer = 20, 60

    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path), extra_args=FAST)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                await c.create_session("u", "a", {}, "live")
            acked: dict[int, str] = {}

            async def writer(k: int) -> None:
                targets = cluster.targets[1:] + cluster.targets[:1]  # never through node 1 first
                client = await connect(targets, timeout_s=5, backoff_max_s=0.5)
                try:
                    for i in range(per_writer):
                        content = f"w{k}-{i}"
                        seq = await append_until_acked(client, "live", content, content)
                        assert seq not in acked
                        acked[seq] = content
                        await asyncio.sleep(random.random() * 0.01)
                finally:
                    await client.close()

            seen: list[Message] = []
            rng = random.Random(5)

            async def subscriber() -> None:
                client = await connect(cluster.targets, timeout_s=5, backoff_max_s=0.5)
                last, ended = 0, False
                try:
                    while not ended:
                        async with client.subscribe("live", last) as sub:
                            stop_after = rng.randint(1, 80)
                            async for item in sub:
                                assert isinstance(item, Message), item  # no retention here
                                seen.append(item)
                                last = item.seq
                                ended = item.content == "end"
                                stop_after -= 1
                                if stop_after == 0 or ended:
                                    break
                finally:
                    await client.close()

            sub_task = asyncio.create_task(subscriber())
            tasks = [asyncio.create_task(writer(k)) for k in range(writers)]
            while len(acked) < writers * per_writer // 3:
                await asyncio.sleep(0.01)
            cluster.kill(1)  # the subscriber's node (first target)
            await cluster.wait_exit(1)
            await asyncio.gather(*tasks)
            async with await connect(cluster.targets[1:]) as c:  # the end mark, seen last
                acked[(await c.append("live", "end")).seq] = "end"
            await asyncio.wait_for(sub_task, 60)
            assert len(acked) == writers * per_writer + 1
            assert [m.seq for m in seen] == list(range(1, len(acked) + 1))
            assert all(acked[m.seq] == m.content for m in seen)
        finally:
            await cluster.stop()

    run(main(), 240)


def test_a_long_history_replays_from_the_archive_with_bounded_memory(tmp_path: Path) -> None:
    """100 000 messages in one session (the hot tail holds 1 000): a replay from 0 streams them
    all, in order, while the node's RSS stays within a bound independent of the history; after a
    cold restart the node serves the same history."""
    total = 100_000

    async def main() -> None:
        args = [*FAST, "--tail-messages-max", "1000", "--snapshot-entries", "20000"]
        cluster = LocalCluster(1, str(tmp_path), extra_args=args)
        await cluster.start()
        try:
            async with await connect(cluster.targets, timeout_s=30) as c:
                await c.create_session("u", "a", {}, "long")
                await append_many(c, "long", total)
            pid = cluster_pid(cluster, 1)
            for attempt in range(2):
                before = rss_bytes(pid)
                peak = before
                async with await connect(cluster.targets, timeout_s=30) as c:
                    expect = 1
                    async with c.subscribe("long", 0, queue_max=2000) as sub:
                        async for item in sub:
                            assert isinstance(item, Message)
                            assert item.seq == expect
                            expect += 1
                            if expect % 5000 == 0:
                                peak = max(peak, rss_bytes(pid))
                            if item.seq == total:
                                break
                    page = await c.read("long", 40_000, 10)  # an old range, from the archive
                    assert [m.seq for m in page.messages] == list(range(40_001, 40_011))
                growth = peak - before
                print(f"replay {attempt}: RSS {before >> 20} MiB -> peak {peak >> 20} MiB")
                # The history alone is ~30 MiB of payload (~70 MiB as objects): none of it stays.
                assert growth < 32 * 1024 * 1024, f"RSS grew {growth >> 20} MiB during replay"
                # The bound holds the o200k_base vocabulary (~63 MiB, ctxstore/tokens.py).
                assert peak < 160 * 1024 * 1024, f"RSS peaked at {peak >> 20} MiB"
                if attempt == 0:
                    await cluster.stop_node(1)
                    await cluster.start_node(1)
                    pid = cluster_pid(cluster, 1)
        finally:
            await cluster.stop()

    run(main(), 300)


def test_inbox_unread_counts_follow_appends_and_mark_read_in_batched_deltas(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        cluster = LocalCluster(1, str(tmp_path), extra_args=FAST)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c, await connect(cluster.targets) as w:
                await w.create_session("ann", "bot", {}, "s1")
                await w.append("s1", "first", "agent", "bot")
                async with c.subscribe_inbox("ann") as inbox:
                    it = aiter(inbox)
                    snap = await anext(it)
                    assert isinstance(snap, InboxSnapshot) and not snap.truncated
                    assert [(e.session_id, e.last_seq, e.unread) for e in snap.entries] == [
                        ("s1", 1, 1)
                    ]
                    assert snap.entries[0].preview == "first"
                    # A few changes: one delta, about 250 ms after the first change.
                    t0 = time.monotonic()
                    for text in ("two", "three"):
                        await w.append("s1", text, "agent", "bot")
                    delta = await anext(it)
                    waited = time.monotonic() - t0
                    assert isinstance(delta, InboxDelta)
                    (e,) = delta.entries
                    assert (e.session_id, e.last_seq, e.unread, e.preview) == ("s1", 3, 3, "three")
                    assert (e.last_sender, e.last_sender_id) == ("agent", "bot")
                    assert 0.15 <= waited < 1.5, waited
                    await w.mark_read("s1", "ann", 2)
                    delta = await anext(it)
                    assert isinstance(delta, InboxDelta)
                    assert [(x.session_id, x.unread) for x in delta.entries] == [("s1", 1)]
                    # Only ann moves her cursor: no delta.
                    with pytest.raises(ClientError) as refused:
                        await w.mark_read("s1", "someone-else", 3)
                    assert (refused.value.code, refused.value.retryable) == ("forbidden", False)
                    # 60 new sessions at once: a delta leaves as soon as 50 are waiting.
                    ids = [f"n{i:02d}" for i in range(60)]
                    await asyncio.gather(*(w.create_session("ann", "bot", {}, i) for i in ids))
                    got: set[str] = set()
                    first = True
                    while got != set(ids):
                        delta = await asyncio.wait_for(anext(it), 5)
                        assert isinstance(delta, InboxDelta)
                        if first:
                            assert len(delta.entries) >= 50 or got
                            first = False
                        got |= {x.session_id for x in delta.entries}
                        assert "s1" not in got
                    assert all(x.unread == 0 for x in delta.entries)
                async with c.subscribe_inbox("ann") as inbox:
                    snap = await anext(aiter(inbox))
                    assert isinstance(snap, InboxSnapshot)
                    assert len(snap.entries) == 61
                    s1 = next(x for x in snap.entries if x.session_id == "s1")
                    assert (s1.last_seq, s1.unread) == (3, 1)
        finally:
            await cluster.stop()

    run(main())


def test_retention_deletes_old_history_and_replays_say_so_with_a_gap(tmp_path: Path) -> None:
    async def main() -> None:
        args = [*FAST, "--tail-messages-max", "50", "--retention-max-messages", "100"]
        cluster = LocalCluster(1, str(tmp_path), extra_args=args)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                await c.create_session("u", "a", {}, "r")
                await append_many(c, "r", 300, width=32)
                items: list[Message | GapEvent] = []
                async with c.subscribe("r", 0) as sub:
                    async for item in sub:
                        items.append(item)
                        if isinstance(item, Message) and item.seq == 300:
                            break
                gap = items[0]
                assert isinstance(gap, GapEvent)
                assert (gap.from_seq, gap.to_seq, gap.reason) == (1, 200, "retention")
                assert [m.seq for m in items[1:] if isinstance(m, Message)] == list(range(201, 301))
                assert len(items) == 101
                # A Read skips the deleted range too (its seqs show where history starts).
                page = await c.read("r", 0, 5)
                assert [m.seq for m in page.messages] == [201, 202, 203, 204, 205]
        finally:
            await cluster.stop()

    run(main())


def test_a_snapshot_installed_on_a_returning_node_brings_the_archive_rows_it_lacks(
    tmp_path: Path,
) -> None:
    """Node 3 is down while 1 500 messages go to one session (the tail holds 50; the log is
    compacted every 100 entries).  Back, it is restored from a leader's snapshot and copies the
    older rows from a peer: it alone then serves the whole history."""

    async def main() -> None:
        args = [*FAST, "--tail-messages-max", "50", "--snapshot-entries", "100"]
        cluster = LocalCluster(3, str(tmp_path), extra_args=args)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                await c.create_session("u", "a", {}, "away")
                await append_many(c, "away", 100, width=16)
            await cluster.stop_node(3)
            async with await connect(cluster.targets[:2]) as c:
                await append_many(c, "away", 1400, start=100, width=32)
            await cluster.start_node(3)
            deadline = time.monotonic() + 30
            async with await connect(cluster.targets[2], connect_attempts=5) as c:
                while True:
                    try:
                        history = await read_all(c, "away")
                        if len(history) == 1500:
                            break
                    except ClientError as e:
                        assert e.code == "unavailable", e  # rows still being copied
                    assert time.monotonic() < deadline, "node 3 never served the history"
                    await asyncio.sleep(0.2)
            assert sorted(m.content for m in history) == sorted(f"m{i}" for i in range(1500))
        finally:
            await cluster.stop()

    run(main(), 200)


def test_sigterm_hands_leadership_over_and_exits_cleanly_without_losing_acks(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path), extra_args=FAST)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                for i in range(8):
                    await c.create_session("u", "a", {}, f"t{i}")
            acked: list[tuple[str, int]] = []
            stop = asyncio.Event()

            async def writer(k: int) -> None:
                client = await connect(cluster.targets[::-1], timeout_s=5, backoff_max_s=0.3)
                i = 0
                try:
                    while not stop.is_set():
                        sid = f"t{(k + i) % 8}"
                        seq = await append_until_acked(client, sid, f"{k}-{i}", f"{k}-{i}")
                        acked.append((sid, seq))
                        i += 1
                finally:
                    await client.close()

            tasks = [asyncio.create_task(writer(k)) for k in range(8)]
            await asyncio.sleep(1.0)
            victim = (await leader_counts(cluster)).most_common(1)[0][0]
            proc = cluster.children[victim].process
            assert proc is not None
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 12)
            took = time.monotonic() - t0
            print(f"node {victim} stopped in {took:.2f} s")
            assert code == 0 and took < 10
            counts = await leader_counts(cluster)
            assert victim not in counts
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
            await cluster.start_node(victim)
            async with await connect(cluster.targets[victim - 1], connect_attempts=5) as c:
                for sid in {s for s, _ in acked}:
                    history = await read_all(c, sid)
                    seqs = sorted(q for s, q in acked if s == sid)
                    assert [m.seq for m in history][: len(seqs)] == seqs
        finally:
            await cluster.stop()

    run(main(), 120)


def test_the_cli_tails_a_session_with_its_gaps_and_follows_an_inbox(tmp_path: Path) -> None:
    async def cli(target: str, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ctxstore", "client", "--target", target, *args,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def main() -> None:
        args = [*FAST, "--retention-max-messages", "3"]
        cluster = LocalCluster(1, str(tmp_path), extra_args=args)
        await cluster.start()
        target = cluster.targets[0]
        try:
            async with await connect(target) as c:
                await c.create_session("bo", "a", {}, "cli")
                for i in range(5):
                    await c.append("cli", f"line {i}")
                tail = await cli(target, "tail", "cli", "--count", "4")
                inbox = await cli(target, "inbox", "bo", "--count", "1")
                assert tail.stdout is not None and inbox.stdout is not None
                first = json.loads(await asyncio.wait_for(tail.stdout.readline(), 10))
                assert first == {"gap": {"from_seq": 1, "to_seq": 2, "reason": "retention"}}
                for seq in (3, 4, 5):
                    line = json.loads(await asyncio.wait_for(tail.stdout.readline(), 10))
                    assert (line["seq"], line["content"]) == (seq, f"line {seq - 1}")
                snap = json.loads(await asyncio.wait_for(inbox.stdout.readline(), 10))
                assert [e["session_id"] for e in snap["snapshot"]] == ["cli"]
                assert snap["snapshot"][0]["unread"] == 0  # bo's own messages
                assert snap["truncated"] is False
                await c.append("cli", "live")  # the 4th message for tail, a delta for inbox
                line = json.loads(await asyncio.wait_for(tail.stdout.readline(), 10))
                assert (line["seq"], line["content"]) == (6, "live")
                delta = json.loads(await asyncio.wait_for(inbox.stdout.readline(), 10))
                assert delta["delta"][0]["last_seq"] == 6 and delta["delta"][0]["preview"] == "live"
                assert await asyncio.wait_for(tail.wait(), 10) == 0
                assert await asyncio.wait_for(inbox.wait(), 10) == 0
        finally:
            await cluster.stop()

    run(main())


def test_a_restart_with_a_smaller_hot_tail_keeps_every_message(tmp_path: Path) -> None:
    """Messages the restored snapshot's tails lose under smaller limits go to the archive."""

    async def main() -> None:
        base = [*FAST, "--snapshot-entries", "10"]
        cluster = LocalCluster(1, str(tmp_path), extra_args=[*base, "--tail-messages-max", "500"])
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                await c.create_session("u", "a", {}, "shrink")
                await append_many(c, "shrink", 300, width=8)
            await asyncio.sleep(0.5)  # the last snapshot (tails of 300) is written once archived
            await cluster.stop_node(1)
            cluster.extra_args = [*base, "--tail-messages-max", "5"]
            await cluster.start_node(1)
            async with await connect(cluster.targets) as c:
                history = await read_all(c, "shrink")
                assert [m.seq for m in history] == list(range(1, 301))
                page = await c.read("shrink", 10, 3)  # far below the new tail: the archive
                assert [m.seq for m in page.messages] == [11, 12, 13]
        finally:
            await cluster.stop()

    run(main())
