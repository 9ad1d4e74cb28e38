"""Authorization on a node (ctxstore/server.py with --auth jwt): every operation x role x own /
other session on the native protocol, the sender an append gets from its token, a
subscription outliving its token, and a 3-node cluster where the principal travels with a
forwarded write and the leader enforces it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, get_args

import jwt
import pytest

from ctxstore.auth import issue
from ctxstore.placement import group_of
from wire.client import ClientError, agent, connect
from wire.framing import ClientConnection, ProtocolError, PushReceived, ResponseReceived
from wire.protocol import (
    PROTOCOL_VERSION,
    Append,
    Compact,
    CreateAgent,
    CreateSession,
    DisableAgent,
    Error,
    GetAgent,
    GetContext,
    GetRoutes,
    GetSession,
    Hello,
    InboxDelta,
    InboxSnapshot,
    ListAgents,
    ListSessions,
    Manual,
    MarkRead,
    Message,
    NewMessage,
    Ping,
    Read,
    Request,
    Response,
    SetContextConfig,
    Subscribe,
    SubscribeInbox,
    Unsubscribe,
    UpdateAgent,
    Welcome,
)

from .test_ops import GROUPS, Harness, nodes, run

SECRET = "kid1=" + "k" * 32
AUTH = {"auth": "jwt", "secret": "a-test-cluster-secret", "auth_jwt_secret": [SECRET]}


class Native:
    """A raw native connection: ``call`` one request, ``push`` the next push."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.core = ClientConnection()
        self.rids = itertools.count(2)
        self.pushes: list[Any] = []
        self.answers: dict[int, Response] = {}
        self.closed = False
        self.goodbye: ProtocolError | None = None
        self.welcome: Response | None = None

    @classmethod
    async def open(
        cls, target: str, token: str | None, version: int = PROTOCOL_VERSION
    ) -> tuple[Native, Response]:
        host, port = target.rsplit(":", 1)
        n = cls(*await asyncio.open_connection(host, int(port)))
        n.welcome = await n.call(Hello(1, version, "t", token), rid=1)
        return n, n.welcome

    async def _receive(self) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), 10)
        self.core.receive_data(data or None)
        while (e := self.core.next_event()) is not None:
            if isinstance(e, ResponseReceived):
                self.answers[e.response.rid] = e.response
            elif isinstance(e, PushReceived):
                self.pushes.append(e.push)
            else:  # the goodbye (a ProtocolError with its code) or the end
                self.goodbye = e if isinstance(e, ProtocolError) else self.goodbye
                self.closed = True
                break
        if not data:
            self.closed = True

    async def call(self, request: Any, rid: int | None = None) -> Response:
        if rid is None:
            request.rid = rid = next(self.rids)
        self.core.send(request)
        self.writer.write(self.core.data_to_send())
        while rid not in self.answers:
            assert not self.closed, "closed"
            await self._receive()
        return self.answers.pop(rid)

    async def until_closed(self) -> None:
        while not self.closed:
            await self._receive()

    def close(self) -> None:
        self.writer.close()


def token(sub: str, role: str, ttl_s: float = 600, **kw: Any) -> str:
    return issue(SECRET, sub, role, ttl_s, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def session_as(h: Harness, tok: str | None) -> AsyncIterator[Native]:
    n, welcome = await Native.open(h.target, tok)
    assert isinstance(welcome, Welcome), welcome
    try:
        yield n
    finally:
        n.close()


def code(answer: Response) -> str:
    return answer.code if isinstance(answer, Error) else "ok"


def append(sid: str, sender: str = "user", sender_id: str = "x") -> Append:
    return Append(0, sid, sender, sender_id, "text", "hi", {}, None, None, None)  # type: ignore[arg-type]


NEW = itertools.count()
HOOK = "http://127.0.0.1:9/hook"
AGENT_ID = "ag-fixed"  # registered before the table runs (``setup``)
# operation -> a request on a session (own or other) owned by user ``u`` and agent ``a``.
OPERATIONS: dict[str, Callable[[str, str, str], Request]] = {
    "create_session": lambda sid, u, a: CreateSession(0, u, a, {}, f"new-{next(NEW)}"),
    "get_session": lambda sid, u, a: GetSession(0, sid),
    "list_sessions": lambda sid, u, a: ListSessions(0, u, None, 10),
    "append": lambda sid, u, a: append(sid),
    "read": lambda sid, u, a: Read(0, sid, 0, 10),
    "subscribe": lambda sid, u, a: Subscribe(0, sid, 0),
    "subscribe_inbox": lambda sid, u, a: SubscribeInbox(0, u),
    "mark_read": lambda sid, u, a: MarkRead(0, sid, u, 0),
    "set_context_config": lambda sid, u, a: SetContextConfig(0, sid, 1000, 1.0, Manual(), None),
    "get_context": lambda sid, u, a: GetContext(0, sid),
    "compact": lambda sid, u, a: Compact(
        0, sid, 1, 1, [NewMessage("system", "summary", "s", None, {}, None)], None
    ),
    "unsubscribe": lambda sid, u, a: Unsubscribe(0, 999),
    "ping": lambda sid, u, a: Ping(0),
    "get_routes": lambda sid, u, a: GetRoutes(0),
    # the agent registry: a service's only (no own or other: the same request twice)
    "create_agent": lambda sid, u, a: CreateAgent(0, agent(f"ag-{next(NEW)}", HOOK)),
    "update_agent": lambda sid, u, a: UpdateAgent(0, agent(AGENT_ID, HOOK)),
    "get_agent": lambda sid, u, a: GetAgent(0, AGENT_ID),
    "list_agents": lambda sid, u, a: ListAgents(0, None, 10),
    "disable_agent": lambda sid, u, a: DisableAgent(0, AGENT_ID),
}
assert set(OPERATIONS) == {t.__struct_config__.tag for t in get_args(Request)} - {"hello"}, (
    "every request type is in the table test"
)
# (operation, role) -> the answer on its own session, on another's: "ok", or the error code.
EXPECTED: dict[tuple[str, str], tuple[str, str]] = {
    ("create_session", "user"): ("ok", "forbidden"),
    ("create_session", "agent"): ("forbidden", "forbidden"),
    ("list_sessions", "agent"): ("forbidden", "forbidden"),
    ("subscribe_inbox", "agent"): ("forbidden", "forbidden"),
    ("mark_read", "agent"): ("forbidden", "forbidden"),
    ("unsubscribe", "user"): ("not_found", "not_found"),  # (sub 999: none, but allowed)
    ("unsubscribe", "agent"): ("not_found", "not_found"),
    ("unsubscribe", "service"): ("not_found", "not_found"),
    ("ping", "user"): ("ok", "ok"),
    ("ping", "agent"): ("ok", "ok"),
    ("get_routes", "user"): ("ok", "ok"),
    ("get_routes", "agent"): ("ok", "ok"),
    **{
        (op, role): ("forbidden", "forbidden")
        for op in ("create_agent", "update_agent", "get_agent", "list_agents", "disable_agent")
        for role in ("user", "agent")
    },
}
for op in OPERATIONS:
    EXPECTED.setdefault((op, "service"), ("ok", "ok"))
    for role in ("user", "agent"):
        EXPECTED.setdefault((op, role), ("ok", "forbidden"))
PRINCIPALS = {"user": "alice", "agent": "bot", "service": "svc"}


def setup() -> list[Request]:
    """What the table test needs first (a service's requests): the sessions ``own`` (alice's
    with bot) and ``other`` (bob's with bot2), each with a message and a context window, and
    the agent ``AGENT_ID``."""
    out: list[Request] = []
    for sid, u, a in (("own", "alice", "bot"), ("other", "bob", "bot2")):
        out += [CreateSession(0, u, a, {}, sid), append(sid),
                SetContextConfig(0, sid, 1000, 1.0, Manual(), None)]  # fmt: skip
    return [*out, CreateAgent(0, agent(AGENT_ID, HOOK))]


def test_every_operation_by_every_role_on_own_and_other_sessions(tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH) as (h,):
            assert await h.node.wait_leaders(10)
            async with session_as(h, token("svc", "service")) as svc:
                for request in setup():
                    assert code(await svc.call(request)) == "ok", request
            failures = []
            for (op, role), (own, other) in sorted(EXPECTED.items()):
                async with session_as(h, token(PRINCIPALS[role], role)) as c:
                    for sid, u, a, expected in (
                        ("own", "alice", "bot", own),
                        ("other", "bob", "bot2", other),
                    ):
                        got = code(await c.call(OPERATIONS[op](sid, u, a)))
                        if got != expected:
                            failures.append(f"{op} by {role} on {sid}: {got}, not {expected}")
            assert not failures, "\n".join(failures)
            # A refusal does not tell whether the session exists: the same words either way.
            async with session_as(h, token("alice", "user")) as c:
                other = await c.call(Read(0, "other", 0, 10))
                missing = await c.call(Read(0, "nowhere", 0, 10))
                assert isinstance(other, Error) and isinstance(missing, Error)
                assert (other.code, other.message) == (missing.code, missing.message)
                mixed = await c.call(MarkRead(0, "other", "alice", 1))  # another's session
                assert code(mixed) == "forbidden"
                taken = await c.call(CreateSession(0, "alice", "bot", {}, "other"))  # bob's id
                assert isinstance(taken, Error) and taken.message == other.message
            assert h.service.verifier.refusals["forbidden"] > 20

    run(main())


def test_the_sender_of_an_append_is_the_tokens(tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH) as (h,):
            assert await h.node.wait_leaders(10)
            async with session_as(h, token("alice", "user")) as c:
                assert code(await c.call(CreateSession(0, "alice", "bot", {}, "s"))) == "ok"
                assert code(await c.call(append("s", "agent", "bot"))) == "ok"  # claims agent
            async with session_as(h, token("bot", "agent")) as c:
                assert code(await c.call(append("s", "system", "root"))) == "ok"
            # the role follows the token's sender: a user claiming system writes no system role
            async with session_as(h, token("alice", "user")) as c:
                claim = Append(0, "s", "system", "root", "text", "hi", {}, None, None, None,
                               "system")  # fmt: skip
                assert code(await c.call(claim)) == "bad_request"
            async with session_as(h, token("svc", "service")) as c:
                assert code(await c.call(append("s", "system", "root"))) == "ok"
            last = h.node.state.read("s", 0, 10)
            assert last is not None
            assert [(m.sender, m.sender_id) for m in last.messages] == [
                ("user", "alice"), ("agent", "bot"), ("system", "root"),
            ]  # fmt: skip

    run(main())


def test_sessions_claim_narrows_a_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH) as (h,):
            assert await h.node.wait_leaders(10)
            async with session_as(h, token("alice", "user")) as c:
                for sid in ("s1", "s2"):
                    assert code(await c.call(CreateSession(0, "alice", "bot", {}, sid))) == "ok"
            async with session_as(h, token("alice", "user", sessions=["s1"])) as c:
                assert code(await c.call(Read(0, "s1", 0, 10))) == "ok"
                assert code(await c.call(Read(0, "s2", 0, 10))) == "forbidden"
                assert code(await c.call(ListSessions(0, "alice", None, 10))) == "forbidden"
                assert code(await c.call(append("s2"))) == "forbidden"

    run(main())


EXPIRED = issue(SECRET, "alice", "user", 60, now=time.time() - 600)


@pytest.mark.parametrize("token_text", [None, "", "not-a-jwt", EXPIRED])
def test_a_hello_without_a_valid_token_is_unauthorized(tmp_path: Path, token_text: Any) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH) as (h,):
            n, answer = await Native.open(h.target, token_text)
            assert code(answer) == "unauthorized"
            await n.until_closed()
            assert sum(h.service.verifier.refusals.values()) == 1

    run(main())


def test_a_subscription_ends_when_its_token_expires(tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH, auth_jwt_leeway_s=0.0) as (h,):
            assert await h.node.wait_leaders(10)
            async with session_as(h, token("alice", "user")) as c:
                assert code(await c.call(CreateSession(0, "alice", "bot", {}, "s"))) == "ok"
            async with session_as(h, token("alice", "user", ttl_s=2)) as c:
                assert code(await c.call(Subscribe(0, "s", 0))) == "ok"
                await asyncio.wait_for(c.until_closed(), 5)
                goodbye = c.goodbye
                assert goodbye is not None and goodbye.code == "unauthorized"
                assert "expired" in goodbye.message
            assert h.node.subscriptions.count == 0
            assert h.service.verifier.refusals["expired"] == 1

    run(main())


def test_forwarded_writes_keep_their_principal_on_three_nodes(tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 3, **AUTH) as hs:
            assert all([await h.node.wait_leaders(20) for h in hs])
            mine, theirs = "s-alice", "s-bob"
            leaders = {hs[0].node.host.leader(group_of(s, GROUPS)) for s in (mine, theirs)}
            # every request goes to a node that leads neither session's group
            entry = next(h for h in hs if h.node.settings.node_id not in leaders)
            async with session_as(entry, token("svc", "service")) as svc:
                assert code(await svc.call(CreateSession(0, "bob", "bot", {}, theirs))) == "ok"
            async with session_as(entry, token("alice", "user")) as c:
                assert code(await c.call(CreateSession(0, "alice", "bot", {}, mine))) == "ok"
                assert code(await c.call(append(mine, "system", "root"))) == "ok"
                # Appends are not checked where they arrive: the leader refuses this one.
                assert code(await c.call(append(theirs))) == "forbidden"
                assert code(await c.call(MarkRead(0, theirs, "alice", 0))) == "forbidden"
            assert entry.node.router.forwarded >= 4
            leader_id = entry.node.host.leader(group_of(mine, GROUPS))
            leader = next(h for h in hs if h.node.settings.node_id == leader_id)
            assert leader.node.router.served_forwards >= 2
            page = leader.node.state.read(mine, 0, 10)
            assert page is not None
            assert [(m.sender, m.sender_id) for m in page.messages] == [("user", "alice")]
            assert leader.service.verifier.refusals["forbidden"] == 0  # refused by apply...
            assert entry.service.verifier.refusals["forbidden"] == 2  # ...answered here

    run(main())


def test_a_second_hello_refreshes_the_token_and_the_subscription_outlives_the_first(
    tmp_path: Path,
) -> None:
    """A 2 s token, refreshed on the open connection by a second Hello: the subscription keeps
    receiving after the first token's expiry; refreshes with a bad token or another principal's
    are refused and change nothing; without a refresh the connection ends at the expiry."""

    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH, auth_jwt_leeway_s=0.0) as (h,):
            assert await h.node.wait_leaders(10)
            async with session_as(h, token("alice", "user")) as c:
                assert code(await c.call(CreateSession(0, "alice", "bot", {}, "s"))) == "ok"
            async with session_as(h, token("alice", "user", ttl_s=2)) as c:
                assert isinstance(c.welcome, Welcome) and c.welcome.expires_in_ms is not None
                assert 0 < c.welcome.expires_in_ms <= 2000
                assert code(await c.call(Subscribe(0, "s", 0))) == "ok"
                refusals = [
                    (token("bob", "user", ttl_s=60), "forbidden"),  # another principal
                    (token("alice", "agent", ttl_s=60), "forbidden"),  # another role
                    (token("alice", "user", ttl_s=60, sessions=["s"]), "forbidden"),  # narrower
                    ("not-a-jwt", "unauthorized"),
                    (None, "unauthorized"),  # (the upgrade's credential does not count)
                    (EXPIRED, "unauthorized"),
                ]
                for tok, expected in refusals:
                    assert code(await c.call(Hello(0, PROTOCOL_VERSION, "t", tok))) == expected
                version = await c.call(Hello(0, 3, "t", token("alice", "user")))
                assert code(version) == "bad_request"  # an open connection keeps its version
                await asyncio.sleep(1.0)
                again = await c.call(Hello(0, PROTOCOL_VERSION, "t", token("alice", "user", 4)))
                assert isinstance(again, Welcome) and again.expires_in_ms is not None
                assert 2000 < again.expires_in_ms <= 4000
                await asyncio.sleep(1.5)  # past the first token's expiry
                assert not c.closed
                async with session_as(h, token("svc", "service")) as svc:
                    assert code(await svc.call(append("s", "user", "alice"))) == "ok"
                while not c.pushes:
                    await c._receive()
                assert [m.content for m in c.pushes[0].messages] == ["hi"]
                assert code(await c.call(Read(0, "s", 0, 10))) == "ok"
                await asyncio.wait_for(c.until_closed(), 5)  # the second token expires
                assert c.goodbye is not None and c.goodbye.code == "unauthorized"
                assert "expired" in c.goodbye.message
            verifier = h.service.verifier
            assert verifier.refreshed == 1 and verifier.refusals["expired"] == 2  # (+ EXPIRED)
            assert verifier.refusals["forbidden"] == 3
            metrics = await h.scrape()
            assert metrics["ctxstore_auth_refreshed_total"] == 1
            assert metrics['ctxstore_auth_refusals_total{reason="expired"}'] == 2

    run(main())


def test_a_token_for_centuries_is_welcomed_without_an_expiry(tmp_path: Path) -> None:
    """An ``exp`` of 10^30 s (a backend's bug): its milliseconds would not fit the Welcome's
    integer, so the connection is told no expiry, and works."""

    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH) as (h,):
            assert await h.node.wait_leaders(10)
            forever = jwt.encode({"sub": "alice", "role": "user", "exp": 10**30},
                                 SECRET.partition("=")[2].encode(), algorithm="HS256",
                                 headers={"kid": "kid1"})  # fmt: skip
            async with session_as(h, forever) as c:
                assert isinstance(c.welcome, Welcome) and c.welcome.expires_in_ms is None
                assert code(await c.call(CreateSession(0, "alice", "bot", {}, "s"))) == "ok"
                again = await c.call(Hello(0, PROTOCOL_VERSION, "t", token("alice", "user", 60)))
                assert isinstance(again, Welcome) and again.expires_in_ms is not None

    run(main())


def test_a_second_hello_needs_protocol_version_4(tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH) as (h,):
            n, welcome = await Native.open(h.target, token("alice", "user"), version=3)
            assert isinstance(welcome, Welcome) and welcome.expires_in_ms is None
            n.core.send(Hello(2, 3, "t", token("alice", "user")))
            n.writer.write(n.core.data_to_send())
            await asyncio.wait_for(n.until_closed(), 5)
            assert n.goodbye is not None and "protocol_version >= 4" in n.goodbye.message

    run(main())


def test_the_python_client_refreshes_its_token_on_the_open_connection(tmp_path: Path) -> None:
    """A token function and 3 s tokens: the client sends a new token before each expires, so
    its connection and subscription go on past several expiries (no reconnect)."""

    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH, auth_jwt_leeway_s=0.0) as (h,):
            assert await h.node.wait_leaders(10)
            issued: list[str] = []

            def fresh() -> str:
                issued.append(token("alice", "user", ttl_s=3))
                return issued[-1]

            async with await connect(h.target, token=fresh) as c:
                await c.create_session("alice", "bot", {}, "s")
                sub = await c.subscribe("s")
                conn = c._conn
                got = []
                for i in range(4):
                    await c.append("s", f"m{i}")
                    async with asyncio.timeout(10):
                        item = await anext(aiter(sub))
                    assert isinstance(item, Message)
                    got.append(item.content)
                    await asyncio.sleep(2.0)  # 8 s in all: past the first tokens' expiries
                assert got == ["m0", "m1", "m2", "m3"]
                assert c._conn is conn and conn is not None and conn.error is None
                assert len(issued) >= 3
                assert h.service.verifier.refreshed >= 2
                assert h.service.verifier.refusals["expired"] == 0
                await sub.close()

    run(main())


def test_the_python_client_connects_again_when_it_could_not_refresh(tmp_path: Path) -> None:
    """A token function that gives the same token again (no later expiry): the client stops
    refreshing, the node ends the connection when the token expires, and the client's next
    request connects again with a fresh token; its subscription resumes."""

    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH, auth_jwt_leeway_s=0.0) as (h,):
            assert await h.node.wait_leaders(10)
            first = token("alice", "user", ttl_s=2)
            issued: list[str] = []

            def stale_then_fresh() -> str:
                issued.append(first if len(issued) < 2 else token("alice", "user", ttl_s=60))
                return issued[-1]

            async with await connect(h.target, token=stale_then_fresh) as c:
                await c.create_session("alice", "bot", {}, "s")
                sub = await c.subscribe("s")
                await c.append("s", "before")
                await asyncio.sleep(2.5)  # the token expires: the node closes the connection
                await c.append_with_retry("s", "after")
                got = []
                async with asyncio.timeout(10):
                    async for item in sub:
                        assert isinstance(item, Message)
                        got.append(item.content)
                        if len(got) == 2:
                            break
                assert got == ["before", "after"]
                assert len(issued) == 3 and h.service.verifier.refusals["expired"] == 1
                await sub.close()

    run(main())


def test_relayed_requests_and_streams_keep_the_principal_on_four_nodes(tmp_path: Path) -> None:
    """Scale-out (ctxstore/relay.py): node 4 holds neither session's group, so every request
    travels to a replica with the connection's principal, which the replica authorizes; the
    subscription and inbox relayed from a replica outlive the first tokens (refreshed by the
    client with second Hellos), and a resumed relayed stream carries the refreshed principal."""
    from .test_relay import away, cluster, stop, take

    async def main() -> None:
        mine, replicas = away(4, 4, "a")
        theirs, _ = away(4, 4, "b")
        async with cluster(tmp_path, 4, **AUTH, auth_jwt_leeway_s=0.0) as members:
            far = members[4]
            async with await connect(far.target, token=token("svc", "service")) as svc:
                await svc.create_session("bob", "bot", {}, theirs)
            issued: list[str] = []

            def fresh() -> str:
                issued.append(token("alice", "user", ttl_s=3))
                return issued[-1]

            async with await connect(far.target, token=fresh) as c:
                await c.create_session("alice", "bot", {}, mine)
                assert (await c.append(mine, "m1", sender="agent", sender_id="x")).seq == 1
                refused = {
                    "read": c.read(theirs),
                    "append": c.append(theirs, "x"),
                    "get_session": c.get_session(theirs),
                    "mark_read": c.mark_read(theirs, "alice", 0),
                    "get_context": c.get_context(theirs),
                    "create_session": c.create_session("alice", "bot", {}, theirs),
                }
                for name, call in refused.items():
                    try:
                        await call
                    except ClientError as e:
                        assert e.code == "forbidden", name
                    else:
                        raise AssertionError(f"{name} on another's session was allowed")
                try:
                    await c.subscribe(theirs)
                except ClientError as e:
                    assert e.code == "forbidden"
                else:
                    raise AssertionError("subscribed to another's session")
                replica_refusals = sum(
                    m.service.verifier.refusals["forbidden"] for i, m in members.items() if i != 4
                )
                assert replica_refusals == 7  # authorized on the replicas...
                assert far.service.verifier.refusals["forbidden"] == 0  # ...not on node 4
                sub = await c.subscribe(mine)
                inbox = await c.subscribe_inbox("alice")
                assert isinstance(await anext(aiter(inbox)), InboxSnapshot)
                assert [m.content for m in await take(sub, 1)] == ["m1"]
                for i in (2, 3, 4):
                    await asyncio.sleep(2.0)  # 6 s in all: past the first tokens' expiries
                    assert (await c.append(mine, f"m{i}")).seq == i
                    [message] = await take(sub, 1)
                    assert message.content == f"m{i}"
                    while not isinstance(delta := await anext(aiter(inbox)), InboxDelta):
                        pass
                    assert [e.session_id for e in delta.entries] == [mine]
                # the stream's replica stops: the stream resumes at another replica, asked
                # with the refreshed principal (the first token has expired by now)
                [stream] = far.service.follow.streams.all()
                gone = stream.peer
                assert gone in replicas
                await stop(members, gone)
                await c.append_with_retry(mine, "m5")
                assert [m.content for m in await take(sub, 1)] == ["m5"]
                # the same stream, resumed (not ended, for the client to subscribe again)
                assert far.service.follow.streams.all() == [stream] and not stream.closed
                assert stream.peer not in (gone, 0)
                assert far.service.verifier.refusals["expired"] == 0
                assert far.service.verifier.refreshed >= 2
                await sub.close()
                await inbox.close()
            assert far.service.relay.relayed >= 10
            left = next(r for r in replicas if r in members)
            page = members[left].node.state.read(mine, 0, 10)
            assert page is not None
            assert {(m.sender, m.sender_id) for m in page.messages} == {("user", "alice")}

    run(main())
