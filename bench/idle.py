"""What an idle local cluster costs: each node's CPU with no client load (design §3.2, §5.6).

    ctxstore-bench idle --nodes 5 --duration 30
    ctxstore-bench idle --nodes 5 -- --groups 256     (flags after -- go to the nodes)

Starts ``--nodes`` local ``ctxstore serve`` processes, waits ``--settle`` seconds (first
elections, leader balancing, quiescence), then samples each node's CPU (utime + stime from
``/proc``) over ``--duration`` seconds, and the whole machine's.  It also reads each node's
``/admin/nodes``: the groups it hosts and leads, and the replicas per group of the view (the
sum of the hosted groups over the nodes is ``groups * min(3, nodes)``, not ``groups * nodes``).
Other processes on the machine are reported, not subtracted: with other load the figures are
noisy.  Gate: every node under ``--cpu-target-pct`` (2 % of a core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import uvloop

from ctxstore.launcher import LocalCluster

from .join import get_json
from .sysinfo import cpu_seconds, machine_busy_seconds


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ctxstore-bench idle", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=5, help="local nodes (1 to 7, default 5)")
    p.add_argument("--settle", type=float, default=15.0, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--cpu-target-pct", type=float, default=2.0, help="gate per node, %% of a core")
    p.add_argument("--data-parent", default=None)
    p.add_argument("--json", default=None, metavar="FILE")
    argv = list(argv)
    node_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, node_args = argv[:at], argv[at + 1 :]
    args = p.parse_args(argv)
    args.node_args = node_args
    if not 1 <= args.nodes <= 7 or args.duration <= 0 or args.settle < 0:
        p.error("--nodes 1 to 7, --duration positive, --settle not negative")
    return args


async def _nodes_view(cluster: LocalCluster) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, child in sorted(cluster.children.items()):
        status, body = await get_json(child.ops_target, "/admin/nodes")
        if status == 200:
            out[str(i)] = {"hosted": len(body["local"]["hosted"]), "led": len(body["local"]["led"])}
            replicas = body["replicas"]
            out["replicas_per_group"] = sorted({len(r) for r in replicas.values()})
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="ctxstore-idle-", dir=args.data_parent)
    cluster = LocalCluster(args.nodes, data_dir, extra_args=args.node_args)
    try:
        print(f"starting {args.nodes} local nodes in {data_dir}", file=sys.stderr)
        await cluster.start()
        await asyncio.sleep(args.settle)
        pids = {i: c.process.pid for i, c in cluster.children.items() if c.process is not None}
        first = {i: cpu_seconds(pid) for i, pid in pids.items()}
        busy0, total0 = machine_busy_seconds()
        t0 = time.monotonic()
        await asyncio.sleep(args.duration)
        seconds = time.monotonic() - t0
        last = {i: cpu_seconds(pid) for i, pid in pids.items()}
        busy1, total1 = machine_busy_seconds()
        placement = await _nodes_view(cluster)
    finally:
        await cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    pct = {
        f"node{i}": None if a is None or b is None else round((b - a) / seconds * 100, 2)
        for i, (a, b) in ((i, (first[i], last[i])) for i in pids)
    }
    nodes_busy = sum(v for v in pct.values() if v is not None)
    machine = (busy1 - busy0) / max(total1 - total0, 1e-9) * 100
    cores = (total1 - total0) / seconds if seconds > 0 else 0
    others = max(0.0, machine / 100 * cores * 100 - nodes_busy)
    failures = [f"{k} {v} % > {args.cpu_target_pct} %" for k, v in pct.items()
                if v is None or v > args.cpu_target_pct]  # fmt: skip
    return {
        "scenario": "idle",
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "data_parent")},
        "window_s": round(seconds, 2),
        "cpu_pct_of_core": pct,
        "others_pct_of_core": round(others, 1),
        "placement": placement,
        "gate": {"passed": not failures, "failures": failures},
    }


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    doc = uvloop.run(_run(args))
    print(json.dumps(doc, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if doc["gate"]["passed"] else 1


__all__ = ["main", "parse"]
