"""The Python client (``wire.client``) against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Callable

import pytest

from wire.aio import Connection, Reply, Server, serve
from wire.client import Client, append_message, connect, expect_response, parse_targets
from wire.errors import ClientError
from wire.protocol import (
    Append,
    Appended,
    Error,
    Messages,
    Pong,
    ReadMarked,
    Request,
    Response,
    SessionInfo,
    SessionList,
    Subscribe,
    SubscriptionClosed,
    error,
)

from .helpers import LOOP_IDS, LOOPS, StoreHandler, run, wait_until
from .test_subscriptions import FeedHandler, seqs, take

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
FAST = {"backoff_min_s": 0.01, "backoff_max_s": 0.05, "connect_timeout_s": 1.0}


def target(server: Server) -> str:
    host, port = server.address
    return f"{host}:{port}"


def dead_target() -> str:
    """An address nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def client_and_server(
    handler: StoreHandler | None = None, **kw: object
) -> tuple[Client, Server, StoreHandler]:
    handler = handler or StoreHandler()
    server = await serve(handler)
    return await connect(target(server), **kw, **FAST), server, handler  # type: ignore[arg-type]


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_every_operation_returns_its_response(loop: LoopFactory) -> None:
    async def main() -> None:
        client, server, _ = await client_and_server()
        async with client, server:
            assert client.welcome is not None and client.welcome.cluster_id == "cluster-test"
            created = await client.create_session("u-1", "agent-1", {"t": 1}, session_id="s-1")
            assert isinstance(created, SessionInfo) and created.session.id == "s-1"
            ack = await client.append("s-1", "hello", client_msg_id="m-1", token_count=2)
            assert ack == Appended(ack.rid, 1, 2, False)
            again = await client.append("s-1", "hello", client_msg_id="m-1")
            assert (again.seq, again.deduped) == (1, True)
            await client.append("s-1", "there", sender="agent", sender_id="agent-1", kind="k")
            got = await client.get_session("s-1")
            assert got.session.last_seq == 2
            listed = await client.list_sessions("u-1", limit=10)
            assert isinstance(listed, SessionList) and [s.id for s in listed.sessions] == ["s-1"]
            read = await client.read("s-1", after_seq=1, limit=10)
            assert isinstance(read, Messages) and [m.content for m in read.messages] == ["there"]
            assert read.messages[0].sender == "agent"
            marked = await client.mark_read("s-1", "u-1", 2)
            assert isinstance(marked, ReadMarked) and marked.seq == 2
            assert isinstance(await client.ping(), Pong)

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_errors_raise_client_error_with_the_stable_code(loop: LoopFactory) -> None:
    async def main() -> None:
        client, server, _ = await client_and_server()
        async with client, server:
            with pytest.raises(ClientError) as info:
                await client.get_session("nope")
            assert (info.value.code, info.value.retryable) == ("not_found", False)
            assert info.value.details == {"session_id": "nope"}
            await client.create_session("u", "a", session_id="s")
            with pytest.raises(ClientError) as info:
                await client.append("s", "x", expected_seq=5)
            assert info.value.code == "conflict" and info.value.details == {"last_seq": 0}
            with pytest.raises(ClientError) as info:
                await client.read("s", limit=0)  # the server names the field
            assert info.value.code == "bad_request" and info.value.details == {"field": "limit"}
            assert isinstance(await client.ping(), Pong)  # the connection is still fine

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_many_requests_in_flight_answered_out_of_order(loop: LoopFactory) -> None:
    async def main() -> None:
        client, server, handler = await client_and_server()
        async with client, server:
            handler.hold = True
            calls = [
                asyncio.ensure_future(client.append("s", f"m{i}", client_msg_id=f"m{i}"))
                for i in range(500)
            ]
            await wait_until(lambda: len(handler.held) == 500)
            handler.release(reverse=True)  # the last sent is answered first
            acks = await asyncio.gather(*calls)
            assert [a.seq for a in acks] == list(range(500, 0, -1))
            assert len(server.connections) == 1

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_a_lost_connection_fails_requests_and_the_next_call_uses_the_next_target(
    loop: LoopFactory,
) -> None:
    async def main() -> None:
        first_handler, second_handler = StoreHandler(), StoreHandler()
        first = await serve(first_handler)
        second = await serve(second_handler)
        client = await connect([target(first), target(second)], **FAST)  # type: ignore[arg-type]
        async with client, second:
            assert client.target == first.address
            first_handler.hold = True
            in_flight = asyncio.ensure_future(client.append("s", "x", client_msg_id="m-1"))
            await wait_until(lambda: len(first_handler.held) == 1)
            first.close()  # the first node dies
            await first.wait_closed()
            with pytest.raises(ClientError) as info:
                await in_flight
            assert (info.value.code, info.value.retryable) == ("unavailable", True)
            ack = await client.append("s", "x", client_msg_id="m-1")  # retried elsewhere
            assert ack.seq == 1 and client.target == second.address
            assert [type(r) for r in second_handler.seen] == [Append]

    run(main, loop)


def test_connect_skips_dead_targets() -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler) as server:
            client = await connect([dead_target(), dead_target(), target(server)], **FAST)  # type: ignore[arg-type]
            async with client:
                assert client.target == server.address
                assert isinstance(await client.ping(), Pong)

    run(main)


def test_no_target_answering_is_unavailable_after_bounded_attempts() -> None:
    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(ClientError) as info:
            await connect([dead_target(), dead_target()], connect_attempts=6, **FAST)  # type: ignore[arg-type]
        assert (info.value.code, info.value.retryable) == ("unavailable", True)
        assert "6 attempts" in info.value.message
        assert time.monotonic() - started < 2  # two backoffs of at most 50 ms

    run(main)


def test_reconnect_after_all_targets_were_down() -> None:
    async def main() -> None:
        handler = StoreHandler()
        server = await serve(handler)
        host, port = server.address
        client = await connect(target(server), connect_attempts=2, **FAST)  # type: ignore[arg-type]
        server.close()
        await server.wait_closed()
        await wait_until(lambda: client.target is None)
        with pytest.raises(ClientError) as info:
            await client.ping()
        assert info.value.code == "unavailable"
        server = await serve(handler, host, port)  # the node comes back
        async with client, server:
            assert isinstance(await client.ping(), Pong)

    run(main)


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_a_request_without_an_answer_times_out(loop: LoopFactory) -> None:
    async def main() -> None:
        client, server, handler = await client_and_server(timeout_s=0.1)
        async with client, server:
            handler.hold = True
            started = time.monotonic()
            with pytest.raises(ClientError) as info:
                await client.append("s", "x", client_msg_id="m-1")
            assert 0.09 < time.monotonic() - started < 1
            assert (info.value.code, info.value.retryable) == ("timeout", True)
            handler.hold = False
            handler.release()  # the late answer is dropped
            assert isinstance(await client.ping(), Pong)  # the connection is still fine
            ack = await client.append("s", "x", client_msg_id="m-1")
            assert (ack.seq, ack.deduped) == (1, True)  # the timed-out append had landed

    run(main, loop)


def test_the_three_appends_take_append_messages_arguments() -> None:
    expected = list(inspect.signature(append_message).parameters.values())
    for method in (Client.append, Client.append_nowait, Client.append_with_retry):
        self_, *rest = inspect.signature(method).parameters.values()
        assert self_.name == "self" and rest == expected, method.__name__
    request = append_message("s", "x", "agent", metadata={"a": 1}, token_count=3)
    assert request == Append(0, "s", "agent", "", "text", "x", {"a": 1}, None, None, 3)


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_append_nowait_pipelines_on_the_open_connection_only(loop: LoopFactory) -> None:
    async def main() -> None:
        client, server, handler = await client_and_server()
        async with client, server:
            futures = [client.append_nowait("s", f"m{i}", client_msg_id=f"c{i}") for i in range(3)]
            responses = [await f for f in futures if f is not None]
            assert [type(r) for r in responses] == [Appended] * 3
            assert [r.seq for r in responses if isinstance(r, Appended)] == [1, 2, 3]
            assert [r.client_msg_id for r in handler.seen if isinstance(r, Append)] == [
                "c0", "c1", "c2"
            ]  # fmt: skip
            handler.fail = [("conflict", False)]
            refused = client.append_nowait("s", "y")
            assert refused is not None
            error = await refused  # an Error is the future's value, not raised
            assert isinstance(error, Error) and error.code == "conflict"
            server.close()
            # No open connection: nothing is sent (``append`` would reconnect and wait).
            await wait_until(lambda: client.append_nowait("s", "z") is None)
            assert len(handler.seen) == 4

    run(main, loop)


def test_append_with_retry_reuses_its_client_msg_id() -> None:
    async def main() -> None:
        client, server, handler = await client_and_server()
        async with client, server:
            handler.fail = [("unavailable", True), ("timeout", True)]
            ack = await client.append_with_retry("s", "x")
            assert ack.seq == 1
            ids = {r.client_msg_id for r in handler.seen if isinstance(r, Append)}
            assert len(handler.seen) == 3 and len(ids) == 1 and None not in ids
            ack = await client.append_with_retry("s", "y", client_msg_id="given")
            assert handler.seen[-1].client_msg_id == "given"  # type: ignore[union-attr]

    run(main)


def test_append_with_retry_stops_on_errors_that_are_not_retryable() -> None:
    async def main() -> None:
        client, server, handler = await client_and_server()
        async with client, server:
            handler.fail = [("unavailable", True), ("conflict", False)]
            with pytest.raises(ClientError) as info:
                await client.append_with_retry("s", "x")
            assert info.value.code == "conflict" and len(handler.seen) == 2
            handler.fail = [("rate_limited", True)] * 3
            client.append_attempts = 3
            with pytest.raises(ClientError) as info:
                await client.append_with_retry("s", "x")
            assert info.value.code == "rate_limited" and len(handler.seen) == 5

    run(main)


def test_append_with_retry_survives_a_node_dying() -> None:
    async def main() -> None:
        first_handler, second_handler = StoreHandler(), StoreHandler()
        first = await serve(first_handler)
        second = await serve(second_handler)
        client = await connect([target(first), target(second)], **FAST)  # type: ignore[arg-type]
        async with client, second:
            first_handler.hold = True
            call = asyncio.ensure_future(client.append_with_retry("s", "x"))
            await wait_until(lambda: len(first_handler.held) == 1)
            first.close()
            ack = await call
            assert ack.seq == 1 and client.target == second.address
            [held] = [r for _, r in first_handler.held]
            assert held.client_msg_id == second_handler.seen[0].client_msg_id  # type: ignore[union-attr]

    run(main)


def test_a_refused_token_raises_without_trying_other_targets() -> None:
    async def main() -> None:
        first, second = StoreHandler(tokens={"t"}), StoreHandler(tokens={"t"})
        async with await serve(first) as a, await serve(second) as b:
            with pytest.raises(ClientError) as info:
                await connect([target(a), target(b)], token="wrong", **FAST)  # type: ignore[arg-type]
            assert (info.value.code, info.value.retryable) == ("unauthorized", False)
            assert len(b.connections) == 0
            client = await connect([target(a), target(b)], token="t", **FAST)  # type: ignore[arg-type]
            async with client:
                assert isinstance(await client.ping(), Pong)

    run(main)


def test_a_request_over_the_frame_limit_fails_locally() -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler, max_frame_bytes=64 * 1024) as server:
            client = await connect(target(server), **FAST)  # type: ignore[arg-type]
            async with client:
                with pytest.raises(ClientError) as info:
                    await client.append("s", "x" * 70_000)
                assert (info.value.code, info.value.retryable) == ("too_large", False)
                assert handler.seen == []
                assert isinstance(await client.ping(), Pong)

    run(main)


def test_close_fails_calls_in_flight_and_later_calls() -> None:
    async def main() -> None:
        client, server, handler = await client_and_server()
        async with server:
            handler.hold = True
            call = asyncio.ensure_future(client.ping())
            await wait_until(lambda: len(handler.held) == 1)
            await client.close()
            with pytest.raises(ClientError) as info:
                await call
            assert (info.value.code, info.value.retryable) == ("unavailable", False)
            with pytest.raises(ClientError, match="closed"):
                await client.ping()

    run(main)


def test_calls_wait_while_the_socket_is_paused() -> None:
    async def main() -> None:
        client, server, _ = await client_and_server()
        async with client, server:
            conn = client._conn
            assert conn is not None
            conn.pause_writing()
            call = asyncio.ensure_future(client.ping())
            await asyncio.sleep(0.05)
            assert not call.done() and not conn.pending
            conn.resume_writing()
            assert isinstance(await call, Pong)

    run(main)


def test_parse_targets() -> None:
    assert parse_targets("a:1") == [("a", 1)]
    assert parse_targets("a:1, b:2") == [("a", 1), ("b", 2)]
    assert parse_targets(["[::1]:7400", "10.0.0.1:1"]) == [("::1", 7400), ("10.0.0.1", 1)]
    for bad in ["a", "a:", ":1", "a:x", []]:
        with pytest.raises(ValueError):
            parse_targets(bad)  # type: ignore[arg-type]


# -- failover on answers ---------------------------------------------------------------------------


class NoLeaderHandler(StoreHandler):
    """A node cut off from its peers: it answers every request ``unavailable``."""

    def answer(self, request: Request) -> Response:
        return Error(request.rid, "unavailable", "group 7 has no leader", True, {})


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_an_unavailable_answer_sends_the_next_attempt_to_another_target(
    loop: LoopFactory,
) -> None:
    async def main() -> None:
        cut_off, serving = NoLeaderHandler(), StoreHandler()
        first, second = await serve(cut_off), await serve(serving)
        client = await connect([target(first), target(second)], **FAST)  # type: ignore[arg-type]
        async with client, first, second:
            assert client.target == first.address
            started = time.monotonic()
            ack = await client.append_with_retry("s", "x")
            assert ack.seq == 1 and time.monotonic() - started < 1
            assert client.target == second.address
            [tried] = [r for r in cut_off.seen if isinstance(r, Append)]
            [landed] = [r for r in serving.seen if isinstance(r, Append)]
            assert tried.client_msg_id == landed.client_msg_id is not None
            for _ in range(5):  # the cut-off node is suspect: the client stays where it works
                assert isinstance(await client.ping(), Pong)
            assert len(cut_off.seen) == 1 and client.target == second.address
            await wait_until(lambda: not first.connections)  # the node left is let go

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS, ids=LOOP_IDS)
def test_a_plain_call_raises_the_error_and_the_next_one_goes_elsewhere(loop: LoopFactory) -> None:
    async def main() -> None:
        first_handler, second_handler = StoreHandler(), StoreHandler()
        first, second = await serve(first_handler), await serve(second_handler)
        client = await connect([target(first), target(second)], **FAST)  # type: ignore[arg-type]
        async with client, first, second:
            first_handler.hold = True
            held = [client.append_nowait("s", f"m{i}", client_msg_id=f"c{i}") for i in range(3)]
            await wait_until(lambda: len(first_handler.held) == 3)
            first_handler.fail = [("timeout", True)]  # the leader did not answer in time
            first_handler.hold = False
            first_handler.release()
            answers = [await f for f in held if f is not None]
            assert len(answers) == 3 and isinstance(answers[0], Error)
            assert [type(a) for a in answers[1:]] == [Appended, Appended]  # still answered
            assert client.append_nowait("s", "y") is None  # leaving: nothing sent there
            with pytest.raises(ClientError) as info:  # a caller still sees its error
                await expect_and_raise(answers[0])
            assert info.value.code == "timeout"
            ack = await client.append("s", "m0", client_msg_id="c0")
            assert (ack.seq, client.target) == (1, second.address)
            assert len(first_handler.seen) == 3
            await wait_until(lambda: not first.connections)

    run(main, loop)


async def expect_and_raise(response: Response) -> None:
    expect_response(response, Appended, "Append")


def test_with_every_other_target_down_the_client_stays_on_the_node_it_has() -> None:
    async def main() -> None:
        handler = StoreHandler()
        async with await serve(handler) as server:
            client = await connect([target(server), dead_target(), dead_target()], **FAST)  # type: ignore[arg-type]
            async with client:
                handler.fail = [("unavailable", True)]
                with pytest.raises(ClientError):
                    await client.ping()
                assert client.target is None  # moving away...
                assert isinstance(await client.ping(), Pong)  # ... but nowhere else answers
                assert client.target == server.address and len(server.connections) == 1
                handler.fail = [("unavailable", True)]
                with pytest.raises(ClientError):
                    await client.ping()
                assert client.target == server.address  # every other target is suspect now
                assert isinstance(await client.ping(), Pong)

    run(main)


def test_suspicion_is_bounded_and_jittered() -> None:
    async def main() -> None:
        handlers = [StoreHandler(), StoreHandler()]
        first, second = [await serve(h) for h in handlers]
        client = await connect([target(first), target(second)], suspect_s=0.2, **FAST)  # type: ignore[arg-type]
        async with client, first, second:
            handlers[0].fail = [("unavailable", True)]
            with pytest.raises(ClientError):
                await client.ping()
            await client.ping()
            until = client._suspects[first.address] - asyncio.get_running_loop().time()
            assert 0 < until <= 0.2
            handlers[1].fail = [("unavailable", True)]
            await asyncio.sleep(0.2)  # the first is no longer suspect: the client goes back
            with pytest.raises(ClientError):
                await client.ping()
            await client.ping()
            assert client.target == first.address
            waits = set()
            for _ in range(50):
                client._suspect(first.address)
                waits.add(client._suspects[first.address] - asyncio.get_running_loop().time())
            assert len(waits) > 40 and all(0.09 <= w <= 0.2 for w in waits)

    run(main)


class RefusingFeedHandler(FeedHandler):
    """``FeedHandler`` whose subscribes are answered ``unavailable`` while told so."""

    refuse_subscribes = False

    def on_request(self, conn: Connection, request: Request) -> Reply:
        if self.refuse_subscribes and isinstance(request, Subscribe):
            return error(request.rid, "unavailable", "group 7 has no leader")
        return super().on_request(conn, request)


@pytest.mark.parametrize("reason", ["answer", "closing", "move"])
def test_a_subscription_resumes_on_another_target_when_its_node_is_unavailable(
    reason: str,
) -> None:
    """A Subscribe answered ``unavailable``, a subscription closed ``unavailable``, or another
    call answered ``unavailable`` on the subscription's connection: it resumes, from the last
    seq yielded, on the other node."""

    async def main() -> None:
        first_handler, second_handler = RefusingFeedHandler(), FeedHandler()
        second_handler.sessions, second_handler.messages = (
            first_handler.sessions, first_handler.messages
        )  # fmt: skip
        first_handler.fill("s-1", 3)
        first, second = await serve(first_handler), await serve(second_handler)
        client = await connect([target(first), target(second)], **FAST)  # type: ignore[arg-type]
        async with client, first, second:
            first_handler.refuse_subscribes = reason == "answer"
            sub = await client.subscribe("s-1")
            assert seqs(await take(sub, 2)) == [1, 2]
            if reason == "closing":
                (conn, sub_id), _ = first_handler.feeds.popitem()
                conn.push(SubscriptionClosed(sub_id, "unavailable", "group 7 has no leader"))
                await wait_until(lambda: not sub._queue)  # seq 3, queued, is dropped
            elif reason == "move":
                first_handler.fail = [("unavailable", True)]
                with pytest.raises(ClientError):
                    await client.read("s-1")
                await client.ping()  # on the other node: the subscription follows
            assert seqs(await take(sub, 1)) == [3]
            await client.append("s-1", "live")
            assert seqs(await take(sub, 1)) == [4]
            assert client.target == second.address
            after = [r.after_seq for r in second_handler.subscribes()]
            assert after == ([0] if reason == "answer" else [2])
            assert sub.resumes == 1

    run(main)
