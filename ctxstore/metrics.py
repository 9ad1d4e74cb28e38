"""A node's Prometheus metrics (design §6), served at ``/metrics`` by the ops port (``ops.py``).

Two kinds, so that metrics cost the hot path (almost) nothing:

- Counters and gauges the node keeps anyway (the driver's, the Raft host's, the WAL writer's,
  the transport's, the router's and the service's stats) are read when Prometheus scrapes, by
  ``NodeCollector``: no work is added where they are counted.
- Latencies that exist only on the hot path (an append from request to ack; a proposal from
  ``propose`` to applied) go into ``LatencyHistogram``s: one ``bisect`` and two additions per
  observation, on the event loop's thread (no lock).  ``NodeMetrics.attach`` installs them as
  the hooks ``Service.on_append_latency`` and ``Driver.on_commit_latency``, and the timing of
  the cyclic garbage collector's pauses (``CollectorPauses``) as a ``gc.callbacks`` hook.

Rules: names are ``ctxstore_*`` with the unit last (``_seconds``, ``_bytes``, ``_total``); every
metric carries a real value (nothing is exported before the code that counts it exists); the
registry is the ``NodeMetrics``'s own, never prometheus_client's global one.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from raft import NONE
from raft.wal_segments import FSYNC_BUCKETS_S
from wire.aio import Server

from .agents.engine import BUCKETS_S
from .auth import REASONS
from .membership import NodeState
from .node import Node
from .server import Service

# 0.5 ms … 5 s: a local fsync is ~0.1-2 ms, a replicated append a few ms, the deadline 5 s.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip

# 0.1 ms … 1 s: a young collection takes well under a millisecond, a full one over a large state
# tens of milliseconds (docs/benchmarks.md).
GC_PAUSE_BUCKETS_S = (
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
)  # fmt: skip


class LatencyHistogram:
    """Counts of observations per bucket (``le`` semantics: a value equal to a bound counts in
    that bound's bucket).  Observe from the event loop's thread only."""

    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        assert bounds and list(bounds) == sorted(set(bounds)), "bounds: increasing, not empty"
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        return cumulative_buckets(self.bounds, self.counts)


def cumulative_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """``(le, observations <= le)`` for every bound, then ``+Inf``: Prometheus buckets, from
    ``counts`` per bucket (``counts[i]``: in (bounds[i - 1], bounds[i]]; one more at the end,
    above every bound)."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(bounds, counts, strict=False):
        total += n
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + counts[-1]))
    return out


class CollectorPauses:
    """The pauses of the cyclic garbage collector, by generation (0, 1, 2): a ``gc.callbacks``
    hook (``install``/``uninstall``) that times each collection from its "start" to its "stop"
    callback.  A collection stops every thread of the process, so these are pauses of the
    node's event loop whichever thread set one off; with several nodes in one process (tests),
    each node's hook sees every collection of the process.  Collections never overlap (the
    interpreter runs one at a time), so one start time is enough."""

    __slots__ = ("_clock", "_started", "by_generation", "max_s")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.by_generation = tuple(LatencyHistogram(GC_PAUSE_BUCKETS_S) for _ in range(3))
        self.max_s = [0.0, 0.0, 0.0]
        self._clock = clock
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        started, self._started = self._started, None
        if started is None:  # installed during a collection: its stop has no start
            return
        elapsed = self._clock() - started
        generation = info["generation"]
        self.by_generation[generation].observe(elapsed)
        if elapsed > self.max_s[generation]:
            self.max_s[generation] = elapsed

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def leader_counts(node: Node) -> tuple[int, int, int]:
    """``(groups, groups led by this node, groups without a known leader)``."""
    me = node.settings.node_id
    groups = led = unknown = 0
    for g in node.data_groups():
        lead = node.host.leader(g)
        groups += 1
        led += lead == me
        unknown += lead == NONE
    return groups, led, unknown


class NodeMetrics:
    """The registry of one node: its collector and its hot-path histograms."""

    def __init__(self, node: Node, service: Service, clients: Server | None = None) -> None:
        self.node = node
        self.service = service
        self.append_ok = LatencyHistogram()
        self.append_error = LatencyHistogram()
        self.commit = LatencyHistogram()
        self.gc_pauses = CollectorPauses()
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(self, clients))

    def attach(self) -> None:
        """Install the hot-path hooks (one node has one ``NodeMetrics``)."""
        self.service.on_append_latency = self.observe_append
        self.node.driver.on_commit_latency = self.commit.observe
        self.gc_pauses.install()

    def detach(self) -> None:
        self.service.on_append_latency = None
        self.node.driver.on_commit_latency = None
        self.gc_pauses.uninstall()

    def observe_append(self, seconds: float, ok: bool) -> None:
        (self.append_ok if ok else self.append_error).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self.registry)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counters(
    name: str, doc: str, labels: Sequence[str], rows: Iterable[tuple[Sequence[str], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


class NodeCollector(Collector):
    """Reads the node's counters at scrape time (on the event loop, like every writer of them,
    except the WAL writer thread's plain integer fields)."""

    def __init__(self, metrics: NodeMetrics, clients: Server | None) -> None:
        self.metrics = metrics
        self.clients = clients

    def collect(self) -> Iterator[Metric]:
        yield from self._service()
        yield from self._streams()
        yield from self._archive()
        yield from self._postgres()
        yield from self._raft()
        yield from self._cluster()
        yield from self._relay()
        yield from self._wal()
        yield from self._peers()
        yield from self._collector()
        yield from self._agents()

    def _cluster(self) -> Iterator[Metric]:
        """The cluster view as applied here (design §5.6) and this node's mover."""
        node = self.metrics.node
        view = node.view
        yield _gauge("ctxstore_cluster_view_version", "The cluster view's version here.",
                     view.version)  # fmt: skip
        states = GaugeMetricFamily(
            "ctxstore_cluster_nodes", "Nodes of the cluster view, by state.", labels=["state"]
        )
        for state in NodeState:
            states.add_metric([state.value], len(view.in_state(state)))
        yield states
        placed: Counter[int] = Counter()
        for target in view.targets().values():
            placed.update(target)
        leads: Counter[int] = Counter()
        for g in node.data_groups():
            lead = node.host.leader(g)
            if lead != NONE:
                leads[lead] += 1
        per_node = GaugeMetricFamily(
            "ctxstore_cluster_groups",
            "Data groups the view places on each node (its target replicas).",
            labels=["node"],
        )
        led = GaugeMetricFamily(
            "ctxstore_cluster_groups_led",
            "Groups each node leads, among the groups hosted here.",
            labels=["node"],
        )
        for n in view.members():
            per_node.add_metric([str(n)], placed[n])
            led.add_metric([str(n)], leads[n])
        yield per_node
        yield led
        st = node.mover.stats
        yield _gauge(
            "ctxstore_cluster_moves_in_progress",
            "Groups led here whose replicas differ from their target (the mover's last round).",
            st.moving,
        )
        yield _counter("ctxstore_mover_conf_changes_total",
                       "Membership changes the mover proposed.", st.conf_changes)  # fmt: skip
        yield _counter("ctxstore_mover_transfers_total",
                       "Leadership transfers the mover started (moves and balancing).",
                       st.transfers)  # fmt: skip
        yield _counter("ctxstore_mover_failed_total",
                       "Membership changes proposed that did not apply.", st.failed)  # fmt: skip
        yield _counter("ctxstore_mover_meta_commands_total",
                       "View changes the mover proposed as the meta leader.",
                       st.meta_commands)  # fmt: skip

    def _relay(self) -> Iterator[Metric]:
        """Requests and streams of groups not hosted here, and those served for other nodes."""
        service = self.metrics.service
        relay, follow = service.relay, service.follow
        yield _counter("ctxstore_relay_requests_total",
                       "Requests sent to a replica: their group is not hosted here.",
                       relay.relayed)  # fmt: skip
        yield _counter("ctxstore_relay_served_total",
                       "Requests served here for another node.", relay.served_relays)  # fmt: skip
        yield _counter("ctxstore_relay_refused_total",
                       "Requests from other nodes for a group not hosted here, or that left "
                       "here before they were proposed (asked on).",
                       relay.refused_relays)  # fmt: skip
        yield _counter("ctxstore_relay_handed_on_total",
                       "Requests whose group moved away while here, before anything of them "
                       "was proposed here: relayed to its replicas.",
                       service.handed_on)  # fmt: skip
        yield _counter("ctxstore_relay_streams_resumed_total",
                       "Relayed subscriptions and inboxes resumed at another replica.",
                       follow.resumed)  # fmt: skip
        yield _counter("ctxstore_relay_acks_withheld_total",
                       "Times a relayed stream's client was too far behind to take more.",
                       follow.acks_withheld)  # fmt: skip

    def _agents(self) -> Iterator[Metric]:
        """The agents' dispatches this node ran as the leader of their sessions' groups."""
        node = self.metrics.node
        stats = sorted(node.dispatcher.stats.items())

        def per_agent(name: str, doc: str, kind: str, field: str) -> Metric:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            metric = family(name, doc, labels=["agent"])
            for agent, st in stats:
                metric.add_metric([agent], getattr(st, field))
            return metric

        yield per_agent("ctxstore_agent_calls", "Webhook calls started (attempts).", "counter",
                        "attempts")  # fmt: skip
        yield per_agent("ctxstore_agent_replies", "Assembled replies stored.", "counter",
                        "replies")  # fmt: skip
        yield per_agent("ctxstore_agent_chunks", "Valid chunks received and pushed.", "counter",
                        "chunks")  # fmt: skip
        yield per_agent("ctxstore_agent_calls_in_flight", "Webhook calls running now.", "gauge",
                        "in_flight")  # fmt: skip
        for name, doc, field in (
            ("ctxstore_agent_call_failures", "Attempts that failed, by reason.", "failures"),
            ("ctxstore_agent_drops", "Dispatches dropped (stored as a system message), by "
             "reason.", "drops"),
        ):  # fmt: skip
            metric = CounterMetricFamily(name, doc, labels=["agent", "reason"])
            for agent, st in stats:
                for reason, n in sorted(getattr(st, field).items()):
                    metric.add_metric([agent, reason], n)
            yield metric
        for name, doc, field in (
            ("ctxstore_agent_first_chunk_seconds",
             "From the user message applied on the leader (acked) to its first chunk pushed.",
             "first_chunk"),
            ("ctxstore_agent_call_seconds", "One webhook call, from start to end.", "duration"),
        ):  # fmt: skip
            histogram = HistogramMetricFamily(name, doc, labels=["agent"])
            for agent, st in stats:
                h = getattr(st, field)
                histogram.add_metric([agent], cumulative_buckets(BUCKETS_S, h.counts), h.sum_s)
            yield histogram
        subs = node.subscriptions
        yield _counter("ctxstore_agent_chunks_pushed_total",
                       "Live agent chunks pushed to subscribers here.",
                       subs.pushed_chunks)  # fmt: skip
        yield _counter("ctxstore_agent_chunks_dropped_total",
                       "Live agent chunks not pushed: the subscriber was behind.",
                       subs.chunks_dropped)  # fmt: skip
        yield _counter("ctxstore_agent_chunks_relayed_total",
                       "Live agent chunks sent to peers for their subscribers.",
                       node.router.chunks_relayed)  # fmt: skip
        pool = node.dispatcher.pool
        yield _counter("ctxstore_agent_connections_opened_total",
                       "Webhook connections opened (HTTP/1.1 and HTTP/2).",
                       pool.connections_opened)  # fmt: skip
        yield _gauge("ctxstore_agent_connections_idle",
                     "HTTP/1.1 webhook connections kept alive, idle.",
                     pool.idle_connections())  # fmt: skip
        yield _counter("ctxstore_agent_lookups_total",
                       "Read barriers run to find a session's agent not known here.",
                       node.dispatcher.lookups)  # fmt: skip
        yield _counter("ctxstore_agent_remote_lookups_total",
                       "Agents of groups not hosted here read from a replica (the relay).",
                       node.dispatcher.remote_lookups)  # fmt: skip
        yield _counter("ctxstore_agent_absent_hits_total",
                       "User messages of sessions whose agent is known absent (no barrier).",
                       node.dispatcher.absent_hits)  # fmt: skip

    def _service(self) -> Iterator[Metric]:
        m, service, router = self.metrics, self.metrics.service, self.metrics.node.router
        s = m.node.settings
        yield InfoMetricFamily(
            "ctxstore_node",
            "This node.",
            value={
                "node_id": str(s.node_id),
                "cluster_id": s.cluster_id,
                "wal_writer": s.wal_writer,
            },
        )
        yield _counter("ctxstore_requests_total", "Client requests received.", service.requests)
        yield _counter(
            "ctxstore_tokens_counted_messages_total",
            "Messages whose tokens this node counted (ctxstore/tokens.py).",
            service.messages_counted,
        )
        yield _counter(
            "ctxstore_tokens_counted_off_loop_total",
            "Of those, long ones counted on a thread, off the event loop.",
            service.counted_off_loop,
        )
        yield _counter(
            "ctxstore_tokens_count_seconds_total",
            "Time spent counting tokens (on the loop and on threads).",
            service.count_seconds,
        )
        cache = service.window_cache
        yield _gauge(
            "ctxstore_context_cache_bytes",
            "Context windows' messages kept in RAM after they left the hot tail.",
            cache.bytes,
        )
        yield _counters(
            "ctxstore_context_reads_total",
            "get_context answers by where their older messages came from.",
            ["source"],
            [
                (["memory"], cache.hits),
                (["archive"], cache.misses),
                (["reply"], service.replies.hits),
            ],
        )
        yield _counters(
            "ctxstore_request_errors_total",
            "Client requests answered with an error, by error code.",
            ["code"],
            (([code], n) for code, n in sorted(service.errors.items())),
        )
        verifier = service.verifier
        yield InfoMetricFamily("ctxstore_auth", "Client authentication.", value={
            "mode": verifier.mode})  # fmt: skip
        yield _counter(
            "ctxstore_auth_verified_total", "Client tokens verified (Hellos accepted).",
            verifier.verified,
        )  # fmt: skip
        yield _counter(
            "ctxstore_auth_refreshed_total",
            "Connections whose token a second Hello refreshed (docs/auth.md).",
            verifier.refreshed,
        )  # fmt: skip
        yield _counters(
            "ctxstore_auth_refusals_total",
            "Clients refused, by reason: a bad token's (unauthorized; docs/auth.md) or "
            "forbidden (a valid token, a request it may not make).",
            ["reason"],
            (([reason], verifier.refusals[reason]) for reason in REASONS),
        )
        append = HistogramMetricFamily(
            "ctxstore_append_latency_seconds",
            "Appends from request received to ack sent, by outcome.",
            labels=["outcome"],
        )
        append.add_metric(["ok"], m.append_ok.cumulative(), m.append_ok.sum_s)
        append.add_metric(["error"], m.append_error.cumulative(), m.append_error.sum_s)
        yield append
        yield HistogramMetricFamily(
            "ctxstore_commit_latency_seconds",
            "Proposals on this node (as leader) from propose to applied.",
            buckets=m.commit.cumulative(),
            sum_value=m.commit.sum_s,
        )
        if self.clients is not None:
            clients = self.clients
            n = len(clients.connections)
            yield _gauge("ctxstore_client_connections", "Open client connections.", n)
            yield _gauge(
                "ctxstore_client_pending_bytes",
                "Bytes held for client requests in flight and unread answers.",
                clients.pending_bytes,
            )
            yield _gauge(
                "ctxstore_client_connections_waiting",
                "Client connections stopped by node_pending_bytes_max.",
                clients.waiting,
            )
            yield _counter(
                "ctxstore_client_connections_refused_total",
                "Client connections refused: over client_connections_max or per source.",
                clients.refused.count,
            )
            yield _counter(
                "ctxstore_client_connections_idle_closed_total",
                "Client connections closed after client_idle_timeout_s.",
                clients.idle_closed,
            )
            yield _counter(
                "ctxstore_client_connections_stalled_closed_total",
                "Client connections aborted after client_write_stall_timeout_s.",
                clients.stalled_closed,
            )
        yield _counter(
            "ctxstore_forwards_sent_total",
            "Writes this node forwarded to their group's leader.",
            router.forwarded,
        )
        yield _counter(
            "ctxstore_forwards_served_total",
            "Writes other nodes forwarded to this node as leader.",
            router.served_forwards,
        )
        yield _counter(
            "ctxstore_requests_group_gone_total",
            "Requests failed unavailable (retryable) because their group left this node while "
            "they waited, or is leaving it with no leader known here.",
            router.group_gone,
        )
        yield _counter(
            "ctxstore_append_batches_total",
            "Raft entries holding several appends (the appends a leader took for one group "
            "in one loop pass).",
            router.batches_proposed,
        )
        yield _counter(
            "ctxstore_appends_batched_total",
            "Appends proposed inside such a batch entry (the others went one per entry).",
            router.appends_batched,
        )

    def _streams(self) -> Iterator[Metric]:
        subs, inboxes = self.metrics.node.subscriptions, self.metrics.node.inboxes
        yield _gauge("ctxstore_subscriptions", "Session subscriptions open here.", subs.count)
        yield _gauge(
            "ctxstore_subscriptions_replaying",
            "Subscriptions reading stored history (not live yet).",
            subs.replaying,
        )
        yield _counter(
            "ctxstore_subscription_messages_total", "Messages pushed to subscribers.",
            subs.pushed_messages,
        )  # fmt: skip
        yield _counter("ctxstore_subscription_gaps_total", "GapEvents pushed.", subs.gaps)
        yield _counter(
            "ctxstore_subscriptions_dropped_slow_total",
            "Subscriptions dropped because the subscriber did not read.",
            subs.dropped_slow,
        )
        yield _gauge("ctxstore_inbox_subscribers", "Inbox subscriptions open here.", inboxes.count)
        yield _counter("ctxstore_inbox_deltas_total", "InboxDelta pushes sent.", inboxes.deltas)

    def _archive(self) -> Iterator[Metric]:
        node = self.metrics.node
        archive = node.archive
        st = archive.stats
        lags = [archive.lag(g) for g in node.data_groups()]
        yield _gauge(
            "ctxstore_archive_lag_entries",
            "Applied Raft entries not yet in the local archive, summed over groups.",
            sum(lags),
        )
        yield _gauge(
            "ctxstore_archive_lag_entries_max", "The largest archive lag of one group.",
            max(lags, default=0),
        )  # fmt: skip
        yield _gauge(
            "ctxstore_archive_backlog_bytes", "Bytes queued for the archive, not yet committed.",
            archive.backlog_bytes,
        )  # fmt: skip
        yield _counter(
            "ctxstore_archive_rows_written_total", "Messages written to the archive.",
            st.rows_written,
        )  # fmt: skip
        yield _counter(
            "ctxstore_archive_batches_total", "Archive transactions committed.", st.batches
        )
        yield _counter(
            "ctxstore_archive_commit_seconds_total", "Time spent in archive transactions.",
            st.commit_seconds_total,
        )  # fmt: skip
        yield _counter(
            "ctxstore_archive_retention_deleted_total", "Messages deleted by retention.",
            st.rows_deleted_by_retention,
        )  # fmt: skip
        yield _gauge(
            "ctxstore_archive_backfill_ranges",
            "Ranges of history still being copied from peers after a snapshot.",
            len(archive.backfill_ranges()),
        )
        yield _counter(
            "ctxstore_archive_backfill_rows_total", "Messages copied from peers into the archive.",
            node.backfill.rows_copied,
        )  # fmt: skip
        yield _counter(
            "ctxstore_archive_backfill_fetch_failures_total",
            "History fetches from peers that failed or were refused (asked again later).",
            node.backfill.fetch_failures,
        )
        yield _counter(
            "ctxstore_history_archive_reads_total",
            "Read and replay pages older than the hot tail, served from the archive.",
            node.history.archive_reads,
        )
        yield _counter(
            "ctxstore_history_archive_waits_total",
            "Of those, pages that met a hole and waited for the archive's queue.",
            node.history.archive_barriers,
        )

    def _postgres(self) -> Iterator[Metric]:
        """The write-behind (ctxstore/pg/flusher.py): only with postgres_dsn."""
        flusher = self.metrics.node.postgres
        if flusher is None:
            return
        st = flusher.stats
        backlog = flusher.backlog_rows()
        yield _gauge(
            "ctxstore_postgres_backlog_rows",
            "Messages of the groups this node leads not yet in Postgres.",
            backlog,
        )
        yield _gauge(
            "ctxstore_postgres_lag_seconds",
            "0 without a backlog; else the time since the last flush that left none.",
            flusher.lag_seconds(backlog),
        )
        yield _gauge("ctxstore_postgres_up", "1 if the last flush (or connection) worked.",
                     int(st.connected))  # fmt: skip
        yield _counter("ctxstore_postgres_flushes_total", "Flush transactions committed.",
                       st.flushes)  # fmt: skip
        yield _counter(
            "ctxstore_postgres_flush_failures_total",
            "Flushes that failed (Postgres down, refusing or too slow); retried with backoff.",
            st.failures,
        )
        yield _counter(
            "ctxstore_postgres_rows_total",
            "Message rows copied to Postgres (a row copied twice counts twice).",
            st.messages,
        )
        yield _counter(
            "ctxstore_postgres_rows_inserted_total",
            "Of those, rows Postgres did not have yet.",
            st.messages_inserted,
        )
        yield _counter(
            "ctxstore_postgres_copy_fallbacks_total",
            "Flushes whose direct COPY of messages met rows Postgres had (a lost watermark,"
            " a backfill): their rows went through INSERT ... ON CONFLICT DO NOTHING instead.",
            st.copy_fallbacks,
        )
        yield _counter(
            "ctxstore_postgres_agent_rows_total",
            "Agent rows written to Postgres (by this node as their group's leader).",
            st.agents,
        )
        yield _counter("ctxstore_postgres_flush_seconds_total",
                       "Time spent in flush transactions.", st.seconds_total)  # fmt: skip
        yield _counter(
            "ctxstore_postgres_skipped_rows_total",
            "Messages gone from this node (retention) before they could be copied.",
            st.skipped,
        )
        history = self.metrics.node.postgres_history
        if history is not None:
            yield _counter(
                "ctxstore_postgres_history_rows_total",
                "Messages this node's archive copied from Postgres (postgres_serve_history).",
                history.rows_served,
            )
            yield _counter(
                "ctxstore_postgres_history_reads_total",
                "Read pages of history this node's archive no longer held, answered from"
                " Postgres (postgres_serve_history).",
                history.reads,
            )
            yield _counter(
                "ctxstore_postgres_history_read_rows_total",
                "Messages in those pages.",
                history.read_rows,
            )
            yield _counter(
                "ctxstore_postgres_history_read_failures_total",
                "Reads Postgres could not answer in time (answered unavailable).",
                history.read_failures,
            )

    def _raft(self) -> Iterator[Metric]:
        node = self.metrics.node
        host, driver = node.host.stats, node.driver.stats
        groups, led, unknown = leader_counts(node)
        awake = node.host.awake_count()
        if node.meta_group in node.host and not node.host.is_quiescent(node.meta_group):
            awake -= 1  # (the data groups' only)
        yield _gauge("ctxstore_raft_groups", "Raft groups hosted here.", groups)
        yield _gauge("ctxstore_raft_groups_led", "Groups this node leads.", led)
        yield _gauge(
            "ctxstore_raft_groups_without_leader", "Groups with no leader known here.", unknown
        )
        yield _gauge("ctxstore_raft_groups_awake", "Groups ticking (not quiescent).", awake)
        yield _gauge("ctxstore_raft_groups_quiescent", "Quiescent groups.", groups - awake)
        yield _counters(
            "ctxstore_raft_campaigns_total",
            "Elections this node started, by trigger.",
            ["trigger"],
            [(["election_timeout"], host.campaigns), (["preferred_leader"], host.early_campaigns)],
        )
        yield _counter(
            "ctxstore_raft_soft_state_changes_total",
            "Leader or role changes of a group seen by this node.",
            driver.soft_state_changes,
        )
        yield _counter("ctxstore_raft_quiesced_total", "Groups that went quiescent.", host.quiesced)
        yield _counter("ctxstore_raft_woken_total", "Quiescent groups woken.", host.woken)
        yield _counter("ctxstore_raft_proposals_total", "Entries proposed here.", driver.proposals)
        yield _counter(
            "ctxstore_raft_applied_entries_total", "Entries applied here.", driver.applied_entries
        )
        yield _counters(
            "ctxstore_raft_snapshots_total",
            "Group snapshots, taken here or restored from a leader's.",
            ["event"],
            [(["taken"], driver.snapshots_taken), (["restored"], driver.snapshots_restored)],
        )
        yield _counter(
            "ctxstore_raft_passes_total",
            "Driver passes that found work (each: one WAL submit at most, one batch per peer).",
            driver.passes,
        )
        yield _counter(
            "ctxstore_raft_readies_total", "Group Readies handled (in passes).", driver.readies
        )
        yield _counter(
            "ctxstore_raft_messages_sent_total",
            "Raft messages sent to peers.",
            driver.messages_sent,
        )
        yield _counters(
            "ctxstore_raft_commit_notices_total",
            "Commit indexes told to followers beside the Raft messages (one per group), sent"
            " by this node's leaders or taken by its followers.",
            ["direction"],
            [(["sent"], driver.commit_notices_sent),
             (["received"], driver.commit_notices_received)],
        )  # fmt: skip
        yield _gauge(
            "ctxstore_raft_pass_seconds_max",
            "The longest Ready pass of the driver since start.",
            driver.pass_seconds_max,
        )

    def _wal(self) -> Iterator[Metric]:
        wal = self.metrics.node.wal
        st = wal.stats
        # Copied first: the writer thread may count one more meanwhile (count = the +Inf bucket).
        fsyncs = list(st.fsync_buckets)
        yield HistogramMetricFamily(
            "ctxstore_wal_fsync_seconds",
            "WAL segment fsyncs (one per group commit) by time.",
            buckets=cumulative_buckets(FSYNC_BUCKETS_S, fsyncs),
            sum_value=st.fsync_seconds_total,
        )
        yield _gauge(
            "ctxstore_wal_fsync_seconds_max",
            "The longest WAL fsync since start.",
            st.fsync_seconds_max,
        )
        yield _counter("ctxstore_wal_rounds_total", "WAL group commits (writes).", st.rounds)
        yield _counter(
            "ctxstore_wal_batches_total",
            "Driver submits coalesced into WAL group commits (batches per round).",
            st.batches,
        )
        yield _counter("ctxstore_wal_records_total", "Records written to the WAL.", st.records)
        yield _counter("ctxstore_wal_written_bytes_total", "Bytes written to the WAL.", st.bytes)
        yield _gauge("ctxstore_wal_segments", "WAL segment files alive.", wal.segment_count())
        yield _gauge(
            "ctxstore_wal_cache_bytes",
            "Entry payload bytes the WAL keeps in memory (bounded by its cache budget).",
            wal.cached_bytes,
        )
        yield _counter(
            "ctxstore_wal_disk_reads_total",
            "Entry records read back from WAL segments (entries older than the cache).",
            st.disk_reads,
        )

    def _peers(self) -> Iterator[Metric]:
        transport = self.metrics.node.transport
        connected = transport.connected_peers() if transport is not None else []
        yield _gauge(
            "ctxstore_peer_connections", "Peers connected (handshake done).", len(connected)
        )
        if transport is None:
            return  # a single-node cluster: no peers
        ts = transport.stats
        yield _counter(
            "ctxstore_peer_accepted_connections_total", "Inbound peer connections.", ts.accepted
        )
        yield _counter(
            "ctxstore_peer_refused_connections_total",
            "Peer connections closed during the handshake.",
            ts.refused,
        )
        yield _counter(
            "ctxstore_peer_handshakes_evicted_total",
            "Inbound peer handshakes closed to make room for newer ones.",
            ts.handshakes_evicted,
        )
        yield _counter(
            "ctxstore_peer_protocol_errors_total",
            "Peer connections closed for a protocol error.",
            ts.protocol_errors,
        )
        yield _counter(
            "ctxstore_peer_snapshot_waits_total",
            "Flushes that held a snapshot chunk back (snapshot_send_bytes_per_s).",
            ts.snapshot_waits,
        )
        peers = sorted(ts.peers.items())
        up = GaugeMetricFamily(
            "ctxstore_peer_up", "1 while the peer is connected.", labels=["peer"]
        )
        for pid, _ in peers:
            up.add_metric([str(pid)], float(pid in connected))
        yield up
        rows = [(str(pid), ps) for pid, ps in peers]
        yield _counters(
            "ctxstore_peer_connects_total",
            "Handshakes completed with the peer.",
            ["peer"],
            (([p], ps.connects) for p, ps in rows),
        )
        yield _counters(
            "ctxstore_peer_sent_bytes_total",
            "Bytes of Raft batches sent to the peer.",
            ["peer"],
            (([p], ps.bytes_sent) for p, ps in rows),
        )
        yield _counters(
            "ctxstore_peer_sent_batches_total",
            "Raft batches (frames, one per loop iteration at most) sent to the peer.",
            ["peer"],
            (([p], ps.batches_sent) for p, ps in rows),
        )
        yield _counters(
            "ctxstore_peer_sent_messages_total",
            "Raft messages sent to the peer.",
            ["peer"],
            (([p], ps.items_sent) for p, ps in rows),
        )
        yield _counters(
            "ctxstore_peer_commit_notices_total",
            "Commit notices (one per group) sent to or received from the peer in Raft batches,"
            " or dropped (no connection, its queue full: the next append or heartbeat carries"
            " the commit).",
            ["peer", "direction"],
            [([p, "sent"], ps.commits_sent) for p, ps in rows]
            + [([p, "received"], ps.commits_received) for p, ps in rows]
            + [([p, "dropped"], ps.commits_dropped) for p, ps in rows],
        )
        yield _counters(
            "ctxstore_peer_received_messages_total",
            "Raft messages received from the peer.",
            ["peer"],
            (([p], ps.items_received) for p, ps in rows),
        )
        yield _counters(
            "ctxstore_peer_dropped_messages_total",
            "Raft messages for the peer dropped, by reason.",
            ["peer", "reason"],
            (
                ([p, reason], n)
                for p, ps in rows
                for reason, n in (
                    ("slow", ps.dropped_slow),
                    ("overflow", ps.dropped_overflow),
                    ("unconnected", ps.dropped_unconnected),
                    ("unfit", ps.dropped_unfit),
                )
            ),
        )
        yield _counters(
            "ctxstore_peer_app_messages_total",
            "Forwarding-lane messages, by event.",
            ["peer", "event"],
            (
                ([p, event], n)
                for p, ps in rows
                for event, n in (
                    ("sent", ps.app_sent),
                    ("received", ps.app_received),
                    ("refused", ps.app_refused),
                )
            ),
        )
        yield _counters(
            "ctxstore_peer_snapshots_total",
            "Snapshots streamed to or from the peer, by event.",
            ["peer", "event"],
            (
                ([p, event], n)
                for p, ps in rows
                for event, n in (
                    ("sent", ps.snapshots_sent),
                    ("failed", ps.snapshots_failed),
                    ("received", ps.snapshots_received),
                )
            ),
        )

    def _collector(self) -> Iterator[Metric]:
        pauses = self.metrics.gc_pauses
        family = HistogramMetricFamily(
            "ctxstore_gc_pause_seconds",
            "Collections of the cyclic garbage collector (every thread of the process stops), "
            "by generation.",
            labels=["generation"],
        )
        for generation, h in enumerate(pauses.by_generation):
            family.add_metric([str(generation)], h.cumulative(), h.sum_s)
        yield family
        most = GaugeMetricFamily(
            "ctxstore_gc_pause_seconds_max",
            "The longest collection of the cyclic garbage collector since start, by generation.",
            labels=["generation"],
        )
        for generation, seconds in enumerate(pauses.max_s):
            most.add_metric([str(generation)], seconds)
        yield most
