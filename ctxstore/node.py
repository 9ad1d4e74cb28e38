"""A ctxstore node: WAL + multi-group Raft + peer transport + the conversation state machine +
the request router + the local archive, subscriptions and inboxes, on one event loop (design
§3, §5.3, §5.4, §5.7).  The client server (``server.py``) sits on top; ``cli.py`` starts it.

What an applied entry changed reaches, through the state's observer (``Node`` itself): the
archive (every message as it leaves the hot tail, and each group's applied index), live
subscriptions and inboxes (every message).  The log is compacted no further than the
archive's durable index (``Driver.compact_floor``): a message is always in the WAL, in a
snapshot's tail, or durably in the archive.  A snapshot installed from a leader hands its
tails to the archive, which records what it lacks for ``Backfill`` to copy from peers.  A
fatal archive or WAL error resolves ``failed``.  With ``postgres_dsn``, a ``Flusher``
(``ctxstore/pg/``) copies what the groups this node leads commit to Postgres, and the archive's
retention keeps every row not yet there.

Placement (design §5.6): every node runs the meta group (group id ``groups``, outside the data
groups; ``ctxstore/meta.py``), whose state is the cluster view (``membership.ClusterView``).
A node hosts the data groups the view places on it (``ClusterView.targets``: rendezvous
hashing over the active nodes, ``min(3, N)`` replicas; with 3 nodes, every group), and creates
a group on demand when Raft traffic arrives for one the view places on it (it is being added
as a learner, ``_on_batch``).  ``group = placement.group_of(session_id)``.  Its ``Mover``
(ctxstore/mover.py) moves the groups it leads toward their targets; on the meta leader it also
activates joiners, retires drained nodes, and keeps every member following the meta group.

The founders (``peers`` at first start) bootstrap the meta group with the first view (every
founder active) and each of their data groups with its target voters.  A node that joins
later (``serve --join``, ``ctxstore/join.py``) starts with nothing but the meta group, empty.
The node's identity (node id, cluster id, founders, group count, the first view) is written to
``<data_dir>/node.json`` on first start and checked on every later start: a data directory is
never reused by another node or with another membership.  A node the view says was removed
does not start (its id is retired).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from raft import NONE, Config, NodeStopped, RaftError
from raft.driver import Driver, DriverConfig
from raft.multi import HostConfig, MultiRaft
from raft.transport import Transport
from raft.wal import WAL
from wire.aio import Handler, Server, serve
from wire.protocol import ContextReason, Session

from .agents.engine import Dispatcher
from .archive import Archive, ArchiveConfig, Retention
from .backfill import Backfill, serve_history
from .config import ConfigError, Settings, parse_address
from .context import WindowCache
from .history import History
from .inbox import Inboxes, InboxLimits
from .limits import Limits, check
from .membership import (
    ClusterView,
    MetaCommand,
    MetaResult,
    NodeState,
    SetClientAddress,
    SetState,
    bootstrap_view,
    encode_meta,
)
from .meta import Machines, MetaMachine
from .mover import META_RETRY_S, Mover
from .peer_messages import HistoryFetch, HistoryRows, Led
from .peer_messages import encode as _encode_peer
from .records import StoredMessage
from .retire import Retirer
from .router import Router, RouterConfig
from .state import ConversationState, StateLimits
from .strays import Strays
from .subscriptions import SubscriptionLimits, Subscriptions
from .tokens import TokenCounters
from .window import Window

if TYPE_CHECKING:
    from .pg.flusher import Flusher
    from .pg.history import PostgresHistory

logger = logging.getLogger(__name__)

IDENTITY_FILE = "node.json"
ARCHIVE_FILE = "archive.sqlite3"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Node:
    def __init__(
        self,
        settings: Settings,
        limits: Limits | None = None,
        replicas: Callable[[int], tuple[int, ...]] | None = None,
    ) -> None:
        """Raises ``ConfigError`` for settings or ``limits`` that do not agree (limits.check: a
        largest message must fit every stage it passes through).  ``replicas(group)``: the
        nodes holding each group (default: the cluster view's targets); this node hosts the
        groups it is one of the replicas of, the others it serves through ``ctxstore.relay``."""
        self.settings = s = settings
        self.limits = lim = limits or Limits()
        check(lim)
        self.voters = tuple(sorted({s.node_id, *s.peer_map}))  # the founders (joined: none)
        self.meta_group = s.groups  # (outside the data groups)
        # The nodes holding each group: the cluster view's targets (``replicas`` overrides it
        # in tests; the relay reads this attribute whenever it routes).
        self.replicas: Callable[[int], tuple[int, ...]] = replicas or self._view_replicas
        os.makedirs(s.data_dir, exist_ok=True)
        self.joined = False  # this node joined a running cluster (serve --join)
        initial = self._check_identity()
        self.meta = MetaMachine(initial)
        self.meta.on_view = self._on_view
        self._targets: dict[int, tuple[int, ...]] = initial.targets()
        state_limits = StateLimits(
            tail_messages_max=s.tail_messages_max, group_tail_bytes_max=s.group_tail_bytes_max
        )
        self.state = ConversationState(state_limits, groups=s.groups, observer=self)
        self.retention = Retention(s.retention_max_messages, s.retention_max_age_s)
        self.archive = Archive(
            os.path.join(s.data_dir, ARCHIVE_FILE),
            ArchiveConfig(retention=self.retention),
            on_fatal=self._fatal,
            hold=None if s.postgres_dsn is None else self._postgres_hold,
        )
        self.history = History(self.state, self.archive, self.retention, now_ms)
        self.subscriptions = Subscriptions(
            self.state, self.history, SubscriptionLimits(page_bytes=lim.push_page_bytes)
        )
        self.inboxes = Inboxes(self.state, InboxLimits())
        self.counters = TokenCounters(s.tokenizer)
        self.window_cache = WindowCache(s.context_cache_bytes)
        self.failed: asyncio.Future[BaseException] | None = None
        self._evicted_early: list[tuple[int, int, StoredMessage]] | None = []
        group_cfg = Config(
            s.node_id,
            election_ticks=s.election_ticks,
            heartbeat_ticks=s.heartbeat_ticks,
            commit_broadcast=False,
            skip_busy_heartbeats=True,
            seed=s.node_id,
            max_size_per_msg=lim.raft_msg_bytes_max,
        )
        self.host = MultiRaft(HostConfig(group_cfg))
        self.host.prompt = self._prompt_commit
        self.wal = WAL.open(os.path.join(s.data_dir, "wal"), inline=s.wal_writer == "inline")
        self.driver = Driver(
            self.host,
            self.wal,
            Machines(self.meta, self.state, self.meta_group),
            DriverConfig(
                tick_s=s.tick_ms / 1000,
                snapshot_entries=s.snapshot_entries,
                proposal_timeout_s=s.request_timeout_s,  # the router answered by then
            ),
        )
        self.router = Router(
            s.node_id,
            self.driver,
            RouterConfig(
                s.request_timeout_s,
                entry_bytes_max=lim.entry_bytes_max,
                batch_appends_max=s.batch_appends_max,
            ),
        )
        self.router.history_server = self._serve_history
        self.driver.before_pass = self.router.propose_batches  # appends batched per pass
        self.driver.on_leader_change = self._on_leader_change
        self._leaderless: dict[int, float] = {}  # group -> since when (loop time) no leader
        self._leaderless_timer: asyncio.TimerHandle | None = None
        self._transport_starting = False
        self._started = False  # (views restored before start wait for it)
        self._advertising: asyncio.Task[None] | None = None
        self._retiring: set[int] = set()
        self._led: set[int] = set()  # the groups this node leads (on_leader_change)
        self.driver.compact_floor = self._compact_floor
        self.driver.on_snapshot_installed = self._snapshot_installed
        self.retirer = Retirer(self.driver, self.state, self.archive)
        self.driver.on_removed = self._on_removed
        self._retirements: set[asyncio.Task[None]] = set()
        self.strays = Strays(
            s.node_id,
            self.driver,
            lambda g: s.node_id in self.replicas(g),
            self._send_app,
            self._retire_stray,
            self.meta_group,
            lambda g: g in self.retirer.retiring,
        )
        self.router.on_member = self.strays.on_envelope
        self.router.placed = lambda g: g == self.meta_group or s.node_id in self.replicas(g)
        self._led_sent = (-1, float("-inf"))  # (count, when) last sent to the peers (Led)
        self._housekeeping: asyncio.TimerHandle | None = None
        self._drain_proposed = float("-inf")
        self._add_groups(initial)
        self.mover = Mover(
            s.node_id,
            self.driver,
            lambda: self.meta.view,
            self._live,
            s.moves_max,
            s.mover_interval_ms / 1000,
            meta_group=self.meta_group,
            propose_meta=self.propose_meta,
            balance_interval_s=s.balance_interval_s,
            transfers_max=s.leader_transfers_max,
            led=lambda: self._led,
        )
        self.router.on_led = self._on_led
        me = self.meta.view.node(s.node_id)
        if me is not None and me.state is NodeState.REMOVED:
            self.wal.close()
            raise ConfigError(
                f"node {s.node_id} was removed from the cluster: its id is retired (start a "
                "new node with a new id and an empty data directory)"
            )
        self.backfill = Backfill(s.node_id, self.archive, self.router, self.driver)
        self.transport: Transport | None = None
        self.postgres: Flusher | None = None
        self.postgres_history: PostgresHistory | None = None
        if s.postgres_dsn is not None:
            from .pg.flusher import Flusher, PostgresConfig

            config = PostgresConfig(
                s.postgres_dsn,
                flush_interval_s=s.postgres_flush_interval_ms / 1000,
                flush_rows=s.postgres_flush_rows,
                pool_size=s.postgres_pool_size,
                propose_timeout_s=s.request_timeout_s,
            )
            self.postgres = Flusher(s.node_id, self.state, self.archive, self.driver, config)
            if s.postgres_serve_history:
                from .pg.history import PostgresHistory

                # (a read's query ends well within the request's deadline: ``unavailable``)
                self.postgres_history = PostgresHistory(
                    self.postgres, read_timeout_s=min(10.0, s.request_timeout_s / 2)
                )
                self.backfill.source = self.postgres_history.fetch
                self.history.older = self.postgres_history.read
        self.dispatcher = Dispatcher(
            s.node_id, self.state, self.router, self.group_leader, s.groups, self.history,
            self.subscriptions, self.counters, now_ms, self.window_cache,
        )  # fmt: skip
        self.dispatcher.relay = self.router.relay_chunks  # subscribers on other nodes
        self.router.on_chunks = self.subscriptions.on_chunks
        self.router.chunk_sessions = lambda: list(self.subscriptions.chunk_sessions)
        self.subscriptions.on_chunk_interest = self.router.chunk_interest

    def _postgres_hold(self, session_id: str) -> int:
        """The archive's retention floor for ``session_id`` (called on the archive's writer
        thread: a session being removed on the loop meanwhile holds everything)."""
        try:
            return self.state.postgres_flushed_seq(session_id) or 0
        except (KeyError, RuntimeError):
            return 0

    # -- StateObserver -----------------------------------------------------------------------------
    def on_message(self, group: int, index: int, user_id: str, message: StoredMessage) -> None:
        self.subscriptions.on_message(message)
        self.inboxes.on_change(user_id, message.session_id)
        if self.postgres is not None:
            self.postgres.on_message(group)
        self.dispatcher.on_message(group, message)

    def on_session(self, group: int, index: int, session: Session) -> None:
        self.inboxes.on_change(session.user_id, session.id)

    def on_cursor(self, session_id: str, owner_id: str, user_id: str, seq: int) -> None:
        if user_id == owner_id:  # unread counts follow the owner's cursor
            self.inboxes.on_change(owner_id, session_id)

    def on_context(self, session_id: str, window: Window, reasons: list[ContextReason]) -> None:
        self.subscriptions.on_context(session_id, window, reasons)

    def on_evict(self, group: int, index: int, message: StoredMessage) -> None:
        self.window_cache.offer(self.state, message)
        if self._evicted_early is not None:  # restored before the archive started
            self._evicted_early.append((group, index, message))
        else:
            self.archive.add(group, index, message)

    def on_applied(self, group: int, index: int) -> None:
        self.archive.applied(group, index)

    def on_agent(self, agent_id: str) -> None:
        self.dispatcher.on_agent(agent_id)
        if self.postgres is not None:
            self.postgres.on_agent()

    def _snapshot_installed(self, group: int, index: int) -> None:
        self._archive_tails(group, index)
        self.subscriptions.on_restore(group)
        self.inboxes.on_group_replaced(group)
        self.dispatcher.on_agent("")  # its agents were replaced too
        if self.postgres is not None:
            self.postgres.on_agent()
        self.backfill.kick()

    def _archive_tails(self, group: int, index: int) -> None:
        """Hand the tails of the snapshot installed at ``index`` to the archive, which records
        the ranges below them it lacks (for ``Backfill``)."""
        sessions, tail = self.state.group_tails(group)
        self.archive.restore(group, index, sessions, tail)

    async def _serve_history(self, fetch: HistoryFetch) -> HistoryRows:
        return await serve_history(self.history, fetch)

    def _fatal(self, exc: BaseException) -> None:
        logger.critical("archive failed: %r", exc)
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(exc)

    def _check_identity(self) -> ClusterView:
        """Check (or, at first start, write) ``node.json``; the cluster's first view."""
        s = self.settings
        path = os.path.join(s.data_dir, IDENTITY_FILE)
        mine: dict[str, Any] = {
            "node_id": s.node_id,
            "cluster_id": s.cluster_id,
            "voters": list(self.voters),
            "groups": s.groups,
        }
        if not os.path.exists(path):
            if s.join is not None:
                raise ConfigError(
                    f"config: join: {path} is missing: the node must first be admitted "
                    "(ctxstore serve --join does so before it starts the node)"
                )
            initial = self._founders_view()
            write_identity(s.data_dir, {**mine, "initial_view": _view_json(initial)})
            return initial
        with open(path) as f:
            known = json.load(f)
        self.joined = bool(known.get("joined"))
        if self.joined:
            mine["voters"] = known.get("voters")  # (a joiner has no founders' list of its own)
        for key, value in mine.items():
            if known.get(key) != value:
                raise ConfigError(
                    f"config: {key}: {value!r} differs from {known.get(key)!r} recorded in "
                    f"{path} (a data directory belongs to one node of one cluster)"
                )
        if "initial_view" in known:
            return msgspec.json.decode(json.dumps(known["initial_view"]).encode(), type=ClusterView)
        initial = self._founders_view()  # a data directory of before the meta group
        write_identity(s.data_dir, {**known, "initial_view": _view_json(initial)})
        return initial

    def _founders_view(self) -> ClusterView:
        """The first view of the founders (every one active), as every founder computes it
        from its configuration: a founder's peer address is the one its peers dial."""
        s = self.settings
        addresses = {i: f"{h}:{p}" for i, (h, p) in s.peer_map.items()}
        addresses[s.node_id] = s.peer_listen
        return bootstrap_view(((i, addresses[i], "") for i in self.voters), groups=s.groups)

    def _add_groups(self, initial: ClusterView) -> None:
        """Host the meta group and the data groups: at a founder's first start each data group
        the first view places here, bootstrapped with its target voters; later, the groups its
        WAL holds (the others it is given arrive as Raft traffic, ``_on_batch``)."""
        s, me, meta = self.settings, self.settings.node_id, self.meta_group
        founder = not self.joined
        voters = initial.meta_voters()
        self.driver.add_groups([meta], voters if founder and me in voters else ())
        removed = set(self.driver.removed_groups())  # (left: hosted again only on demand)
        held = [g for g in self.wal.groups() if g != meta and g < s.groups and g not in removed]
        if founder and not held and not removed:
            by_voters: dict[tuple[int, ...], list[int]] = {}
            for g in range(s.groups):
                target = tuple(sorted(self.replicas(g)))
                if me in target:
                    by_voters.setdefault(target, []).append(g)
            for target, groups in sorted(by_voters.items()):
                self.driver.add_groups(groups, target)
        elif held:
            self.driver.add_groups(held, ())

    def _compact_floor(self, group: int) -> int:
        if group == self.meta_group:
            return 1 << 62  # (the view is its own snapshot: no archive behind it)
        return self.archive.archived_index(group)

    # -- the cluster view -------------------------------------------------------------------------
    @property
    def view(self) -> ClusterView:
        return self.meta.view

    def _view_replicas(self, group: int) -> tuple[int, ...]:
        """The nodes the view places ``group`` on (``replicas`` by default)."""
        return self._targets.get(group, self.voters)

    def hosts(self, group: int) -> bool:
        return group in self.host

    def data_groups(self) -> list[int]:
        """The data groups hosted here (the meta group left out)."""
        return [g for g in self.host.groups() if g != self.meta_group]

    def group_leader(self, group: int) -> int:
        """The leader of ``group`` as this node knows it (``NONE`` if it does not host it)."""
        return self.host.leader(group) if group in self.host else NONE

    def _on_view(self, view: ClusterView) -> None:
        """A new view applied (inside the driver's pass: what touches the transport or the
        driver waits for the next loop iteration)."""
        self._targets = view.targets()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # (restored before start: start() syncs the peers)
        loop.call_soon(self._sync_peers)

    def _sync_peers(self) -> None:
        """Dial the view's members, retire its removed nodes; stop if this node was removed."""
        if not self._started:
            return
        view, me = self.meta.view, self.settings.node_id
        mine = view.node(me)
        if mine is not None and mine.state is NodeState.REMOVED:
            logger.critical("node %d was removed from the cluster (view %d)", me, view.version)
            if self.failed is not None and not self.failed.done():
                self.failed.set_result(Retired(f"node {me} was removed from the cluster"))
            return
        others = [n for n in view.members() if n != me]
        if self.transport is None:
            if not others or self._transport_starting:
                return
            self._transport_starting = True
            asyncio.get_running_loop().create_task(self._start_transport())
            return
        known = self.transport.peers()
        for n in others:
            info = view.nodes[n]
            if n not in known and not self.transport.retired(n):
                try:
                    self.transport.add_peer(n, parse_address(info.peer_address, "peer"))
                except ConfigError:
                    logger.warning("node %d: bad peer address %r", n, info.peer_address)
        loop = asyncio.get_running_loop()
        for n in view.in_state(NodeState.REMOVED):
            if n == me or n in self._retiring or self.transport.retired(n):
                continue
            if self.transport.is_connected(n):  # a grace to hear of it from the meta group
                self._retiring.add(n)
                loop.call_later(RETIRE_GRACE_S, self._retire, n)
            else:
                self._retire(n)

    def _retire(self, node: int) -> None:
        if self.transport is not None and not self.transport.retired(node):
            self.transport.retire_peer(node)
            logger.warning("node %d retired: its connections are refused from now on", node)

    def _live(self) -> set[int]:
        return set() if self.transport is None else set(self.transport.connected_peers())

    def propose_meta(
        self, cmd: MetaCommand, done: Callable[[object, BaseException | None], None] | None = None
    ) -> None:
        """Propose a meta command to the meta group's leader (here, or forwarded to it); the
        view shows its effect once applied here.  ``done(result, error)`` once answered (a
        forwarded command's result is the leader's, decoded as a data command's: only its
        error is meaningful)."""
        data = encode_meta(cmd)

        def answered(result: object, exc: BaseException | None) -> None:
            if exc is not None:
                logger.info("meta command %r: %s", cmd, exc)
            if done is not None:
                done(result, exc)

        if self.host.leader(self.meta_group) == self.settings.node_id:
            try:
                self.driver.propose_then(self.meta_group, data, answered)
            except RaftError as e:
                answered(None, e)
        else:
            self.router.submit_then(self.meta_group, data, answered)

    def meta_result(self, cmd: MetaCommand) -> MetaResult:
        """What ``cmd`` would answer on this node's view now (a pre-check before proposing)."""
        from .membership import apply_meta

        return apply_meta(self.meta.view, cmd)[1]

    async def start(self) -> None:
        s = self.settings
        self.failed = asyncio.get_running_loop().create_future()
        await self.archive.start()  # before anything is applied: it knows what it holds
        early, self._evicted_early = self._evicted_early or [], None
        for group, index, message in early:
            self.archive.add(group, index, message)
        await self.retirer.recover(self.driver.removed_groups())
        for group in self.host.groups():
            # A snapshot installed from a leader just before a crash, whose archive transaction
            # did not commit: hand its tails over again (rows are idempotent; gaps recorded).
            index = self.wal.storage(group).snap_meta.index
            if index > self.archive.archived_index(group):
                self._archive_tails(group, index)
        self._started = True
        if s.peer_map or self.joined or len(self.meta.view.members()) > 1:
            self._make_transport()
            assert self.transport is not None
            await self.transport.start()
            self._sync_peers()
        await self.driver.start()
        assert self.driver.failed is not None
        self.driver.failed.add_done_callback(self._driver_failed)
        self.router.start()
        self.backfill.start()
        if self.postgres is not None:
            self.postgres.start()
        self.dispatcher.start()
        self.mover.start()
        self._housekeeping = asyncio.get_running_loop().call_later(HOUSEKEEPING_S, self._housekeep)
        if self.transport is not None:
            self._leaderless_timer = asyncio.get_running_loop().call_later(
                LEADERLESS_CHECK_S, self._check_leaderless
            )

    def _prompt_commit(self, group: int) -> bool:
        """Whether this node, a follower of ``group``, applies what its leader's commit notice
        says at once: when it pushes the group's messages to subscribers (a session's, or an
        inbox, which any group may change), so they get them when the leader's do.  Other
        groups apply it with their next append or heartbeat, in the Ready that handles it
        anyway (a Ready per commit costs ~5 % of the appends a second at 256 in flight)."""
        return group in self.subscriptions.groups or self.inboxes.count > 0

    def _make_transport(self) -> None:
        s = self.settings
        on_batch, up, down, snap = self.driver.transport_callbacks()
        host, me = self.host, s.node_id

        def on_peer_batch(peer: int, items: list[Any]) -> None:
            for group, _ in items:
                if group not in host:
                    self._host_on_demand(group, peer)
            on_batch(peer, items)

        def on_peer_up(peer: int) -> None:
            up(peer)
            self.router.on_peer_up(peer)

        def on_peer_down(peer: int) -> None:
            down(peer)
            self.router.on_peer_down(peer)

        peers = dict(s.peer_map)
        view = self.meta.view
        for n in view.members():
            if n != me and n not in peers:
                peers[n] = parse_address(view.nodes[n].peer_address, "peer")
        self.transport = Transport(
            me,
            s.cluster_id,
            s.secret.encode(),
            parse_address(s.peer_listen, "peer_listen"),
            peers,
            on_peer_batch,
            on_peer_up,
            on_peer_down,
            snap,
            on_app=self.router.on_app,
            frame_bytes_max=self.limits.peer_frame_bytes_max,
            queue_bytes_max=self.limits.peer_queue_bytes_max,
            app_queue_bytes_max=self.limits.app_queue_bytes_max,
            snapshot_bytes_per_s=s.snapshot_send_bytes_per_s,
        )
        self.driver.attach(self.transport)
        self.router.attach(self.transport)

    async def _start_transport(self) -> None:
        """The peer port of a node that had no peers (a single node someone joins)."""
        self._make_transport()
        assert self.transport is not None
        try:
            await self.transport.start()
        except OSError as e:
            self._fatal(e)
            return
        self._sync_peers()
        if self._leaderless_timer is None:
            self._leaderless_timer = asyncio.get_running_loop().call_later(
                LEADERLESS_CHECK_S, self._check_leaderless
            )

    def _host_on_demand(self, group: int, peer: int) -> None:
        """Raft traffic from ``peer`` for a group not hosted here: host it (empty, to be filled
        by its leader's log or snapshot) if the view places it here or it is the meta group
        (a learner being added); otherwise the message is dropped (and counted)."""
        if group != self.meta_group and self.settings.node_id not in self.replicas(group):
            return
        if group in self.retirer.retiring:
            return  # (its leader asks again once the retirement is done)
        self.driver.add_groups([group], ())
        logger.info("group %d: hosted here from now on (traffic from node %d)", group, peer)

    def _send_app(self, peer: int, data: bytes) -> bool:
        return self.transport is not None and self.transport.send_app(peer, data)

    def _retire_stray(self, group: int, still: Callable[[], bool]) -> None:
        """The group's leader no longer counts this node (ctxstore/strays.py): retire it."""
        task = asyncio.get_running_loop().create_task(self._retire_group(group, still))
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

    def _housekeep(self) -> None:
        """Every ``HOUSEKEEPING_S``: ask about the groups hosted here the view no longer
        places here (``strays``)."""
        loop = asyncio.get_running_loop()
        self._housekeeping = loop.call_later(HOUSEKEEPING_S, self._housekeep)
        try:
            self.strays.run_once(loop.time())
            self._finish_drain(loop.time())
            self._send_led(loop.time())
        except Exception:  # (a bug here must not stop the node: logged, next round)
            logger.exception("housekeeping failed")

    def _send_led(self, now: float) -> None:
        """Tell the peers how many data groups this node leads (``mover.Led``: the balancing of
        nodes that host only some groups), when it changed and every ``LED_RESEND_S``."""
        if self.transport is None:
            return
        count = len(self._led - {self.meta_group})
        if count == self._led_sent[0] and now - self._led_sent[1] < LED_RESEND_S:
            return
        self._led_sent = (count, now)
        data = _encode_peer(Led(count))
        for peer in self.transport.connected_peers():
            self.transport.send_app(peer, data)

    def _on_led(self, peer: int, count: int) -> None:
        self.mover.peer_led[peer] = count

    def _finish_drain(self, now: float) -> None:
        """A leaving node (``admin drain``) that hosts no data group any more (every one
        retired: its removal from each committed) and that no group is placed on proposes its
        own removal (every ``META_RETRY_S``), as ``admin remove`` would, which is then not
        needed after a drain.  The view then retires its id, it stops (``_sync_peers``) and
        the meta leader removes it from the meta group (``meta.meta_step``)."""
        view, me = self.meta.view, self.settings.node_id
        mine = view.node(me)
        if mine is None or mine.state is not NodeState.LEAVING:
            return
        if self.data_groups() or self.retirer.retiring or self._retirements:
            return
        if any(me in t for t in self._targets.values()):
            return
        if now - self._drain_proposed < META_RETRY_S:
            return
        self._drain_proposed = now
        logger.info("drained: no group left here; proposing this node's removal")
        self.propose_meta(SetState(me, NodeState.REMOVED))

    def _on_removed(self, group: int) -> None:
        """This node applied its own removal from ``group``: retire it (its Raft group, state
        and archive rows go; ``ctxstore/retire.py``).  The meta group is left alone: a node
        leaves it only once retired, and then it stops."""
        if group == self.meta_group or not self._started:
            return
        task = asyncio.get_running_loop().create_task(self._retire_group(group))
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

    async def _retire_group(self, group: int, still: Callable[[], bool] | None = None) -> None:
        try:
            await self.retirer.retire(group, still)
        except NodeStopped:
            pass  # (a restart finishes it)
        except Exception as e:
            logger.exception("retiring group %d failed", group)
            self._fatal(e)

    def _driver_failed(self, f: asyncio.Future[BaseException]) -> None:
        if self.failed is not None and not self.failed.done() and not f.cancelled():
            self.failed.set_result(f.result())

    def _on_leader_change(self, group: int, leader: int) -> None:
        if leader == self.settings.node_id:
            self._led.add(group)
        else:
            self._led.discard(group)
        self.router.on_leader_change(group, leader)
        self.dispatcher.on_leader_change(group, leader)
        if leader == NONE:
            self._leaderless.setdefault(group, asyncio.get_running_loop().time())
        else:
            self._leaderless.pop(group, None)

    def _check_leaderless(self) -> None:
        """End the subscriptions of groups this node has known no leader for since
        ``request_timeout_s``: cut off from its peers, it can deliver nothing more, and its
        subscribers would wait in silence for as long as the cut lasts (reads and writes here
        already fail ``unavailable`` after that long)."""
        loop = asyncio.get_running_loop()
        self._leaderless_timer = loop.call_later(LEADERLESS_CHECK_S, self._check_leaderless)
        cutoff = loop.time() - self.settings.request_timeout_s
        for group, since in self._leaderless.items():
            if since <= cutoff:
                message = (
                    f"group {group} has had no leader here for {self.settings.request_timeout_s:g}"
                    " s: subscribe on another node"
                )
                if self.subscriptions.close_group(group, message):
                    logger.info("ended the subscriptions of group %d: no leader", group)

    async def stop(self) -> None:
        if self._advertising is not None:
            self._advertising.cancel()
        await self.mover.stop()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._retirements:
            await asyncio.wait(self._retirements, timeout=self.settings.shutdown_timeout_s / 2)
        await self.dispatcher.stop()
        if self._leaderless_timer is not None:
            self._leaderless_timer.cancel()
            self._leaderless_timer = None
        await self.backfill.stop()
        if self.postgres is not None:  # (its last flush proposes watermarks: the router runs)
            from .pg.flusher import DRAIN_TIMEOUT_S

            drain_s = min(DRAIN_TIMEOUT_S, self.settings.shutdown_timeout_s / 4)
            await self.postgres.stop(drain_s)
        self.router.stop()
        await self.driver.stop()
        if self.transport is not None:
            await self.transport.close()
        self.wal.close()
        await self.archive.stop()  # everything applied is flushed to it

    async def hand_off(self, timeout_s: float) -> int:
        """Transfer the leadership of every group this node leads to connected peers among the
        group's voters (spread round robin), asking again every half second, until it leads
        none or ``timeout_s`` passed.  Returns how many groups it still leads (a group with no
        connected voter to take it over left out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        host, me = self.host, self.settings.node_id
        while True:
            peers = set() if self.transport is None else set(self.transport.connected_peers())
            heirs = {
                g: sorted(set(host.node(g).raft.voters) & peers)
                for g in host.groups()
                if host.leader(g) == me
            }
            led = [g for g, h in heirs.items() if h]
            if not led or loop.time() >= deadline:
                return len(led)
            for i, group in enumerate(led):
                self.driver.transfer_leader(group, heirs[group][i % len(heirs[group])])
            until = min(deadline, loop.time() + 0.5)
            while loop.time() < until and any(host.leader(g) == me for g in led):
                await asyncio.sleep(0.01)

    def advertise(self, client_address: str) -> None:
        """Tell the peers (now and whenever they connect) where this node serves clients."""
        self.router.client_address = client_address
        self.router.addresses[self.settings.node_id] = client_address
        if self.transport is not None:
            for peer in self.transport.connected_peers():
                self.router.on_peer_up(peer)
        if self._advertising is None:
            loop = asyncio.get_running_loop()
            self._advertising = loop.create_task(self._advertise_in_view(client_address))

    async def _advertise_in_view(self, address: str) -> None:
        """Until the view holds ``address`` as this node's client address: propose it (every
        ``ADVERTISE_RETRY_S`` while the meta group has a leader)."""
        me, meta = self.settings.node_id, self.meta_group
        while True:
            info = self.meta.view.node(me)
            if info is not None and info.state is NodeState.REMOVED:
                return
            if info is not None and info.client_address == address:
                return
            if info is not None and self.group_leader(meta) != NONE:
                self.propose_meta(SetClientAddress(me, address))
            await asyncio.sleep(ADVERTISE_RETRY_S)

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


class Retired(Exception):
    """This node was removed from the cluster (its id is retired)."""


def _view_json(view: ClusterView) -> Any:
    return json.loads(msgspec.json.encode(view))


def write_identity(data_dir: str, identity: dict[str, Any]) -> None:
    """Write ``<data_dir>/node.json`` (atomically, synced)."""
    path = os.path.join(data_dir, IDENTITY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(identity, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


ADVERTISE_RETRY_S = 2.0
RETIRE_GRACE_S = 2.0  # a removed node's connections close this long after the view said so
LED_RESEND_S = 5.0  # a node's count of led groups is sent again this often (Led)
HOUSEKEEPING_S = 0.5  # how often strays are looked for (_housekeep)
LEADERLESS_CHECK_S = 1.0  # how often groups without a leader are looked for (_check_leaderless)

NODE_FDS_RESERVED = 512
"""File descriptors a node keeps for itself whatever its clients do: WAL segments, snapshots
being written or sent, the archive, peer connections (two per peer and 64 handshakes), 64 of the
HTTP port's connections (``http_connections_max`` above 64 reserves the rest), the listening
sockets, the event loop's own; and the client
connections accepted over the cap before they are closed (at most ``CLIENT_BACKLOG`` at once:
the event loop accepts a listen queue in one go)."""
CLIENT_BACKLOG = 256  # the client port's listen queue
CLIENT_CONNECTIONS_MIN = 16


def client_connections_cap(settings: Settings) -> int:
    """``client_connections_max`` within the open-file limit: the soft ``RLIMIT_NOFILE`` is
    raised (up to the hard one) to hold it and ``NODE_FDS_RESERVED``; what it cannot hold is
    taken off the client connections (with a warning), so a flood of connections is refused
    before the node runs out of descriptors for its WAL and snapshots.  ``ConfigError`` if
    fewer than ``CLIENT_CONNECTIONS_MIN`` are left."""
    wanted = settings.client_connections_max
    reserved = NODE_FDS_RESERVED + max(0, settings.http_connections_max - 64)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + reserved
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - reserved
    if room < CLIENT_CONNECTIONS_MIN:
        raise ConfigError(
            f"config: client_connections_max: the open-file limit (ulimit -n) is {soft}; a node "
            f"needs {reserved + CLIENT_CONNECTIONS_MIN} at least "
            f"({reserved} for itself and its HTTP port, {CLIENT_CONNECTIONS_MIN} for clients)"
        )
    if room < wanted:
        logger.warning(
            "client_connections_max lowered from %d to %d: the open-file limit is %d",
            wanted,
            room,
            soft,
        )
        return room
    return wanted


async def serve_clients(handler: Handler, settings: Settings, host: str, port: int) -> Server:
    """The client port (``wire.aio``) with the settings' bounds."""
    connections_max = client_connections_cap(settings)
    return await serve(
        handler,
        host,
        port,
        pending_bytes_max=settings.connection_pending_bytes_max,
        node_pending_bytes_max=settings.node_pending_bytes_max,
        idle_timeout_s=settings.client_idle_timeout_s,
        write_stall_timeout_s=settings.client_write_stall_timeout_s,
        connections_max=connections_max,
        connections_per_source_max=settings.client_connections_per_source_max,
        requests_per_pass=settings.client_requests_per_pass,
        backlog=CLIENT_BACKLOG,
    )
