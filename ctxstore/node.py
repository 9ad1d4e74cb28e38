"""A ctxstore node: WAL + multi-group Raft + peer transport + the conversation state machine +
the request router, on one event loop (design §3, §5.3).  The client server (``server.py``)
sits on top; ``cli.py`` starts it.

Placement (for now): every node of the cluster replicates every group (a 3-node cluster has
3 replicas of each of its ``groups`` groups); ``group = placement.group_of(session_id)``.
The node's identity (node id, cluster id, members, group count) is written to
``<data_dir>/node.json`` on first start and checked on every later start: a data directory is
never reused by another node or with another membership.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from raft import NONE, Config
from raft.driver import Driver, DriverConfig
from raft.multi import HostConfig, MultiRaft
from raft.transport import Transport
from raft.wal import WAL

from .config import ConfigError, Settings, parse_address
from .router import Router, RouterConfig
from .state import ConversationState

logger = logging.getLogger(__name__)

IDENTITY_FILE = "node.json"


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = s = settings
        self.voters = tuple(sorted({s.node_id, *s.peer_map}))
        os.makedirs(s.data_dir, exist_ok=True)
        self._check_identity()
        self.state = ConversationState(groups=s.groups)
        group_cfg = Config(
            s.node_id,
            election_ticks=s.election_ticks,
            heartbeat_ticks=s.heartbeat_ticks,
            commit_broadcast=False,
            seed=s.node_id,
        )
        self.host = MultiRaft(HostConfig(group_cfg))
        self.wal = WAL.open(os.path.join(s.data_dir, "wal"))
        self.driver = Driver(
            self.host,
            self.wal,
            self.state,
            DriverConfig(tick_s=s.tick_ms / 1000, snapshot_entries=s.snapshot_entries),
        )
        self.router = Router(s.node_id, self.driver, RouterConfig(s.request_timeout_s))
        self.driver.on_leader_change = self.router.on_leader_change
        self.driver.add_groups(range(s.groups), self.voters)
        self.transport: Transport | None = None

    def _check_identity(self) -> None:
        s = self.settings
        path = os.path.join(s.data_dir, IDENTITY_FILE)
        mine = {
            "node_id": s.node_id,
            "cluster_id": s.cluster_id,
            "voters": list(self.voters),
            "groups": s.groups,
        }
        if os.path.exists(path):
            with open(path) as f:
                known = json.load(f)
            for key, value in mine.items():
                if known.get(key) != value:
                    raise ConfigError(
                        f"config: {key}: {value!r} differs from {known.get(key)!r} recorded in "
                        f"{path} (a data directory belongs to one node of one cluster)"
                    )
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(mine, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    async def start(self) -> None:
        s = self.settings
        peers = s.peer_map
        if peers:
            on_batch, up, down, snap = self.driver.transport_callbacks()

            def on_peer_up(peer: int) -> None:
                up(peer)
                self.router.on_peer_up(peer)

            def on_peer_down(peer: int) -> None:
                down(peer)
                self.router.on_peer_down(peer)

            self.transport = Transport(
                s.node_id,
                s.cluster_id,
                s.secret.encode(),
                parse_address(s.peer_listen, "peer_listen"),
                peers,
                on_batch,
                on_peer_up,
                on_peer_down,
                snap,
                on_app=self.router.on_app,
            )
            self.driver.attach(self.transport)
            self.router.attach(self.transport)
            await self.transport.start()
        await self.driver.start()
        self.router.start()

    async def stop(self) -> None:
        self.router.stop()
        await self.driver.stop()
        if self.transport is not None:
            await self.transport.close()
        self.wal.close()

    def advertise(self, client_address: str) -> None:
        """Tell the peers (now and whenever they connect) where this node serves clients."""
        self.router.client_address = client_address
        self.router.addresses[self.settings.node_id] = client_address
        if self.transport is not None:
            for peer in self.transport.connected_peers():
                self.router.on_peer_up(peer)

    def leaders_known(self) -> bool:
        return all(self.host.leader(g) != NONE for g in self.host.groups())

    async def wait_leaders(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.leaders_known():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True
