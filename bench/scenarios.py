"""The scenarios: set up, run the load (``load``), gather the figures, check the gate.

- ``append``: the hot path; appends only.
- ``mixed``: appends and reads of the last ``read_last`` messages (``read_ratio`` of the ops).
- ``replay``: a backlog session (``backlog`` messages) read from seq 0 in ``page``-message
  pages by new readers (``readers`` connections at a time) while the writers append.
- ``--join-at`` (any scenario but failover, local nodes): a node joins mid-window; the p99
  before, while the groups move to it, and after (``join``).
- ``failover``: the append load; mid-window the node leading the most groups is killed with
  SIGKILL; the unavailability and the p99 before, during and after; the node is restarted at
  the end and the read-back check reads through it.

Everything a scenario measures goes into one ``dict`` (the JSON document; ``report`` prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ctxstore.launcher import LocalCluster
from wire.client import Client, ClientError, connect
from wire.placement import group_of

from . import context as context_mod
from . import verify as verify_mod
from .failover import Kill, failover_figures, kill_leader
from .histogram import LatencyHistogram
from .join import Join, join_figures, join_node
from .load import WorkerResult, Workers, WorkerSpec, session_id
from .nodestats import node_pauses, scrape_nodes
from .profile import Profiler, py_spy
from .report import Progress
from .sysinfo import cpu_between, cpu_seconds, sample_cpu
from .timeline import timeline, timeline_summary

now = time.monotonic
SETUP_CONCURRENCY = 64
BACKLOG_CONCURRENCY = 256
CLIENT_BUSY_PCT = 80.0
SEND_LAG_WARN_MS = 5.0
TIMELINE_STEP_S = 1.0  # the timeline's step (report: the worst one)
PROFILE_STOP_S = 15.0  # py-spy stops by itself at the end of the window: at most this late


@dataclasses.dataclass
class Target:
    """The cluster under test: its nodes' client addresses, groups, leaders; local or not."""

    nodes: dict[int, str]
    groups: int
    leaders: list[int]
    local: LocalCluster | None = None
    cpu_at_kill: dict[str, float] = dataclasses.field(default_factory=dict)
    ops: dict[int, str] = dataclasses.field(default_factory=dict)  # node id -> its ops port

    def node_pids(self) -> dict[str, int]:
        if self.local is None:
            return {}
        out = {}
        for i, child in self.local.children.items():
            p = child.process
            if p is not None and p.returncode is None:
                out[f"node{i}"] = p.pid
        return out

    def kill(self, node_id: int) -> None:
        """kill -9 a local node, noting its CPU time first (for the window's CPU figures)."""
        assert self.local is not None, "only a local node can be killed"
        process = self.local.children[node_id].process
        if process is not None and (cpu := cpu_seconds(process.pid)) is not None:
            self.cpu_at_kill[f"node{node_id}"] = cpu
        self.local.kill(node_id)

    async def client(self, token: str | None, node_id: int | None = None) -> Client:
        targets = [self.nodes[node_id]] if node_id is not None else list(self.nodes.values())
        return await connect(targets, token=token, client_name="ctxstore-bench", timeout_s=10)


async def discover(
    targets: list[str],
    token: str | None,
    local: LocalCluster | None,
    ops: dict[int, str] | None = None,
) -> Target:
    """Node ids (Welcome), groups and leaders (GetRoutes) of the cluster behind ``targets``;
    the ops ports are the local nodes' or ``ops``."""
    nodes: dict[int, str] = {}
    routes = None
    for address in targets:
        client = await connect(address, token=token, client_name="ctxstore-bench", timeout_s=10)
        try:
            assert client.welcome is not None
            nodes[client.welcome.node_id] = address
            if routes is None:
                routes = await client.get_routes()
        finally:
            await client.close()
    assert routes is not None
    for node_id, address in routes.addresses.items():
        nodes.setdefault(node_id, address)  # nodes the targets did not name
    if local is not None:
        ops = {i: c.ops_target for i, c in local.children.items()}
    return Target(nodes, len(routes.leaders), list(routes.leaders), local, ops=dict(ops or {}))


# -- set-up ---------------------------------------------------------------------------------------
async def pipelined(n: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> None:
    """``call(i)`` for i in range(n), at most ``concurrency`` at a time."""
    it = iter(range(n))

    async def lane() -> None:
        for i in it:
            await call(i)

    await asyncio.gather(*(lane() for _ in range(min(n, concurrency))))


async def create_sessions(client: Client, run_id: str, n: int) -> None:
    async def one(i: int) -> None:
        await with_retry(lambda: client.create_session("bench-user", "bench-agent", None,
                                                       session_id(run_id, i)))  # fmt: skip

    await pipelined(n, SETUP_CONCURRENCY, one)


async def with_retry(call: Callable[[], Awaitable[Any]], attempts: int = 50) -> Any:
    for attempt in range(attempts):
        try:
            return await call()
        except ClientError as e:
            if not e.retryable or attempt + 1 == attempts:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


async def fill_backlog(
    client: Client, run_id: str, n: int, payload_bytes: int
) -> tuple[str, list[tuple[str, int]]]:
    """A session with ``n`` messages; its id and the acks (client_msg_id, seq)."""
    sid = f"{run_id}-backlog"
    await with_retry(lambda: client.create_session("bench-user", "bench-agent", None, sid))
    content = "b" * payload_bytes
    acks: list[tuple[str, int]] = []

    async def one(i: int) -> None:
        msg_id = f"{run_id}-b-{i}"
        ack = await with_retry(lambda: client.append(sid, content, client_msg_id=msg_id))
        acks.append((msg_id, ack.seq))

    await pipelined(n, BACKLOG_CONCURRENCY, one)
    return sid, acks


# -- the load -------------------------------------------------------------------------------------
def default_procs(args: argparse.Namespace) -> int:
    if args.procs:
        return int(args.procs)
    heavy = (args.rate or 0) > 2000 or (args.concurrency or 0) > 32
    return 2 if heavy else 1


def split(total: int, parts: int, k: int) -> int:
    return total // parts + (1 if k < total % parts else 0)


def worker_specs(
    args: argparse.Namespace,
    target: Target,
    run_id: str,
    backlog: tuple[str, int] | None,
    context_sessions: list[str] | None = None,
) -> list[WorkerSpec]:
    procs = default_procs(args)
    open_loop = args.rate is not None
    specs = [
        WorkerSpec(
            index=k,
            procs=procs,
            run_id=run_id,
            sessions=args.sessions,
            groups=target.groups,
            nodes=target.nodes,
            leaders=tuple(target.leaders),
            route=args.route,
            token=args.token,
            payload_bytes=args.payload_bytes,
            concurrency=0 if open_loop else split(args.concurrency, procs, k),
            rate=float(args.rate) if open_loop else 0.0,
            outstanding_max=max(1, split(args.max_outstanding, procs, k)),
            read_ratio=getattr(args, "read_ratio", 0.0),
            read_last=getattr(args, "read_last", 50),
            readers=split(getattr(args, "readers", 0), procs, k),
            backlog_session=backlog[0] if backlog else None,
            backlog_seq=backlog[1] if backlog else 0,
            page=getattr(args, "page", 1000),
            retry_for_s=args.retry_for_s,
            timeout_s=args.timeout_s,
            seed=args.seed,
            via=args.via,
            web=dict(target.ops),
            parts=args.parts,
            payload_text=args.payload_text,
        )
        for k in range(procs)
    ]
    if context_sessions:  # one more process, for get_context only (its loop is not the load's)
        specs.append(dataclasses.replace(
            specs[0], index=procs, concurrency=0, rate=0.0, readers=0,
            context_sessions=tuple(context_sessions), context_rate=args.context_rate,
        ))  # fmt: skip
    return specs


@dataclasses.dataclass
class LoadRun:
    t0: float
    measure: float
    end: float
    results: list[WorkerResult]
    cpu: dict[str, Any]
    client_pids: dict[str, int]
    pauses: dict[str, Any]  # nodestats.node_pauses of the window
    profiler: Profiler | None = None  # with --profile: py-spy's stacks of the window


During = Callable[[float, float, Progress], Coroutine[Any, Any, None]]


async def run_load(
    args: argparse.Namespace, target: Target, specs: list[WorkerSpec], during: During | None
) -> LoadRun:
    workers = Workers(specs)
    progress: Progress | None = None
    side: asyncio.Task[None] | None = None
    profiler: Profiler | None = None
    try:
        await workers.start()
        t0 = now() + 0.2
        measure, end = t0 + args.warmup, t0 + args.warmup + args.duration
        workers.go(t0, measure, end)
        progress = Progress(workers, t0, measure, end, enabled=not args.quiet)
        progress.start()
        pids = {**target.node_pids(), **workers.pids, "bench": os.getpid()}
        await asyncio.sleep(max(0.0, measure - now()))
        first = sample_cpu(pids)
        if args.profile is not None:
            exe = py_spy()
            assert exe is not None  # (checked with the options)
            profiler = Profiler(args.profile, args.profile_rate, exe)
            await profiler.start(target.node_pids(), end - now())
        if during is not None:
            side = asyncio.create_task(during(measure, end, progress))
        first_scrape = await scrape_nodes(target.ops)  # after starting ``during``: on time
        await asyncio.sleep(max(0.0, end - now()))
        last = sample_cpu(pids)
        last_scrape = await scrape_nodes(target.ops)
        if profiler is not None:
            await profiler.wait(PROFILE_STOP_S)
        if side is not None:
            await side
        progress.phase_note("drain")
        results = await workers.load_results(args.retry_for_s + args.timeout_s + 30.0)
    finally:
        if side is not None and not side.done():
            side.cancel()
        if profiler is not None:
            profiler.kill()
        if progress is not None:
            await progress.stop()
        workers.stop()
    cpu = cpu_between(first, last, target.cpu_at_kill)
    pauses = node_pauses(first_scrape, last_scrape, end - measure)
    return LoadRun(t0, measure, end, results, cpu, workers.pids, pauses, profiler)


# -- figures --------------------------------------------------------------------------------------
def rate_figures(h: LatencyHistogram, seconds: float) -> dict[str, Any]:
    return {
        "count": h.count,
        "per_s": round(h.count / seconds, 1) if seconds > 0 else 0.0,
        "latency_ms": h.summary_ms(),
        "histogram": h.encode(),
    }


def load_figures(args: argparse.Namespace, run: LoadRun) -> dict[str, Any]:
    seconds = run.end - run.measure
    hist = {
        name: LatencyHistogram.merged(
            LatencyHistogram.decode(r.histograms[name]) for r in run.results
        )
        for name in run.results[0].histograms
    }
    errors: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for r in run.results:
        errors.update(r.errors)
        failed.update(r.failed)
    out: dict[str, Any] = {
        "window_s": round(seconds, 3),
        "appends": rate_figures(hist["append"], seconds),
        "errors": dict(sorted(errors.items())),
        "retries": sum(r.retries for r in run.results),
        "failed": dict(sorted(failed.items())),
        "unfinished": sum(r.unfinished for r in run.results),
        "client": {
            "procs": len(run.results),
            "routes_refreshes": sum(r.routes_refreshes for r in run.results),
            "acks_not_logged": sum(r.acks_unlogged for r in run.results),
        },
        "cpu": run.cpu,
        "node_pauses": run.pauses,
    }
    if args.rate is not None:
        out["client"]["send_lag_ms"] = hist["send_lag"].summary_ms()
    if hist["read"].count or getattr(args, "read_ratio", 0):
        out["reads"] = rate_figures(hist["read"], seconds)
    if hist["context"].count or args.scenario == "context":
        out["context"] = rate_figures(hist["context"], seconds)
        served: dict[str, int] = {}
        for r in run.results:
            for k, v in r.context_windows.items():
                served[k] = (min if k.endswith("_min") else max)(served.get(k, v), v)
        out["context"]["served"] = served
    if hist["replay"].count or getattr(args, "readers", 0):
        out["replay"] = rate_figures(hist["replay"], seconds)
        out["replay"]["page_latency_ms"] = hist["page"].summary_ms()
    out["cpu"]["us_per_op"] = cpu_per_op(run.cpu, hist["append"].count + hist["read"].count)
    if run.profiler is not None:
        out["profile"] = run.profiler.finish(hist["append"].count)
    steps = timeline(run.results, run.measure, run.end, TIMELINE_STEP_S)
    out["timeline"] = {
        "step_s": TIMELINE_STEP_S,
        **timeline_summary(steps, args.p99_target_ms),
        "appends": steps,
    }
    return out


def cpu_per_op(cpu: dict[str, Any], ops: int) -> dict[str, float | None]:
    """CPU µs per acknowledged append or read of the window, summed over the nodes and over
    the client processes: what an operation costs, whichever process pays it."""
    out: dict[str, float | None] = {}
    for kind in ("node", "client"):
        pcts = [v for k, v in cpu["pct_of_core"].items() if k.startswith(kind)]
        if not pcts or None in pcts or not ops:
            out[kind + "s"] = None
            continue
        out[kind + "s"] = round(sum(pcts) / 100 * cpu["seconds"] / ops * 1e6, 1)
    return out


def acked_by_session(
    run_id: str, sessions: int, results: list[WorkerResult]
) -> dict[str, list[tuple[str, int]]]:
    acked: dict[str, list[tuple[str, int]]] = {session_id(run_id, i): [] for i in range(sessions)}
    for r in results:
        prefix = f"{run_id}-{r.index}-"
        for sidx, n, seq in zip(r.ack_sess, r.ack_n, r.ack_seq, strict=True):
            acked[session_id(run_id, sidx)].append((f"{prefix}{n}", seq))
    return acked


def warnings(figures: dict[str, Any], background: float) -> list[str]:
    """What makes the figures less trustworthy: other load, a saturated client or machine."""
    out = []
    cpu = figures["cpu"]
    if background > 10:
        out.append(f"other processes used {background:.0f} % of a core before the run")
    if (cpu["others_pct_of_core"] or 0) > 10:
        out.append(f"other processes used {cpu['others_pct_of_core']} % of a core in the window")
    for name, pct in cpu["pct_of_core"].items():
        if name.startswith("client") and pct is not None and pct > CLIENT_BUSY_PCT:
            out.append(f"{name} used {pct} % of a core: the client may be the bottleneck")
    lag = figures["client"].get("send_lag_ms")
    if lag and lag["p99"] > SEND_LAG_WARN_MS:
        out.append(f"the client sent requests late (send lag p99 {lag['p99']} ms)")
    if (cpu["machine_busy_pct"] or 0) >= 95:
        out.append("the machine's CPUs were saturated (nodes and clients share them)")
    if "profile" in figures:
        out.append("py-spy sampled the nodes (--profile): throughput and latency are perturbed")
        out += [f"profile: {e}" for e in figures["profile"]["errors"]]
    return out


# -- the gate -------------------------------------------------------------------------------------
def gate(args: argparse.Namespace, scenario: str, figures: dict[str, Any]) -> dict[str, Any]:
    target = float(args.p99_target_ms)
    failures: list[str] = []

    def p99_ok(name: str, summary: dict[str, float]) -> None:
        if summary["count"] and summary["p99"] > target:
            failures.append(f"{name} p99 {summary['p99']:.1f} ms > {target:g} ms")
        if not summary["count"]:
            failures.append(f"no {name} acknowledged in the window")

    if scenario == "failover":
        fo = figures["failover"]
        p99_ok("append (before the kill)", fo["p99_before"])
        p99_ok("append (after every group was led again)", fo["p99_after"])
        limit = args.unavailability_target_s
        if fo["unavailable_s"] is None or fo["unavailable_s"] > limit:
            failures.append(f"unavailability {fo['unavailable_s']} s > {limit:g} s")
    else:
        p99_ok("append", figures["appends"]["latency_ms"])
        if "reads" in figures:
            p99_ok("read", figures["reads"]["latency_ms"])
    if "context" in figures:
        lat = figures["context"]["latency_ms"]
        limit = float(args.context_p99_target_ms)
        if not lat["count"]:
            failures.append("no get_context answered in the window")
        elif lat["p99"] > limit:
            failures.append(f"get_context p99 {lat['p99']:.1f} ms > {limit:g} ms")
    if figures["failed"]:
        failures.append(f"requests failed for good: {figures['failed']}")
    if figures["unfinished"]:
        failures.append(f"{figures['unfinished']} requests unanswered after the drain")
    verdict = figures.get("verify")
    if verdict is not None and not verdict["ok"]:
        failures.append("read-back check failed")
    return {"p99_target_ms": target, "passed": not failures, "failures": failures}


# -- a whole scenario -----------------------------------------------------------------------------
async def run_scenario(
    args: argparse.Namespace, target: Target, background: float = 0.0
) -> dict[str, Any]:
    scenario = args.scenario
    run_id = args.run_id or f"b{uuid.uuid4().hex[:8]}"
    setup = await target.client(args.token)
    backlog: tuple[str, int] | None = None
    backlog_acks: list[tuple[str, int]] = []
    context_sids: list[str] = []
    context_acks: dict[str, list[tuple[str, int]]] = {}
    context_held: dict[str, Any] = {}
    try:
        await create_sessions(setup, run_id, args.sessions)
        if args.context_policy is not None:
            sids = [session_id(run_id, i) for i in range(args.sessions)]
            await context_mod.configure_windows(setup, sids, args, with_retry, pipelined)
        if scenario == "context":
            context_sids, context_acks, context_held = await context_mod.fill_windows(
                setup, run_id, args, with_retry
            )
        if scenario == "replay":
            sid, backlog_acks = await fill_backlog(setup, run_id, args.backlog, args.payload_bytes)
            backlog = (sid, max((seq for _, seq in backlog_acks), default=0))
    finally:
        await setup.close()
    if args.via != "native" and not set(target.nodes) <= set(target.ops):
        raise RuntimeError(f"--via {args.via}: the nodes' HTTP ports are not known (--ops)")
    specs = worker_specs(args, target, run_id, backlog, context_sids)
    kill = Kill()
    during: During | None = None
    if scenario == "failover":

        async def during_failover(measure: float, end: float, progress: Progress) -> None:
            await kill_leader(
                args, target, kill, measure + args.kill_at * (end - measure), progress
            )

        during = during_failover
    join = Join()
    if getattr(args, "join_at", None) is not None:
        local = target.local
        assert local is not None

        async def during_join(measure: float, end: float, progress: Progress) -> None:
            await join_node(local, join, measure + args.join_at * (end - measure), progress)

        during = during_join
    run = await run_load(args, target, specs, during)
    figures = load_figures(args, run)
    figures["run_id"] = run_id
    if join.node:
        figures["join"] = join_figures(run.results, run.measure, run.end, join)
    if scenario == "context":
        figures["context"]["filled"] = context_held
    verify_node: int | None = None
    if scenario == "failover":
        assert target.local is not None and kill.victim
        await target.local.wait_exit(kill.victim)
        started = now()
        await target.local.start_node(kill.victim)
        kill.restart_s = round(now() - started, 3)
        verify_node = kill.victim  # the restarted node must serve every acknowledged append
        groups = [group_of(session_id(run_id, i), target.groups) for i in range(args.sessions)]
        figures["failover"] = failover_figures(run.results, run.measure, run.end, kill, groups)
    if args.verify:
        acked = acked_by_session(run_id, args.sessions, run.results)
        if backlog is not None:
            acked[backlog[0]] = backlog_acks
        acked.update(context_acks)
        client = await target.client(args.token, verify_node)
        try:
            verdict = await verify_mod.verify(client, acked, f"{run_id}-")
        finally:
            await client.close()
        figures["verify"] = {**verdict.as_dict(), "read_from_node": verify_node}
    figures["warnings"] = warnings(figures, background)
    figures["gate"] = gate(args, scenario, figures)
    return figures


__all__ = ["Target", "discover", "run_scenario"]
