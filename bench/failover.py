"""The failover scenario's side of the run: kill the busiest leader, time the recovery.

At a moment inside the measured window the node leading the most groups is killed with SIGKILL
(a group's leader is the node whose ``GetRoutes`` names itself, else the one the others name);
the survivors are polled until each group it led has a surviving leader.  From the client
processes' ack logs: per group it led, the gap between its last ack before the kill and its
first ack after (the unavailability a client of that group sees), and the latencies before,
during (until every group is led again) and after.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from collections import Counter
from typing import Any, Protocol

from wire.client import Client, ClientError

from .load import WorkerResult
from .timeline import window_histogram

now = time.monotonic
POLL_TIMEOUT_S = 60.0


class Notes(Protocol):
    def phase_note(self, note: str) -> None: ...


class Cluster(Protocol):
    """What the failover needs of ``scenarios.Target``."""

    nodes: dict[int, str]
    groups: int

    async def client(self, token: str | None, node_id: int | None = None) -> Client: ...

    def kill(self, node_id: int) -> None: ...


@dataclasses.dataclass
class Kill:
    victim: int = 0
    led: list[int] = dataclasses.field(default_factory=list)  # groups it led
    t_kill: float = 0.0
    led_again: dict[int, float] = dataclasses.field(default_factory=dict)  # group -> time
    t_all_led: float | None = None
    restart_s: float | None = None


async def claimed_leaders(clients: dict[int, Client], groups: int) -> list[int]:
    """Per group, the node (of ``clients``) that names itself its leader, else one that
    another of them names (0: none)."""
    claimed, named = [0] * groups, [0] * groups
    for node_id, client in clients.items():
        try:
            routes = await client.get_routes()
        except ClientError:
            continue
        for g, leader in enumerate(routes.leaders[:groups]):
            if leader == node_id:
                claimed[g] = leader
            elif leader in clients and not named[g]:
                named[g] = leader
    return [c or n for c, n in zip(claimed, named, strict=True)]


async def kill_leader(
    args: argparse.Namespace, target: Cluster, kill: Kill, at: float, progress: Notes
) -> None:
    """At ``at``: SIGKILL the node leading the most groups; poll until they are led again."""
    clients = {i: await target.client(args.token, i) for i in target.nodes}
    try:
        await asyncio.sleep(max(0.0, at - now()))
        leaders = await claimed_leaders(clients, target.groups)
        counts = Counter(leader for leader in leaders if leader)
        if not counts:
            raise RuntimeError("failover: no node reports a leader")
        kill.victim = counts.most_common(1)[0][0]
        kill.led = [g for g, leader in enumerate(leaders) if leader == kill.victim]
        kill.t_kill = now()
        target.kill(kill.victim)
        progress.phase_note(f"killed node {kill.victim} (led {len(kill.led)} groups)")
        await clients.pop(kill.victim).close()
        waiting = set(kill.led)
        deadline = kill.t_kill + POLL_TIMEOUT_S
        while waiting and now() < deadline:
            await asyncio.sleep(args.poll_ms / 1000)
            leaders = await claimed_leaders(clients, target.groups)
            t = now()
            for g in [g for g in waiting if leaders[g]]:
                kill.led_again[g] = t
                waiting.discard(g)
    finally:
        for client in clients.values():
            await client.close()
    if not waiting:
        kill.t_all_led = max(kill.led_again.values(), default=kill.t_kill)
        progress.phase_note(f"all groups led again after {kill.t_all_led - kill.t_kill:.2f} s")


def phase_p99(results: list[WorkerResult], t_from: float, t_to: float) -> dict[str, Any]:
    """Latencies of the acked requests started in [t_from, t_to)."""
    h = window_histogram(results, t_from, t_to)
    return {"seconds": round(max(0.0, t_to - t_from), 3), **h.summary_ms()}


def failover_figures(
    results: list[WorkerResult], measure: float, end: float, kill: Kill, groups: list[int]
) -> dict[str, Any]:
    """The figures of a failover in the window [measure, end); ``groups``: the group of each
    session index."""
    led = set(kill.led)
    before: dict[int, float] = {}
    after: dict[int, float] = {}
    for r in results:
        for sidx, done in zip(r.ack_sess, r.ack_done, strict=True):
            g = groups[sidx]
            if g not in led:
                continue
            if done < kill.t_kill:
                before[g] = max(before.get(g, 0.0), done)
            elif done < after.get(g, float("inf")):
                after[g] = done
    gaps = [after[g] - before[g] for g in led if g in before and g in after]
    never = sorted(g for g in led if g not in after)
    end_led = kill.t_all_led if kill.t_all_led is not None else end
    return {
        "victim": kill.victim,
        "groups_led": len(kill.led),
        "all_led_again_s": (
            round(kill.t_all_led - kill.t_kill, 3) if kill.t_all_led is not None else None
        ),
        "unavailable_s": round(max(gaps), 3) if gaps else None,
        "unavailable_median_s": round(statistics.median(gaps), 3) if gaps else None,
        "groups_without_ack_after_kill": len(never),
        "per_group_s": {  # group -> [last ack before the kill, first after], from the kill
            str(g): [
                round(before[g] - kill.t_kill, 3) if g in before else None,
                round(after[g] - kill.t_kill, 3) if g in after else None,
            ]
            for g in sorted(led)
        },
        "restart_s": kill.restart_s,
        "p99_before": phase_p99(results, measure, kill.t_kill),
        "p99_during": phase_p99(results, kill.t_kill, end_led),
        "p99_after": phase_p99(results, end_led, end),
    }


__all__ = ["Kill", "failover_figures", "kill_leader"]
