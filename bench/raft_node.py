"""Benchmark of ``raft/`` on a local 3-node cluster of test nodes (``bench.raft_testnode``).

    python -m bench.raft_node throughput --concurrency 256 --duration 20 [--json out.json]
    python -m bench.raft_node idle --duration 60
    python -m bench.raft_node failover --concurrency 64 --duration 20

Every run starts its own cluster (``bench.raft_cluster``: free local ports, a temporary data
directory that is removed afterwards, the node processes killed on exit or Ctrl-C), waits until
every group has a leader and then runs one scenario with client processes (``bench.raft_load``):

- ``throughput``: a closed loop of C proposals in flight in total, over the groups round-robin,
  each sent to the group's leader (``not_leader`` hints are followed) from P client processes;
  latency is from the first send to the ack (quorum-fsync'd and applied on the leader).
- ``idle``: once every group is quiescent, the nodes' CPU, awake groups and peer messages.
- ``failover``: the throughput loop; at mid-run the node leading the most groups is killed with
  SIGKILL; time until every group has a leader again, the longest gap between acks on the groups
  it led, p99 before/after; then the node is restarted and must catch up.

One progress line per second goes to stderr; the results table to stdout; ``--json FILE`` writes
every figure with the command line, the git commit, the machine and the date.  See
docs/raft-bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from .histogram import LatencyHistogram
from .procs import WorkerError
from .raft_cluster import NODE_MODULE, Cluster
from .raft_control import ControlError
from .raft_load import DRAIN_S, NODE_IDS, Clients
from .raft_profile import run_profile
from .raft_report import report
from .report import log
from .sysinfo import CpuSample, cpu_between, run_info, sample_cpu, wait_quiet

STATUS_TIMEOUT_S = 5.0
ROLE_LEADER = "leader"
now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine
_SWITCH_LAUNCHER = (
    "import runpy, sys; sys.setswitchinterval(float(sys.argv.pop(1)) / 1000); "
    "runpy.run_module('bench.raft_testnode', run_name='__main__', alter_sys=True)"
)


def new_cluster(args: argparse.Namespace) -> Cluster:
    """Three nodes with the scenario's flags, in a fresh directory under ``--data-parent``."""
    extra = [
        f"--heartbeat-ticks={args.heartbeat_ticks}",
        f"--snapshot-entries={args.snapshot_entries}",
        f"--log-level={args.node_log_level}",
        *(["--lazy-commit"] if args.lazy_commit else []),
        *(["--skip-busy-heartbeats"] if args.skip_busy_heartbeats else []),
    ]
    node_args: Sequence[str] = NODE_MODULE
    if args.switch_interval_ms:  # an experiment: the GIL hand-over period of the nodes
        node_args = ["-c", _SWITCH_LAUNCHER, str(args.switch_interval_ms)]
    base = Path(tempfile.mkdtemp(prefix="raft-bench-", dir=args.data_parent))
    return Cluster(
        base, len(NODE_IDS), args.groups, args.tick_ms, args.election_ticks,
        extra_args=extra, node_args=node_args,
    )  # fmt: skip


def latency_ms(values: list[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99, p99.9 and max of ``values`` (seconds) in milliseconds, at
    the histograms' precision (``bench.histogram``); {} when there is none."""
    if not values:
        return {}
    h = LatencyHistogram()
    for v in values:
        h.record_s(v)
    return h.summary_ms()


def leaders_reported(statuses: dict[int, dict[str, Any]]) -> dict[int, int]:
    """group -> the node that reports itself leader with the highest term (if any)."""
    best: dict[int, tuple[int, int]] = {}
    for node_id, st in statuses.items():
        for g, role, term, *_ in st["groups"]:
            if role == ROLE_LEADER and term > best.get(g, (-1, 0))[0]:
                best[g] = (term, node_id)
    return {g: node for g, (_, node) in best.items()}


# -- runs ----------------------------------------------------------------------------------------
WAL_KEYS = ("fsyncs", "rounds", "batches", "records", "bytes", "fsync_seconds_total")
DRIVER_KEYS = ("passes", "readies", "submits", "proposals", "applied_entries", "messages_sent")
HOST_KEYS = ("ticks", "quiesced", "woken", "campaigns", "early_campaigns")


@dataclasses.dataclass
class Snapshot:
    cpu: CpuSample
    statuses: dict[int, dict[str, Any]]


async def snapshot(cluster: Cluster, pids: dict[str, int]) -> Snapshot:
    cpu = sample_cpu(pids)
    return Snapshot(cpu, await cluster.statuses(answered_only=True))


def node_figures(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """Per node, over [a, b]: the WAL, driver and host counters' deltas and rates."""
    span = b.cpu.t - a.cpu.t
    out: dict[str, Any] = {}
    for node_id, sb in b.statuses.items():
        sa = a.statuses.get(node_id)
        if sa is None:
            continue
        wal = {k: sb["wal"][k] - sa["wal"][k] for k in WAL_KEYS}
        drv = {k: sb["driver"][k] - sa["driver"][k] for k in DRIVER_KEYS}
        hst = {k: sb["host"][k] - sa["host"][k] for k in HOST_KEYS}
        fsyncs = wal["fsyncs"]

        def per(v: float, fsyncs: int = fsyncs) -> float:
            return v / fsyncs if fsyncs else 0.0

        out[f"n{node_id}"] = {
            "leads": sum(1 for g in sb["groups"] if g[1] == ROLE_LEADER),
            "awake_end": sb["awake"],
            "wal": wal,
            "driver": drv,
            "host": hst,
            "fsyncs_per_s": fsyncs / span,
            "batches_per_fsync": per(wal["batches"]),
            "records_per_fsync": per(wal["records"]),
            "bytes_per_fsync": per(wal["bytes"]),
            "fsync_ms_avg": 1000.0 * per(wal["fsync_seconds_total"]),
            "wal_busy_pct": 100.0 * wal["fsync_seconds_total"] / span,
            "messages_per_s": drv["messages_sent"] / span,
            "passes_per_s": drv["passes"] / span,
        }
    return out


class Progress:
    """One stderr line per second: elapsed, acks/s in the last second and in the window, errors."""

    def __init__(self, clients: Clients, t0: float, measure: float, end: float) -> None:
        self.clients, self.t0, self.measure, self.end = clients, t0, measure, end
        self.task: asyncio.Task[None] | None = None
        self.acks_at_measure: int | None = None
        self.note = ""

    async def run(self) -> None:
        last_acks, tick = 0, self.t0 + 1.0
        while True:
            await asyncio.sleep(max(0.0, tick - now()))
            acks, errors = self.clients.totals()
            t = now()
            if t < self.measure:
                phase, window = "warmup ", ""
            elif t <= self.end + 0.5 and self.acks_at_measure is not None:
                span = min(t, self.end) - self.measure
                avg = f"{(acks - self.acks_at_measure) / span:7.0f}" if span >= 0.5 else "      -"
                phase, window = "measure", f" window avg {avg}/s"
            else:
                phase, window = "drain  ", ""
            note, self.note = self.note, ""
            log(
                f"[{t - self.t0:5.1f}s] {phase} {acks - last_acks:6d} acks/s{window}"
                f"  acks {acks}  errors {errors}{note}"
            )
            last_acks, tick = acks, tick + 1.0

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclasses.dataclass
class LoadRun:
    t0: float
    measure: float
    end: float
    acks: list[tuple[float, float, int]]  # (done, latency, group), sorted by done
    errors: list[tuple[float, str]]
    unfinished: int
    window: tuple[Snapshot, Snapshot]
    client_pids: dict[str, int]


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - now()))


async def run_load(
    args: argparse.Namespace,
    cluster: Cluster,
    leaders: dict[int, int],
    during: Callable[[float, float, Progress], Coroutine[Any, Any, None]] | None = None,
) -> LoadRun:
    """The closed loop: start the clients, warm up, measure [measure, end], drain, collect."""
    nodes = {i: cluster.nodes[i].control for i in cluster.ids}
    clients = Clients(args, nodes, cluster.groups, leaders)
    progress: Progress | None = None
    side: asyncio.Task[None] | None = None
    profile: asyncio.Task[None] | None = None
    try:
        await clients.start()
        t0 = now() + 0.2
        measure = t0 + args.warmup
        end = measure + args.duration
        clients.go(t0, end)
        progress = Progress(clients, t0, measure, end)
        progress.start()
        pids = {**cluster.pids(), **clients.pids, "bench": os.getpid()}
        await sleep_until(measure)
        progress.acks_at_measure = clients.totals()[0]
        first = await snapshot(cluster, pids)
        if during is not None:
            side = asyncio.create_task(during(measure, end, progress))
        if args.profile_node:
            node = cluster.nodes[args.profile_node]
            profile = asyncio.create_task(run_profile(args, node.pid, node.id, end - now()))
        await sleep_until(end)
        last = await snapshot(cluster, pids)
        if side is not None:
            await side
        results = await clients.load_results(DRAIN_S + 30.0)
        if profile is not None:
            await profile
    finally:
        for task in (side, profile):
            if task is not None and not task.done():
                task.cancel()
        if progress is not None:
            await progress.stop()
        clients.stop()
    acks = sorted(
        (d, lat, g) for r in results for d, lat, g in zip(r.done, r.latency, r.group, strict=True)
    )
    errors = sorted(e for r in results for e in r.errors)
    return LoadRun(
        t0,
        measure,
        end,
        acks,
        errors,
        sum(r.unfinished for r in results),
        (first, last),
        clients.pids,
    )


def load_figures(run: LoadRun, t_from: float, t_to: float) -> dict[str, Any]:
    lat = [lat for d, lat, _ in run.acks if t_from <= d < t_to]
    errors = Counter(code for t, code in run.errors if t_from <= t < t_to)
    return {
        "seconds": t_to - t_from,
        "acks": len(lat),
        "acks_per_s": len(lat) / (t_to - t_from) if t_to > t_from else 0.0,
        "latency_ms": latency_ms(lat),
        "errors": dict(sorted(errors.items())),
    }


def window_figures(args: argparse.Namespace, run: LoadRun) -> dict[str, Any]:
    first, last = run.window
    cpu = cpu_between(first.cpu, last.cpu)
    return {
        "config": {
            "concurrency": args.concurrency,
            "procs": args.procs,
            "groups": args.groups,
            "payload_bytes": args.payload_bytes,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "profiled_node": args.profile_node or None,
            "node_switch_interval_ms": args.switch_interval_ms or None,
        },
        **load_figures(run, run.measure, run.end),
        "unfinished_after_drain": run.unfinished,
        "cpu": cpu,
        "nodes": node_figures(first, last),
    }


# -- the scenarios -------------------------------------------------------------------------------
async def prepare(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    started = now()
    await cluster.start()
    ready = now() - started
    leaders = await cluster.wait_leaders(timeout=args.leader_timeout)
    cluster.check_running()
    counts = Counter(leaders.values())
    log(
        f"cluster up in {ready:.2f} s, every group led after {now() - started:.2f} s "
        f"(leaders: {', '.join(f'n{n}={c}' for n, c in sorted(counts.items()))})"
    )
    return {"leaders": leaders, "ready_s": ready, "all_led_s": now() - started}


async def scenario_throughput(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    setup = await prepare(cluster, args)
    run = await run_load(args, cluster, setup["leaders"])
    return {"scenario": "throughput", **window_figures(args, run)}


async def scenario_idle(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    await prepare(cluster, args)
    started = now()
    awake: dict[int, int] = {}
    while True:
        sts = await cluster.statuses(answered_only=True)
        awake = {i: st["awake"] for i, st in sts.items()}
        if all(v == 0 for v in awake.values()) and len(awake) == len(NODE_IDS):
            break
        if now() - started > args.quiesce_timeout:
            log(f"not quiescent after {args.quiesce_timeout} s (awake: {awake}); measuring anyway")
            break
        await asyncio.sleep(0.2)
    quiescent_after = now() - started
    log(f"quiescent after {quiescent_after:.2f} s; measuring {args.duration} s")
    pids = {**cluster.pids(), "bench": os.getpid()}
    first = await snapshot(cluster, pids)
    awake_max = dict.fromkeys(awake, 0)
    t_end = first.cpu.t + args.duration
    next_status = first.cpu.t + args.status_every
    last = first.cpu
    while now() < t_end:
        await sleep_until(min(last.t + 1.0, t_end))
        cur = sample_cpu(pids)
        pct = cpu_between(last, cur)["pct_of_core"]
        log(
            f"[{cur.t - first.cpu.t:5.1f}s] idle  "
            + "  ".join(f"{k} {v:4.1f}%" for k, v in pct.items() if v is not None)
        )
        last = cur
        if now() >= next_status and now() < t_end - 0.5:
            next_status += args.status_every
            for i, st in (await cluster.statuses(answered_only=True)).items():
                awake_max[i] = max(awake_max.get(i, 0), st["awake"])
    final = await snapshot(cluster, pids)
    for i, st in final.statuses.items():
        awake_max[i] = max(awake_max.get(i, 0), st["awake"])
    cpu = cpu_between(first.cpu, final.cpu)
    nodes = node_figures(first, final)
    for i in final.statuses:
        nodes[f"n{i}"]["awake_start"] = first.statuses[i]["awake"]
        nodes[f"n{i}"]["awake_max_sampled"] = awake_max.get(i, 0)
    return {
        "scenario": "idle",
        "config": {"duration_s": args.duration, "groups": args.groups},
        "quiescent_after_s": quiescent_after,
        "cpu": cpu,
        "nodes": nodes,
    }


async def scenario_failover(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    setup = await prepare(cluster, args)
    kill: dict[str, Any] = {}

    async def during(measure: float, end: float, progress: Progress) -> None:
        await sleep_until(measure + args.duration / 2)
        sts = await cluster.statuses(answered_only=True)
        led = {i: [g[0] for g in st["groups"] if g[1] == ROLE_LEADER] for i, st in sts.items()}
        victim = max(led, key=lambda i: len(led[i]))
        survivors = [i for i in cluster.running() if i != victim]
        t_kill = now()  # before the signal: the clients may see the connections drop at once
        await cluster.kill(victim)
        progress.note = f"  << killed n{victim} (leader of {len(led[victim])} groups)"
        kill.update(victim=victim, t_kill=t_kill, groups=led[victim], survivors=survivors)
        first_led: dict[int, float] = {}
        polls = 0
        while now() < end:
            await asyncio.sleep(args.poll_ms / 1000)
            sts = await cluster.statuses(survivors, answered_only=True)
            t = now()
            polls += 1
            for g in leaders_reported(sts):
                first_led.setdefault(g, t)
            if len(first_led) == cluster.groups:
                break
        kill.update(first_led=first_led, polls=polls)
        if len(first_led) == cluster.groups:
            log(
                f"every group led again {first_led and max(first_led.values()) - t_kill:.3f} s"
                " after the kill"
            )

    run = await run_load(args, cluster, setup["leaders"], during)
    if not kill:
        raise RuntimeError("the kill did not happen")
    victim, t_kill, victim_groups = kill["victim"], kill["t_kill"], set(kill["groups"])
    first_led: dict[int, float] = kill["first_led"]
    all_led = max(first_led.values()) if len(first_led) == cluster.groups else None
    victim_led = sorted(first_led[g] - t_kill for g in victim_groups if g in first_led)

    # Gaps between acks, per group whose leader died: the gap that spans the kill.
    per_group: dict[int, list[float]] = {g: [] for g in victim_groups}
    for d, _, g in run.acks:
        if g in per_group:
            per_group[g].append(d)
    spans, first_ack = [], []
    for times in per_group.values():
        before = [d for d in times if d <= t_kill]
        after = [d for d in times if d > t_kill]
        if before and after:
            spans.append(after[0] - before[-1])
        if after:
            first_ack.append(after[0] - t_kill)
    baseline_gaps = []
    for times in per_group.values():
        w = [d for d in times if run.measure <= d <= t_kill]
        baseline_gaps += [b - a for a, b in itertools.pairwise(w)]
    baseline_gaps.sort()

    # Restart the killed node; it must catch up with the leaders' commit indexes.
    sts = await cluster.statuses(answered_only=True)
    leaders = leaders_reported(sts)
    target = {  # group -> commit index on its leader
        g: commit
        for node_id, st in sts.items()
        for g, _, _, _, commit, *_ in st["groups"]
        if leaders.get(g) == node_id
    }
    restart_ready = await cluster.restart(victim)
    started = now()
    caught_up = None
    st: dict[str, Any] = {}
    while now() - started < args.rejoin_timeout:
        with contextlib.suppress(OSError, TimeoutError, ControlError, ConnectionError):
            st = await cluster.status(victim, STATUS_TIMEOUT_S)
            behind = [
                g
                for g, _, _, lead, _, applied, *_ in st["groups"]
                if lead == 0 or applied < target.get(g, 0)
            ]
            if not behind and len(st["live_peers"]) == len(NODE_IDS) - 1:
                caught_up = now() - started
                break
        await asyncio.sleep(0.1)
    if caught_up is None:
        log(f"n{victim} did not catch up in {args.rejoin_timeout} s")

    figures = window_figures(args, run)
    return {
        "scenario": "failover",
        **figures,
        "killed_node": victim,
        "killed_at_s": t_kill - run.measure,
        "killed_node_led_groups": len(victim_groups),
        "all_groups_led_after_s": None if all_led is None else all_led - t_kill,
        "victim_groups_led_after_ms": latency_ms(victim_led),
        "status_polls": kill["polls"],
        "max_ack_gap_on_victim_groups_ms": 1000.0 * max(spans) if spans else None,
        "ack_gap_on_victim_groups_ms": latency_ms(spans),
        "first_ack_after_kill_on_victim_groups_ms": latency_ms(first_ack),
        "baseline_ack_gap_on_victim_groups_ms": latency_ms(baseline_gaps),
        "before_kill": load_figures(run, run.measure, t_kill),
        "after_kill": load_figures(run, t_kill, run.end),
        "after_all_led": load_figures(run, all_led, run.end) if all_led else None,
        "restart": {
            "ready_s": restart_ready,
            "caught_up_s": caught_up,
            "live_peers": st.get("live_peers"),
        },
    }


# -- the command line ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.raft_node", description=(__doc__ or "").split("\n")[0]
    )
    sub = p.add_subparsers(dest="scenario", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--groups", type=int, default=256)
        s.add_argument("--tick-ms", type=int, default=50)
        s.add_argument("--election-ticks", type=int, default=10)
        s.add_argument("--heartbeat-ticks", type=int, default=1)
        s.add_argument(
            "--lazy-commit",
            action="store_true",
            help="no commit broadcast: followers learn commits from the next message",
        )
        s.add_argument(
            "--skip-busy-heartbeats",
            action="store_true",
            help="no heartbeats (or empty appends) to followers busy with appends",
        )
        s.add_argument("--snapshot-entries", type=int, default=100_000)
        s.add_argument("--node-log-level", default="WARNING")
        s.add_argument("--json", metavar="FILE", help="write every figure to FILE")
        s.add_argument("--data-parent", default=None, help="where the temp data dir goes")
        s.add_argument("--keep-data", action="store_true", help="keep the data dir and logs")
        s.add_argument("--leader-timeout", type=float, default=60.0)
        s.add_argument(
            "--switch-interval-ms",
            type=float,
            default=0.0,
            help="run the nodes with sys.setswitchinterval(this) (default: Python's 5 ms)",
        )
        s.add_argument(
            "--wait-quiet",
            type=float,
            default=0.0,
            metavar="S",
            help="first wait up"
            " to S s for other processes to use < 10 %% of a core (shared machines)",
        )

    def load(s: argparse.ArgumentParser, concurrency: int, duration: float) -> None:
        s.add_argument("--concurrency", "-c", type=int, default=concurrency)
        s.add_argument("--duration", type=float, default=duration, help="measured seconds")
        s.add_argument("--warmup", type=float, default=3.0)
        s.add_argument("--payload-bytes", type=int, default=200)
        s.add_argument(
            "--procs",
            type=int,
            default=0,
            help="client processes (default: 2 if concurrency >= 64 else 1)",
        )
        s.add_argument("--retry-ms", type=float, default=20.0, help="pause before a retry")
        s.add_argument(
            "--profile-node",
            type=int,
            default=0,
            choices=(0, *NODE_IDS),
            help="py-spy this node over the window (perturbs the figures)",
        )
        s.add_argument("--profile-out", default="", help="collapsed stacks file")
        s.add_argument("--profile-rate", type=int, default=100)
        s.add_argument("--profile-top", type=int, default=15)
        s.add_argument("--profile-native", action="store_true", help="py-spy --native")
        s.add_argument(
            "--profile-gil",
            action="store_true",
            help="py-spy --gil: only samples of the thread holding the GIL",
        )

    t = sub.add_parser("throughput", help="closed-loop proposals: throughput and latency")
    common(t)
    load(t, 256, 20.0)
    i = sub.add_parser("idle", help="CPU and traffic of a quiescent cluster")
    common(i)
    i.add_argument("--duration", type=float, default=60.0)
    i.add_argument("--quiesce-timeout", type=float, default=60.0)
    i.add_argument("--status-every", type=float, default=10.0, help="awake-groups samples")
    f = sub.add_parser("failover", help="kill -9 the busiest leader under load")
    common(f)
    load(f, 64, 20.0)
    f.add_argument("--poll-ms", type=float, default=25.0, help="survivors' status poll period")
    f.add_argument("--rejoin-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if hasattr(args, "procs"):
        if args.procs <= 0:
            args.procs = 2 if args.concurrency >= 64 else 1
        if args.concurrency < 1 or args.procs > args.concurrency:
            p.error("need 1 <= --procs <= --concurrency")
        if args.payload_bytes < 1:
            p.error("--payload-bytes must be positive")
    if not 1 <= args.groups <= 4096:
        p.error("--groups must be in 1..4096")
    return args


SCENARIOS: dict[str, Callable[[argparse.Namespace, Cluster], Awaitable[dict[str, Any]]]] = {
    "throughput": scenario_throughput,
    "idle": scenario_idle,
    "failover": scenario_failover,
}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import uvloop

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    info = run_info(argv, args.data_parent or tempfile.gettempdir())
    info["command"] = shlex.join([sys.executable, "-m", "bench.raft_node", *argv])
    info["machine"]["nice"] = os.getpriority(os.PRIO_PROCESS, 0)  # the nodes and clients' too
    if args.wait_quiet:
        log(f"waiting up to {args.wait_quiet} s for a quiet machine")
    bg = wait_quiet(args.wait_quiet)
    info["background_busy_pct_of_core"] = bg
    if bg > 10.0:
        log(f"warning: the machine is already busy ({bg:.0f} % of a core) before the run")
    cluster = new_cluster(args)

    async def go() -> dict[str, Any]:
        try:
            return await SCENARIOS[args.scenario](args, cluster)
        finally:
            await cluster.close()

    try:
        result = uvloop.run(go())
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (WorkerError, RuntimeError, TimeoutError, AssertionError, ControlError, OSError) as e:
        log(f"error: {e}")
        return 1
    finally:
        cluster.kill_all()
        if args.keep_data:
            log(f"data kept in {cluster.base}")
        else:
            shutil.rmtree(cluster.base, ignore_errors=True)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "result": result}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
