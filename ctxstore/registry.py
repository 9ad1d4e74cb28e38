"""Where a node's subscriptions are found: by what they follow (a session, a user) and by the
connection that holds them, with the caps both kinds share (``Subscriptions``, ``Inboxes``), and
the requests they answer alike (``Streams``)."""

from __future__ import annotations

import abc
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from wire.aio import Connection
from wire.protocol import ErrorCode


class Sub(Protocol):
    sub_id: int
    conn: Connection


class Limits(Protocol):
    @property
    def per_connection_max(self) -> int: ...
    @property
    def node_max(self) -> int: ...


K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=Sub)


class Registry(Generic[K, S]):
    def __init__(self) -> None:
        self._by_key: dict[K, dict[int, S]] = {}
        self._by_conn: dict[Connection, dict[int, S]] = {}
        self.count = 0

    def refusal(
        self, conn: Connection, per_connection_max: int, node_max: int
    ) -> tuple[ErrorCode, str] | None:
        """Why ``conn`` may not hold one more (None: it may): the node's cap is ``unavailable``
        (another node may take it), the connection's ``bad_request``."""
        if self.count >= node_max:
            return "unavailable", f"this node serves its maximum of {node_max}"
        if len(self._by_conn.get(conn, ())) >= per_connection_max:
            return "bad_request", f"at most {per_connection_max} per connection"
        return None

    def add(self, key: K, sub: S) -> None:
        self._by_key.setdefault(key, {})[sub.sub_id] = sub
        self._by_conn.setdefault(sub.conn, {})[sub.sub_id] = sub
        self.count += 1

    def remove(self, key: K, sub: S) -> None:
        _drop(self._by_key, key, sub.sub_id)
        _drop(self._by_conn, sub.conn, sub.sub_id)
        self.count -= 1

    def get(self, conn: Connection, sub_id: int) -> S | None:
        return self._by_conn.get(conn, {}).get(sub_id)

    def of_key(self, key: K) -> dict[int, S] | None:
        """The subscriptions following ``key`` (the registry's own dict: do not change it)."""
        return self._by_key.get(key)

    def of_conn(self, conn: Connection) -> list[S]:
        return list(self._by_conn.get(conn, {}).values())

    def all(self) -> list[S]:
        return [sub for subs in self._by_conn.values() for sub in subs.values()]


class Streams(abc.ABC, Generic[K, S]):
    """What subscriptions and inboxes share: admission under the caps, and unsubscribing one or
    every subscription of a closed connection (``_remove`` says what that means for each)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._subs: Registry[K, S] = Registry()

    @property
    def count(self) -> int:
        return self._subs.count

    def admit(self, conn: Connection) -> tuple[ErrorCode, str] | None:
        """Why ``conn`` may not open another one now (None: it may)."""
        return self._subs.refusal(conn, self.limits.per_connection_max, self.limits.node_max)

    def stop(self, conn: Connection, sub_id: int) -> bool:
        sub = self._subs.get(conn, sub_id)
        if sub is None:
            return False
        self._remove(sub)
        return True

    def on_close(self, conn: Connection) -> None:
        for sub in self._subs.of_conn(conn):
            self._remove(sub)

    @abc.abstractmethod
    def _remove(self, sub: S) -> None:
        """Forget ``sub`` (idempotent)."""


H = TypeVar("H", bound=Hashable)


def _drop(index: dict[H, dict[int, S]], key: H, sub_id: int) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.pop(sub_id, None)
        if not subs:
            del index[key]
