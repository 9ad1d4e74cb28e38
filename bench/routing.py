"""Where a client process sends each request, and one pipelined connection per node.

- ``--route leader``: a session's requests go to its group's leader (``ctxstore.placement``
  computes the group, ``GetRoutes`` names the leader), saving the forward a non-leader makes;
  while no leader is known (or its node is down), to one of the group's replicas, saving a
  relay.  After an error the table is refreshed (at most every ``REFRESH_MIN_S``), and every
  ``REFRESH_EVERY_S`` anyway: a stale table costs a forward, never a wrong answer.  A node the
  routes name that the client does not know yet (one that joined, ``--join-at``) gets a
  connection too (native transport; at most ``NODES_MAX`` nodes).
- ``--route any``: round robin over the nodes, so about (N-1)/N of the writes are forwarded.

A node whose connection broke or was refused is skipped for ``DOWN_S``; when every node is
down the next one is tried anyway.

``via`` picks the clients' transport (``bench.webclients``): the native port (``native``), or
the node's HTTP port (its address in ``web``): a WebSocket (``ws``: msgpack, ``ws-json``: JSON)
or the HTTP/JSON API (``http``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Literal

from wire.client import Client, ClientError, parse_targets
from wire.protocol import FRAME_BYTES_MAX
from wire.web_codec import JSON, MSGPACK

from .webclients import HttpClient, LoadClient, Via, WsClient

Route = Literal["leader", "any"]

DOWN_S = 0.5
REFRESH_MIN_S = 0.05
REFRESH_EVERY_S = 1.0
CONNECT_TIMEOUT_S = 2.0
NODES_MAX = 64  # nodes a client connects to, those it learns from the routes included


def new_client(address: str, token: str | None, timeout_s: float) -> Client:
    """A client of one node that connects on its first call and tries once per call."""
    return Client(
        parse_targets(address),
        token=token,
        client_name="ctxstore-bench",
        timeout_s=timeout_s,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        connect_attempts=1,
        backoff_min_s=0.01,
        backoff_max_s=0.1,
        max_frame_bytes=FRAME_BYTES_MAX,
    )


def new_load_client(
    via: Via, address: str, web_address: str | None, token: str | None, timeout_s: float
) -> LoadClient:
    """A client of one node through ``via``: its native ``address`` or its HTTP port's."""
    if via == "native":
        return new_client(address, token, timeout_s)
    if web_address is None:
        raise ValueError(f"--via {via} needs the node's HTTP port ({address} has none known)")
    if via == "wt":  # (HTTP/3 on the HTTP port's number, UDP: cluster up --h3, bench --nodes)
        from .wtclient import WtClient

        return WtClient(web_address, token, timeout_s)
    if via == "http":
        return HttpClient(web_address, new_client(address, token, timeout_s), token, timeout_s)
    return WsClient(web_address, JSON if via == "ws-json" else MSGPACK, token, timeout_s)


class Router:
    def __init__(
        self,
        nodes: dict[int, str],
        leaders: list[int],
        route: Route,
        *,
        token: str | None,
        timeout_s: float,
        via: Via = "native",
        web: dict[int, str] | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("no nodes")
        self.nodes = dict(nodes)
        self.ids = sorted(nodes)
        self.leaders = list(leaders)
        self.replicas: list[list[int]] = []  # index = group (empty: not known yet)
        self.route = route
        self.token = token
        self.timeout_s = timeout_s
        self.via = via
        self.web = dict(web or {})
        self.clients = {
            i: new_load_client(via, a, self.web.get(i), token, timeout_s)
            for i, a in self.nodes.items()
        }
        self.down_until: dict[int, float] = {}
        self.refreshes = 0
        self._next = 0
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        self._periodic: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect to every node (so no measured request pays for it); refresh periodically."""
        await asyncio.gather(*(c.ping() for c in self.clients.values()))
        if self.route == "leader":
            self._periodic = asyncio.create_task(self._refresh_periodically())

    async def close(self) -> None:
        for task in (self._periodic, self._refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for client in self.clients.values():
            await client.close()

    def usable(self, node_id: int) -> bool:
        return self.down_until.get(node_id, 0.0) <= time.monotonic()

    def pick(self, group: int) -> int:
        """The node to send a request of ``group`` to."""
        if self.route == "leader":
            leader = self.leaders[group] if group < len(self.leaders) else 0
            if leader in self.clients and self.usable(leader):
                return leader
            if group < len(self.replicas):
                hosts = [n for n in self.replicas[group] if n in self.clients and self.usable(n)]
                if hosts:
                    self._next += 1  # (spread, as next_node does)
                    return hosts[self._next % len(hosts)]
        return self.next_node()

    def next_node(self) -> int:
        n = len(self.ids)
        for _ in range(n):
            node_id = self.ids[self._next % n]
            self._next += 1
            if self.usable(node_id):
                return node_id
        node_id = self.ids[self._next % n]
        self._next += 1
        return node_id

    def failed(self, node_id: int, error: ClientError) -> None:
        """A request to ``node_id`` failed with ``error``: maybe mark it down, refresh."""
        client = self.clients[node_id]
        if error.code == "unavailable" and client.target is None:  # connection lost or refused
            self.down_until[node_id] = time.monotonic() + DOWN_S
        self.refresh_soon()

    def refresh_soon(self) -> None:
        if self.route != "leader" or self._refresh is not None:
            return
        if time.monotonic() - self._refreshed_at < REFRESH_MIN_S:
            return
        self._refresh = asyncio.create_task(self._refresh_once())
        self._refresh.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refresh = None
        if not task.cancelled():
            task.exception()  # a failed refresh is retried at the next error or period

    async def _refresh_once(self) -> None:
        self._refreshed_at = time.monotonic()
        node_id = self.next_node()
        try:
            routes = await self.clients[node_id].get_routes()
        except ClientError as e:
            if e.code == "unavailable" and self.clients[node_id].target is None:
                self.down_until[node_id] = time.monotonic() + DOWN_S
            return
        self.refreshes += 1
        if len(routes.leaders) == len(self.leaders):
            self.leaders = list(routes.leaders)
            if len(routes.replicas) == len(routes.leaders):
                self.replicas = [list(r) for r in routes.replicas]
        if self.via == "native":
            self._learn(routes.addresses)

    def _learn(self, addresses: dict[int, str]) -> None:
        """Connections to the nodes the routes name that this client does not know yet."""
        for node_id, address in addresses.items():
            if node_id in self.clients or not address or len(self.clients) >= NODES_MAX:
                continue
            self.nodes[node_id] = address
            self.clients[node_id] = new_load_client(
                self.via, address, None, self.token, self.timeout_s
            )
            self.ids = sorted(self.clients)

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_EVERY_S)
            if self._refresh is None:
                with contextlib.suppress(ClientError):
                    await self._refresh_once()


__all__ = ["Route", "Router", "new_client", "new_load_client"]
