"""End to end: real ``ctxstore serve`` processes, the Python client, kill -9 (design §7, 3-4)."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from bench.nodestats import fetch_metrics
from ctxstore.cli import _add_serve
from ctxstore.config import load
from ctxstore.launcher import LocalCluster
from wire.client import Client, ClientError, connect
from wire.placement import group_of
from wire.protocol import Message

pytestmark = pytest.mark.cluster

FAST = ["--tick-ms", "20", "--groups", "64"]  # 64 groups: enough spread, quicker start


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 150) -> None:
    uvloop.run(asyncio.wait_for(coro, timeout_s))


async def read_all(client: Client, session_id: str) -> list[Message]:
    out: list[Message] = []
    while True:
        page = await client.read(session_id, out[-1].seq if out else 0, 1000)
        out += page.messages
        if not page.messages or out[-1].seq >= page.last_seq:
            return out


async def leader_counts(cluster: LocalCluster) -> Counter[int]:
    """How many groups each node leads, from the routing table of the first live node."""
    for target in cluster.targets:
        try:
            client = await connect(target, timeout_s=5, connect_attempts=1)
        except ClientError:
            continue
        try:
            routes = await client.get_routes()
        finally:
            await client.close()
        return Counter(lead for lead in routes.leaders if lead)
    raise AssertionError("no node answered")


def test_a_local_cluster_runs_the_inline_wal_writer_unless_its_flags_say_otherwise(
    tmp_path: Path,
) -> None:
    """Its nodes share this machine's cores (ctxstore/launcher.py); a later flag wins."""

    def writer(cluster: LocalCluster) -> str:
        parser = argparse.ArgumentParser()
        _add_serve(parser.add_subparsers(dest="command"))
        args = parser.parse_args(cluster.args(1)[3:])  # after "python -m ctxstore"
        return load(flags={"wal_writer": args.wal_writer}, environ={}).wal_writer

    assert writer(LocalCluster(3, str(tmp_path))) == "inline"
    assert writer(LocalCluster(3, str(tmp_path), extra_args=["--wal-writer", "thread"])) == "thread"
    assert writer(LocalCluster(3, str(tmp_path), wal_writer="thread")) == "thread"


@pytest.mark.parametrize("wal_writer", ["inline", "thread"])
def test_a_single_node_keeps_everything_across_restarts_and_kill_9(
    tmp_path: Path, wal_writer: str
) -> None:
    async def main() -> None:
        cluster = LocalCluster(1, str(tmp_path), extra_args=FAST, wal_writer=wal_writer)
        await cluster.start()
        try:
            # The launcher gives every node its ops port.
            metrics = await fetch_metrics(cluster.children[1].ops_target)
            assert metrics["ctxstore_raft_groups"] == metrics["ctxstore_raft_groups_led"] == 64
            async with await connect(cluster.targets) as c:
                await c.create_session("alice", "bot", {"topic": "x"}, "s1")
                for i in range(100):
                    await c.append("s1", f"m{i}")
            await cluster.stop_node(1)  # SIGTERM
            await cluster.start_node(1)
            async with await connect(cluster.targets) as c:
                assert [m.content for m in await read_all(c, "s1")] == [f"m{i}" for i in range(100)]
                ack = await c.append("s1", "after restart")
                assert ack.seq == 101
            cluster.kill(1)
            await cluster.wait_exit(1)
            await cluster.start_node(1)
            async with await connect(cluster.targets) as c:
                history = await read_all(c, "s1")
                assert [m.seq for m in history] == list(range(1, 102))
                assert (await c.get_session("s1")).session.metadata == {"topic": "x"}
        finally:
            await cluster.stop()

    run(main())


@pytest.mark.parametrize("wal_writer", ["inline", "thread"])
def test_concurrent_appends_survive_kill_9_of_the_busiest_leader(
    tmp_path: Path, wal_writer: str
) -> None:
    """50 clients x 200 appends over 20 sessions on 3 nodes (the leaders batch appends); the
    node leading the most groups is killed mid-load and restarted.  Every acknowledged append
    is in every node's history exactly once, at its acknowledged seq; seqs are 1..n per
    session; each client's acks in a session increase."""
    sessions = [f"sess-{i}" for i in range(20)]
    clients_n, per_client = 50, 200

    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path), extra_args=FAST, wal_writer=wal_writer)
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                for sid in sessions:
                    await c.create_session("user", "agent", {}, sid)
            acks: list[tuple[str, int, str, int]] = []  # session, seq, content, client
            progress = [0]

            async def writer(k: int) -> None:
                rng = random.Random(k)
                targets = cluster.targets[k % 3 :] + cluster.targets[: k % 3]
                client = await connect(targets, timeout_s=5, backoff_max_s=0.5)
                try:
                    for i in range(per_client):
                        sid = rng.choice(sessions)
                        content = f"c{k}-{i}"
                        ack = await append_until_acked(client, sid, content, f"{k}-{i}")
                        acks.append((sid, ack, content, k))
                        progress[0] += 1
                finally:
                    await client.close()

            tasks = [asyncio.create_task(writer(k)) for k in range(clients_n)]
            while progress[0] < clients_n * per_client // 3:
                await asyncio.sleep(0.01)
            # The leaders took several appends of a group per loop pass into one entry
            # (ctxstore/router.py): the kill below hits batches in flight too.
            scrapes = [await fetch_metrics(n.ops_target) for n in cluster.children.values()]
            assert sum(m["ctxstore_appends_batched_total"] for m in scrapes) > 0
            victim = (await leader_counts(cluster)).most_common(1)[0][0]
            cluster.kill(victim)
            killed_at = time.monotonic()
            await cluster.wait_exit(victim)
            await asyncio.gather(*tasks)
            print(f"load finished {time.monotonic() - killed_at:.1f} s after the kill")
            await cluster.start_node(victim)

            by_session: dict[str, dict[int, str]] = defaultdict(dict)
            for sid, seq, content, _ in acks:
                assert seq not in by_session[sid], f"{sid} seq {seq} acknowledged twice"
                by_session[sid][seq] = content
            per_client_seqs: dict[tuple[int, str], list[int]] = defaultdict(list)
            for sid, seq, _, k in acks:
                per_client_seqs[k, sid].append(seq)
            assert all(seqs == sorted(seqs) for seqs in per_client_seqs.values())
            assert len(acks) == clients_n * per_client

            histories = []
            for target in cluster.targets:
                async with await connect(target, connect_attempts=5) as c:
                    histories.append({sid: await read_all(c, sid) for sid in sessions})
            for sid in sessions:
                first = histories[0][sid]
                assert [m.seq for m in first] == list(range(1, len(first) + 1)), sid
                assert {m.seq: m.content for m in first} == by_session[sid], sid
                contents = [m.content for m in first]
                assert len(contents) == len(set(contents)), f"{sid}: a message stored twice"
                for other in histories[1:]:
                    assert other[sid] == first, f"{sid}: replicas disagree"
        finally:
            await cluster.stop()

    run(main())


async def append_until_acked(client: Client, sid: str, content: str, msg_id: str) -> int:
    """Retry with the same client_msg_id until acknowledged (a deduplicated retry returns the
    original seq)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return (await client.append(sid, content, client_msg_id=msg_id)).seq
        except ClientError as e:
            if not e.retryable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_tokens_are_required_when_configured(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = LocalCluster(
            1,
            str(tmp_path),
            extra_args=[*FAST, "--token", "t-1", "--secret", "a-test-cluster-secret"],
        )
        await cluster.start()
        try:
            with pytest.raises(ClientError) as e:
                await connect(cluster.targets, token="wrong", connect_attempts=1)
            assert e.value.code == "unauthorized"
            with pytest.raises(ClientError) as e:
                await connect(cluster.targets, connect_attempts=1)
            assert e.value.code == "unauthorized"
            async with await connect(cluster.targets, token="t-1") as c:
                await c.ping()
        finally:
            await cluster.stop()

    run(main())


def test_without_a_quorum_writes_fail_retryably_then_succeed_once_it_returns(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path), extra_args=FAST)
        await cluster.start()
        try:
            async with await connect(cluster.targets[0]) as c:
                await c.create_session("u", "a", {}, "lonely")
                await c.append("lonely", "before")
                for i in (2, 3):
                    cluster.kill(i)
                    await cluster.wait_exit(i)
                with pytest.raises(ClientError) as e:
                    await c.append("lonely", "no quorum", client_msg_id="nq")
                assert e.value.code in ("unavailable", "timeout") and e.value.retryable
                for i in (2, 3):
                    await cluster.start_node(i, wait=False)
                await cluster.wait_ready(60)
                ack = await append_until_acked(c, "lonely", "no quorum", "nq")
                history = [m.content for m in await read_all(c, "lonely")]
                assert history == ["before", "no quorum"] and ack == 2
        finally:
            await cluster.stop()

    run(main())


def test_a_subscriber_at_a_follower_gets_each_message_as_soon_as_one_at_the_leader(
    tmp_path: Path,
) -> None:
    """A node pushes a message to its subscribers when it applies it, and a follower applies
    what it knows committed.  With the default 50-ms tick, heartbeats are ~100 ms apart: a
    follower of an idle session learnt the commit from the next one (~96 ms after the ack,
    every time), until the leaders' commit notices (docs/raft.md) told it in the same pass."""

    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path), extra_args=["--groups", "64"])
        await cluster.start()
        try:
            async with await connect(cluster.targets) as c:
                await c.create_session("u", "a", {}, "s")
                routes = await c.get_routes()
                leader = routes.leaders[group_of("s", len(routes.leaders))]
                follower = next(i for i in cluster.children if i != leader)
                first = (await c.append("s", "first")).seq
                lags: list[float] = []
                f = await connect(cluster.children[follower].target)
                async with f, f.subscribe("s", after_seq=first) as sub:
                    items = sub.__aiter__()
                    for i in range(12):
                        await asyncio.sleep(0.15)  # (the group goes idle between them)
                        await c.append("s", f"m{i}")
                        acked = time.monotonic()
                        item = await items.__anext__()
                        assert isinstance(item, Message) and item.content == f"m{i}"
                        lags.append(time.monotonic() - acked)
                lags.sort()
                assert lags[len(lags) // 2] < 0.02, lags  # a heartbeat's: ~0.096 each
        finally:
            await cluster.stop()

    run(main())
