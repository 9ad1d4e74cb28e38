"""Subscriptions of the Python client that resume by themselves (docs/protocol.md §9):
``Subscription`` follows a session, ``InboxSubscription`` a user's inbox.

Rules of this file:
- A follower walks ``TRANSITIONS`` below; a step the table does not list is a bug and raises
  ``AssertionError``.  What the state means for the data: ``_conn`` is set exactly while LIVE
  or HOLDING; ``_why`` is why it was LOST (kept while it subscribes again) or the error it
  FAILED with; the queue is empty unless LIVE or HOLDING (what was queued is dropped on leaving
  them: a resume subscribes again from the last seq yielded).
- Each follower queues at most ``queue_max`` items (a push may overshoot by its own size); while
  its queue is full it HOLDS its connection (the connection stops reading), until the queue
  drains below half.
- Order is checked, not repaired: an item that is not the next seq fails the follower with
  ``internal``.
- A resume goes through the client's usual connect (next target, backoff, bounded attempts);
  a follower lost ``connect_attempts`` times in a row without yielding anything fails.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Final, Generic, Self, TypeVar

from .client_connection import Connection
from .errors import ClientError
from .protocol import (
    ChunkEvent,
    ContextEvent,
    GapEvent,
    InboxDelta,
    InboxSnapshot,
    Message,
    MessageEvent,
    Push,
    Request,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    SubscriptionClosed,
    Unsubscribe,
)

if TYPE_CHECKING:
    from .client import Client

T = TypeVar("T")


class FollowerState(enum.Enum):
    IDLE = "idle"  # nothing sent yet
    SUBSCRIBING = "subscribing"  # a Subscribe in flight: the first one, or a resume
    LIVE = "live"  # subscribed on a connection: its pushes are queued here
    HOLDING = "holding"  # LIVE with a full queue: the connection stops reading
    LOST = "lost"  # the server side is gone: the next read subscribes again
    FAILED = "failed"  # ended by an error, which the iterator raises from now on
    CLOSED = "closed"  # ended by ``close`` or ``Client.unsubscribe``: the iteration stops


S = FollowerState
TRANSITIONS: Final[dict[FollowerState, frozenset[FollowerState]]] = {
    S.IDLE: frozenset({S.SUBSCRIBING, S.CLOSED}),
    # back to IDLE (LOST for a resume) when the caller is cancelled before the answer
    S.SUBSCRIBING: frozenset({S.IDLE, S.LIVE, S.LOST, S.FAILED, S.CLOSED}),
    S.LIVE: frozenset({S.HOLDING, S.LOST, S.FAILED, S.CLOSED}),
    S.HOLDING: frozenset({S.LIVE, S.LOST, S.FAILED, S.CLOSED}),
    S.LOST: frozenset({S.SUBSCRIBING, S.FAILED, S.CLOSED}),
    S.FAILED: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}
CONNECTED: Final = frozenset({S.LIVE, S.HOLDING})
ENDED: Final = frozenset({S.FAILED, S.CLOSED})


class Follower(abc.ABC, Generic[T]):
    """A subscription that resumes by itself: the queue between the connection and the
    iterator, the hold on the connection while the queue is full, and the resume loop.  A
    ``connection.PushSink``."""

    def __init__(self, client: Client, queue_max: int) -> None:
        if queue_max < 1:
            raise ValueError("queue_max must be >= 1")
        self.client = client
        self.queue_max = queue_max
        self.state = S.IDLE
        self.sub_id: int | None = None  # of the current server-side subscription
        self.resumes = 0  # successful re-subscriptions
        self._conn: Connection | None = None
        self._why: ClientError | None = None
        self._queue: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._fruitless = 0  # resumes since an item was yielded (or a subscription held)
        self._started_at = 0.0

    # what the subclasses say --------------------------------------------------------------------

    @abc.abstractmethod
    def _request(self, rid: int) -> Request:
        """The request that starts (or resumes) the subscription."""

    @abc.abstractmethod
    def _expect(self) -> type[Subscribed] | type[InboxSnapshot]:
        """The type of its answer."""

    @abc.abstractmethod
    def _accept(self, push: Push) -> None:
        """Queue the items of ``push`` (not a ``SubscriptionClosed``)."""

    def _check(self, item: T) -> None:
        """Called as ``item`` is yielded; raises ``ClientError`` if it is out of order."""

    # PushSink ------------------------------------------------------------------------------------

    def subscribed(self, conn: Connection, response: Subscribed | InboxSnapshot) -> None:
        if self.state in ENDED:  # ended while the subscribe was in flight
            conn.unregister(response.sub_id)
            conn.unsubscribe_quietly(response.sub_id)
            return
        self._to(S.LIVE)
        self._conn = conn
        self.sub_id = response.sub_id
        self._why = None
        self._started_at = asyncio.get_running_loop().time()

    def deliver(self, push: Push) -> None:
        if type(push) is SubscriptionClosed:
            if push.reason == "not_found":
                self._detach()  # the server has ended it: no Unsubscribe
                self._fail(ClientError("not_found", push.message, False))
            else:
                reason = f"closed by the server: {push.reason}: {push.message}"
                self._drop(ClientError("unavailable", reason, True))
            return
        self._accept(push)
        conn = self._conn
        if self.state is S.LIVE and conn is not None and len(self._queue) >= self.queue_max:
            self._to(S.HOLDING)
            conn.hold(self)
        self._wake()

    def connection_lost(self, error: ClientError) -> None:
        self._drop(error)

    def unsubscribed(self) -> None:
        """Ended by ``Client.unsubscribe`` (which has unregistered it): the iteration stops."""
        self._end()

    # the iterator --------------------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Self]:
        return self._begin().__await__()

    async def _begin(self) -> Self:
        await self._ensure_started()
        return self

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self.state is S.IDLE:
            await self._ensure_started()
        for _ in range(1_000_000):  # each turn yields, waits or resumes: a bound, not a limit
            state = self.state
            if state is S.CLOSED:
                raise StopAsyncIteration
            if state is S.FAILED:
                assert self._why is not None
                raise self._why
            queue = self._queue
            if queue:
                item = queue.popleft()
                try:
                    self._check(item)
                except ClientError as e:
                    self._fail(e)
                    raise
                self._fruitless = 0
                if state is S.HOLDING and 2 * len(queue) < self.queue_max:
                    self._to(S.LIVE)
                    assert self._conn is not None
                    self._conn.release(self)
                return item
            if state is S.LOST:
                await self._resume()
                continue
            assert self._waiter is None, "one consumer at a time"
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        raise AssertionError("the subscription loop did not settle")

    async def close(self) -> None:
        """End the iteration and unsubscribe (when connected; the answer is awaited, errors are
        ignored).  Items queued and not yet yielded are dropped."""
        if self.state is S.CLOSED:
            return
        conn, sub_id = self._conn, self.sub_id
        self._end()
        if conn is not None and conn.error is None and sub_id is not None:
            with contextlib.suppress(ClientError):
                await conn.request(Unsubscribe(self.client._next_rid(), sub_id))

    async def __aenter__(self) -> Self:
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # the machinery -------------------------------------------------------------------------------

    def _to(self, state: FollowerState) -> None:
        assert state in TRANSITIONS[self.state], f"subscription: {self.state} -> {state}"
        self.state = state

    async def _ensure_started(self) -> None:
        """The first Subscribe, once.  A retryable failure is a loss like any other (the
        iterator resumes); another ends the subscription and is raised."""
        if self.state is not S.IDLE:
            return
        self._to(S.SUBSCRIBING)
        try:
            await self._start()
        except ClientError as e:
            if e.retryable and not self.client._closed:
                self._drop(e)
                self._started_at = asyncio.get_running_loop().time()
                return
            self._fail(e)
            raise
        except BaseException:
            self._cancelled(S.IDLE)
            raise

    async def _start(self) -> None:
        """One Subscribe (through the client's usual connect); raises ``ClientError``."""
        await self.client._call(self._request(self.client._next_rid()), self._expect(), self)

    async def _resume(self) -> None:
        """Subscribe again, with backoff, at most ``connect_attempts`` times in a row; fails the
        subscription when that does not work or when it keeps being lost without progress."""
        client = self.client
        last = self._why
        assert self.state is S.LOST and last is not None
        if not last.retryable:
            self._fail(last)
            return
        if asyncio.get_running_loop().time() - self._started_at >= client.timeout_s:
            self._fruitless = 0  # it held for a while: not a loop of failures
        if self._fruitless >= client.connect_attempts:
            self._fail(
                ClientError(
                    "unavailable",
                    f"lost {self._fruitless} times in a row without progress: {last.message}",
                    True,
                )
            )
            return
        backoff_s = client.backoff_min_s * 2 ** min(self._fruitless, 16)
        for attempt in range(client.connect_attempts):
            if attempt or self._fruitless:
                backoff_s = min(backoff_s, client.backoff_max_s)
                await asyncio.sleep(client._rng.uniform(backoff_s / 2, backoff_s))
                backoff_s *= 2
            if self.state in ENDED:  # closed or failed meanwhile
                return
            self._to(S.SUBSCRIBING)
            try:
                await self._start()
            except ClientError as e:
                if not e.retryable or client._closed:
                    self._fail(e)
                    return
                last = e
                self._drop(e)
                continue
            except BaseException:
                self._cancelled(S.LOST)
                raise
            self.resumes += 1
            self._fruitless += 1
            return
        self._fail(
            ClientError(
                "unavailable",
                f"no resume in {client.connect_attempts} attempts; last: {last.message}",
                True,
            )
        )

    def _cancelled(self, state: FollowerState) -> None:
        """The caller of a Subscribe was cancelled: back to ``state`` unless the answer has
        come (a late one is unsubscribed by the connection)."""
        if self.state is S.SUBSCRIBING:
            self._to(state)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _detach(self) -> None:
        """Leave the connection: unregister, release the hold, forget what was queued."""
        conn = self._conn
        self._conn = None
        self._queue.clear()
        if conn is not None:
            if self.sub_id is not None and conn.sinks.get(self.sub_id) is self:
                del conn.sinks[self.sub_id]
            conn.release(self)

    def _drop(self, why: ClientError) -> None:
        """The server side is gone (or never came): subscribe again when next read."""
        if self.state is S.SUBSCRIBING or self.state in CONNECTED:
            self._detach()
            self._why = why
            self._to(S.LOST)
        self._wake()

    def _fail(self, error: ClientError) -> None:
        """End with ``error`` (raised by the iterator from now on); unsubscribe if connected."""
        conn, sub_id = self._conn, self.sub_id
        self._detach()
        if self.state not in ENDED:
            self._why = error
            self._to(S.FAILED)
        if conn is not None and sub_id is not None:
            conn.unsubscribe_quietly(sub_id)
        self._wake()

    def _end(self) -> None:
        self._detach()
        if self.state is not S.CLOSED:
            self._to(S.CLOSED)
        self._wake()


class Subscription(Follower[Message | GapEvent | ContextEvent | ChunkEvent]):
    """A session followed in seq order: yields ``Message`` and ``GapEvent`` (see
    ``Client.subscribe``), and ``ContextEvent`` when asked for (``context_events``).
    ``last_seq``: the seq of the last message or gap yielded (a GapEvent's ``to_seq``); a
    resume subscribes again after it."""

    def __init__(
        self,
        client: Client,
        session_id: str,
        after_seq: int,
        queue_max: int,
        context_events: bool = False,
        stream_chunks: bool = False,
    ) -> None:
        super().__init__(client, queue_max)
        self.session_id = session_id
        self.last_seq = after_seq
        self.context_events = context_events
        self.stream_chunks = stream_chunks
        self.start_last_seq: int | None = None  # Subscribed.last_seq of the latest subscribe

    def _request(self, rid: int) -> Request:
        return Subscribe(
            rid, self.session_id, self.last_seq, self.context_events, self.stream_chunks
        )

    def _expect(self) -> type[Subscribed]:
        return Subscribed

    def subscribed(self, conn: Connection, response: Subscribed | InboxSnapshot) -> None:
        super().subscribed(conn, response)
        if type(response) is Subscribed:
            self.start_last_seq = response.last_seq

    def _accept(self, push: Push) -> None:
        if type(push) is MessageEvent:
            self._queue.extend(push.messages)
        elif (
            type(push) is GapEvent
            or (type(push) is ContextEvent and self.context_events)
            or (type(push) is ChunkEvent and self.stream_chunks)
        ):
            self._queue.append(push)
        else:
            self._fail(ClientError("internal", f"{type(push).__name__} for a session", False))

    def _check(self, item: Message | GapEvent | ContextEvent | ChunkEvent) -> None:
        expected = self.last_seq + 1
        if type(item) is ContextEvent or type(item) is ChunkEvent:
            return
        if type(item) is Message:
            if item.seq != expected:
                raise _out_of_order(f"expected seq {expected}, got message {item.seq}")
            self.last_seq = item.seq
        else:
            assert type(item) is GapEvent
            if item.from_seq != expected or item.to_seq < item.from_seq:
                raise _out_of_order(
                    f"expected seq {expected}, got gap {item.from_seq}..{item.to_seq}"
                )
            self.last_seq = item.to_seq


def _out_of_order(what: str) -> ClientError:
    return ClientError("internal", f"subscription out of order: {what}", False)


class InboxSubscription(Follower[InboxSnapshot | InboxDelta]):
    """A user's inbox followed: yields an ``InboxSnapshot``, then ``InboxDelta``s (see
    ``Client.subscribe_inbox``); after a resume, a fresh ``InboxSnapshot``."""

    def __init__(self, client: Client, user_id: str, queue_max: int) -> None:
        super().__init__(client, queue_max)
        self.user_id = user_id

    def _request(self, rid: int) -> Request:
        return SubscribeInbox(rid, self.user_id)

    def _expect(self) -> type[InboxSnapshot]:
        return InboxSnapshot

    def subscribed(self, conn: Connection, response: Subscribed | InboxSnapshot) -> None:
        super().subscribed(conn, response)
        if self._conn is conn and type(response) is InboxSnapshot:
            self._queue.append(response)  # the first item, before the deltas that follow
            self._wake()

    def _accept(self, push: Push) -> None:
        if type(push) is InboxDelta:
            self._queue.append(push)
        else:
            self._fail(ClientError("internal", f"{type(push).__name__} for an inbox", False))


__all__ = ["Follower", "FollowerState", "InboxSubscription", "Subscription"]
