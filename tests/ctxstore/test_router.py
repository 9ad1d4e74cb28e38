"""ctxstore/router.py's append batches, on a real single-node stack (WAL, MultiRaft, Driver,
ConversationState): the appends a leader takes for one group within one loop iteration are
proposed as one entry, and each still gets its own seq, dedupe and answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import msgspec
import uvloop

from ctxstore import commands
from ctxstore.peer_messages import ChunkRelay, Forward, ForwardReply, decode_envelope
from ctxstore.router import GroupMoved, RouteError, Router, RouterConfig
from ctxstore.state import ConversationState
from raft import ProposalDropped
from raft.core import Config
from raft.driver import Driver, DriverConfig
from raft.multi import HostConfig, MultiRaft
from raft.wal import WAL

GROUP = 0
T0 = 1_700_000_000_000


def append(sid: str, content: str, cmid: str | None = None, **kw: Any) -> bytes:
    cmd = commands.Append(sid, "user", "u", "text", content, {}, cmid, kw.pop("expected", None),
                          None, T0, **kw)  # fmt: skip
    return commands.encode_command(cmd)


def run(path: Path, body: Callable[[Router], Coroutine[Any, Any, None]], **config: Any) -> None:
    """``body(router)`` with one node leading group 0, which holds sessions "a" and "b"."""

    async def main() -> None:
        wal = WAL.open(path / "wal", segment_bytes=1 << 20, preallocate=False, inline=True)
        host = MultiRaft(HostConfig(Config(1, election_ticks=10, seed=3)))
        driver = Driver(host, wal, ConversationState(), DriverConfig(tick_s=0.01))
        driver.add_groups([GROUP], (1,))
        router = Router(1, driver, RouterConfig(**config))
        driver.before_pass = router.propose_batches
        await driver.start()
        router.start()
        try:
            while driver.leader(GROUP) != 1:
                await asyncio.sleep(0.01)
            for sid in ("a", "b"):
                create = commands.CreateSession(sid, "u", "bot", {}, T0)
                await router.submit(GROUP, commands.encode_command(create))
            await asyncio.wait_for(body(router), 10)
        finally:
            router.stop()
            await driver.stop()
            wal.close()

    uvloop.run(main())


def submit_all(router: Router, datas: list[bytes], append: bool = True) -> list[Any]:
    """Submit every command in this loop iteration; their futures."""
    futures = []
    for data in datas:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        router.submit_then(GROUP, data, answer(fut), append)
        futures.append(fut)
    return futures


def answer(fut: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
    """A callback resolving ``fut`` with the result, or with the error (not raising it)."""

    def done(result: Any, exc: BaseException | None) -> None:
        fut.set_result(exc if exc is not None else result)

    return done


def test_one_entry_for_the_appends_of_a_pass_each_with_its_own_answer(tmp_path: Path) -> None:
    async def body(router: Router) -> None:
        datas = [append("a", "x1", "m1"), append("b", "y1"), append("a", "x2", "m2"),
                 append("a", "x1", "m1"),  # a retry in the same batch: deduped
                 append("a", "x3", "m1"),  # the same id, other content: refused
                 append("nope", "z"), append("a", "x4", expected=2)]  # fmt: skip
        results = await asyncio.gather(*submit_all(router, datas))
        assert (router.batches_proposed, router.appends_batched) == (1, 7)
        assert results[:4] == [
            commands.Appended(1, T0, False), commands.Appended(1, T0, False),
            commands.Appended(2, T0, False), commands.Appended(1, T0, True),
        ]  # fmt: skip
        assert [(r.code, r.details) for r in results[4:6]] == [("conflict", {"seq": 1}),
                                                               ("not_found", {})]  # fmt: skip
        assert results[6] == commands.Appended(3, T0, False)  # expected_seq saw the two before

    run(tmp_path, body)


def test_a_command_after_appends_is_proposed_after_them(tmp_path: Path) -> None:
    async def body(router: Router) -> None:
        first = submit_all(router, [append("a", "1"), append("a", "2")])
        # Not an append for the router (as the agents' DispatchEnd): proposed at once, after
        # the waiting appends of its group, so its expected_seq sees them.
        then = submit_all(router, [append("a", "3", expected=2)], append=False)
        results = await asyncio.gather(*first, *then)
        assert [r.seq for r in results] == [1, 2, 3]
        assert router.batches_proposed == 1

    run(tmp_path, body)


def test_batches_stay_within_their_count_and_bytes(tmp_path: Path) -> None:
    async def by_count(router: Router) -> None:
        results = await asyncio.gather(
            *submit_all(router, [append("a", f"{i}") for i in range(10)])
        )
        assert [r.seq for r in results] == list(range(1, 11))
        assert (router.batches_proposed, router.appends_batched) == (3, 10)  # 4 + 4 + 2

    run(tmp_path / "count", by_count, batch_appends_max=4)
    size = len(append("a", "x" * 100))

    async def by_bytes(router: Router) -> None:
        datas = [append("a", "x" * 100) for _ in range(7)]
        results = await asyncio.gather(*submit_all(router, datas))
        assert [r.seq for r in results] == list(range(1, 8))
        assert (router.batches_proposed, router.appends_batched) == (2, 6)  # 3 + 3, 1 alone

    limit = 3 * size + commands.APPEND_BATCH_OVERHEAD_BYTES
    run(tmp_path / "bytes", by_bytes, entry_bytes_max=limit)

    async def off(router: Router) -> None:
        results = await asyncio.gather(*submit_all(router, [append("a", f"{i}") for i in range(5)]))
        assert [r.seq for r in results] == list(range(1, 6))
        assert router.batches_proposed == 0

    run(tmp_path / "off", off, batch_appends_max=1)


def test_requests_waiting_for_a_leader_fail_at_once_when_their_group_leaves(
    tmp_path: Path,
) -> None:
    """A group moved away (its replica here retired: ``Driver.remove_group``) while requests
    waited for its leader: they fail ``unavailable`` (retryable) at once, later ones too, and
    the router's sweep goes on answering the other groups' requests by their deadlines.  (It
    used to die of a KeyError looking up the gone group's leader: from then on no request of
    the node had a deadline, and its client waited until its own timeout.)  Likewise for a
    group still hosted here but placed elsewhere (moving away) with no leader known here."""

    async def main() -> None:
        wal = WAL.open(tmp_path / "wal", segment_bytes=1 << 20, preallocate=False, inline=True)
        host = MultiRaft(HostConfig(Config(1, election_ticks=10, seed=3)))
        driver = Driver(host, wal, ConversationState(), DriverConfig(tick_s=0.01))
        driver.add_groups([0, 1, 2], (1, 2))  # node 2 never answers: no leader, ever
        router = Router(1, driver, RouterConfig(leader_wait_s=0.5, request_timeout_s=2.0))
        driver.before_pass = router.propose_batches
        await driver.start()
        router.start()
        loop = asyncio.get_running_loop()
        try:
            waiting = submit_all(router, [append("a", "x")])[0]
            reading = router.barrier(0)
            other = [router.submit(1, append("b", "y")), router.barrier(1)]
            leaving = router.submit(2, append("c", "w"))
            await asyncio.sleep(0.1)
            assert not waiting.done() and not reading.done() and not leaving.done()
            t0 = loop.time()
            await driver.remove_group(0)
            moved = [await asyncio.wait_for(waiting, 1.0)]
            moved += await asyncio.gather(reading, return_exceptions=True)
            assert loop.time() - t0 < 0.5, "not at once"
            moved += await asyncio.gather(router.barrier(0), router.submit(0, append("a", "z")),
                                          return_exceptions=True)  # fmt: skip
            assert [(e.code, "moved" in str(e)) for e in moved] == [("unavailable", True)] * 4
            assert router.group_gone == 4
            # Group 2 is placed elsewhere now (moving away) and has no leader here: its
            # waiting request fails at once, and so does a new one.
            router.placed = lambda group: group != 2
            t0 = loop.time()
            later = router.submit(2, append("c", "v"))
            moving = await asyncio.wait_for(
                asyncio.gather(leaving, later, return_exceptions=True), 1.0
            )
            assert loop.time() - t0 < 0.5, "not at once"
            assert [(e.code, "moving" in str(e)) for e in moving] == [("unavailable", True)] * 2
            # Group 1's requests still end by leader_wait_s, as before (the sweep runs).
            done = await asyncio.wait_for(asyncio.gather(*other, return_exceptions=True), 1.5)
            assert [e.code for e in done] == ["unavailable"] * 2
        finally:
            router.stop()
            await driver.stop()
            wal.close()

    uvloop.run(main())


class _LeavingDriver:
    """The router's driver for ``test_only_what_was_never_proposed_here_may_be_handed_on``:
    this node leads group 0 until a proposal of it is dropped, which is also when the group
    leaves the node (a leader removed from the group, its entry replaced)."""

    def __init__(self) -> None:
        self.host = {0: None, 1: None}
        self.proposals = 0

    def leader(self, group: int) -> int:
        return 1 if group == 0 else 0  # (group 1: no leader known)

    def kick(self) -> None:
        pass

    def propose_then(self, group: int, data: bytes, done: Callable[..., None]) -> None:
        self.proposals += 1
        del self.host[group]
        done(None, ProposalDropped("replaced by a new leader's entry"))

    def read_index_then(self, group: int, done: Callable[..., None], _: object) -> None:
        raise AssertionError("no leader: no barrier asked")


def test_only_what_was_never_proposed_here_may_be_handed_on() -> None:
    """A request whose group left (or is leaving) fails ``GroupMoved`` (its caller may relay it
    to the group's replicas) only if nothing of it was proposed here: a read, or a write that
    only waited; a write proposed here, dropped, then re-routed after the group left fails a
    plain ``unavailable``, as before (``client_msg_id`` retries stay the client's call)."""

    async def main() -> None:
        driver = _LeavingDriver()
        router = Router(1, cast(Driver, driver), RouterConfig(batch_appends_max=1))
        router.placed = lambda group: group != 1
        router.start()
        try:
            proposed = router.submit(0, append("a", "x"))
            waited = [router.submit(1, append("b", "y")), router.barrier(1)]
            results = await asyncio.wait_for(
                asyncio.gather(proposed, *waited, return_exceptions=True), 1.0
            )
            assert driver.proposals == 1
            assert [(type(e), e.code) for e in results] == [
                (RouteError, "unavailable"), (GroupMoved, "unavailable"),
                (GroupMoved, "unavailable"),
            ]  # fmt: skip
            assert router.group_gone == 3
        finally:
            router.stop()

    uvloop.run(main())


class _SendRecorder:
    """A transport that keeps what the router sends to its peers."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def send_app(self, peer: int, data: bytes) -> bool:
        self.sent.append((peer, data))
        return True


def test_a_forward_for_a_group_not_hosted_here_is_sent_back_to_be_re_routed() -> None:
    """A peer whose view is behind forwards a request for a group that moved away from this
    node: nothing is proposed, and the answer is ``not_leader`` (the origin re-routes it, as
    for a leader that stepped down), not an error the client would see."""
    driver = _LeavingDriver()
    del driver.host[0]  # group 0 left this node
    router = Router(1, cast(Driver, driver), RouterConfig())
    transport = _SendRecorder()
    router.transport = cast(Any, transport)
    router._serve(2, Forward(7, 0, append("a", "x"), True))
    [(peer, data)] = transport.sent
    reply = decode_envelope(data)
    assert peer == 2 and isinstance(reply, ForwardReply)
    assert (reply.fid, reply.code, reply.result) == (7, "not_leader", b"")
    assert "not hosted here" in reply.message and driver.proposals == 0


def test_a_chunk_relay_and_its_older_shape_decode_both_ways() -> None:
    """``ChunkRelay.more`` (the rest of one read's chunks) is appended with a default: a relay
    from an older node (four fields) decodes with none, and an older node decoding a newer
    relay (its four fields) still gets the first chunk."""

    class OldChunkRelay(msgspec.Struct, array_like=True, tag=30):
        session_id: str
        trigger_seq: int
        attempt: int
        chunk: dict[str, Any]

    first, second = {"type": "text-delta", "id": "t", "delta": "a"}, {"type": "finish"}
    old = decode_envelope(msgspec.msgpack.encode(OldChunkRelay("s", 3, 1, first)))
    assert old == ChunkRelay("s", 3, 1, first, [])
    new = msgspec.msgpack.encode(ChunkRelay("s", 3, 1, first, [second]))
    assert decode_envelope(new) == ChunkRelay("s", 3, 1, first, [second])
    assert msgspec.msgpack.decode(new, type=OldChunkRelay) == OldChunkRelay("s", 3, 1, first)
