"""A node joins a local cluster mid-run (``--join-at``, any scenario with ``--nodes``): the
appends' p99 while the groups move to it (design §5.6).

At ``measure + join_at * window`` a new node starts with ``serve --join`` through node 1
(``LocalCluster.add_node``); then the nodes' ``/admin/nodes`` are polled until the cluster has
settled: every node's view names the joiner active, and no node has a group moving.  The
figures: when it joined, when it was ready and when the moves were over (seconds from the start
of the window), the groups placed on it, and the appends' latency started before the join,
while the groups moved, and after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgspec

from ctxstore.launcher import LocalCluster

from .failover import phase_p99
from .load import WorkerResult
from .report import Progress

now = time.monotonic
POLL_S = 0.25
SETTLE_TIMEOUT_S = 120.0


async def get_json(target: str, path: str) -> tuple[int, Any]:
    """``GET path`` on a node's ops port (``host:port``): the status and the JSON body."""
    host, _, port = target.rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, msgspec.json.decode(body) if body else None


@dataclasses.dataclass
class Join:
    node: int = 0
    t_join: float = 0.0
    t_ready: float = 0.0
    t_settled: float | None = None
    groups: int = 0  # placed on the joiner once settled


async def _settled(cluster: LocalCluster, joiner: int) -> tuple[bool, int]:
    """Every running node's view (the same version) shows the joiner active, none has a group
    moving, and the members of every group, as its leader sees them, are the view's replicas
    (the mover's ``moving`` alone reads 0 until its first round after the view changed); the
    groups placed on the joiner."""
    placed, versions = 0, set()
    for child in cluster.children.values():
        if child.process is None or child.process.returncode is not None:
            continue
        status, body = await get_json(child.ops_target, "/admin/nodes")
        if status != 200:
            return False, 0
        versions.add(body["version"])
        states = {n["id"]: n for n in body["nodes"]}
        if joiner not in states or states[joiner]["state"] != "active":
            return False, 0
        local, replicas = body["local"], body["replicas"]
        if local["moving"]:
            return False, 0
        if any(local["members"][str(g)] != replicas[str(g)] for g in local["led"]):
            return False, 0
        placed = states[joiner]["groups"]
    return len(versions) == 1, placed


async def join_node(cluster: LocalCluster, join: Join, at: float, progress: Progress) -> None:
    await asyncio.sleep(max(0.0, at - now()))
    join.node = cluster.add_node(via=1)
    join.t_join = now()
    progress.phase_note(f"node {join.node} joining")
    await cluster.start_node(join.node, timeout_s=60)
    join.t_ready = now()
    deadline = join.t_ready + SETTLE_TIMEOUT_S
    while now() < deadline:
        ok, placed = await _settled(cluster, join.node)
        if ok:
            join.t_settled, join.groups = now(), placed
            progress.phase_note(
                f"node {join.node} holds {placed} groups; moves over after "
                f"{join.t_settled - join.t_join:.1f} s"
            )
            return
        await asyncio.sleep(POLL_S)


def join_figures(
    results: list[WorkerResult], measure: float, end: float, join: Join
) -> dict[str, Any]:
    settled = join.t_settled if join.t_settled is not None else end
    return {
        "node": join.node,
        "join_at_s": round(join.t_join - measure, 3),
        "ready_after_s": round(join.t_ready - join.t_join, 3),
        "moves_over_after_s": (
            None if join.t_settled is None else round(join.t_settled - join.t_join, 3)
        ),
        "groups_placed": join.groups,
        "p99_before": phase_p99(results, measure, join.t_join),
        "p99_during": phase_p99(results, join.t_join, settled),
        "p99_after": phase_p99(results, settled, end),
    }


__all__ = ["Join", "get_json", "join_figures", "join_node"]
