"""The tables ``python -m bench.raft_node`` prints from its results (``bench.raft_node``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if k else c.ljust(w)
                for k, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _latency_row(name: str, fig: dict[str, Any] | None) -> list[Any]:
    if not fig:
        return [name, "-", "-", "-", "-", "-", "-", "-", "-"]
    lat = fig["latency_ms"] or {}
    errors = ", ".join(f"{k}={v}" for k, v in fig["errors"].items()) or "none"
    return [
        name,
        fig["acks_per_s"],
        lat.get("p50"),
        lat.get("p90"),
        lat.get("p99"),
        lat.get("p99.9"),
        lat.get("max"),
        fig["acks"],
        errors,
    ]


LATENCY_HEADERS = (
    "window",
    "acks/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "acks",
    "errors",
)


def report_nodes(res: dict[str, Any]) -> str:
    pct = res["cpu"]["pct_of_core"]
    rows = []
    for name, n in res["nodes"].items():
        rows.append(
            [
                name,
                n["leads"],
                pct.get(name),
                n["fsyncs_per_s"],
                n["batches_per_fsync"],
                n["records_per_fsync"],
                n["bytes_per_fsync"] / 1024,
                n["fsync_ms_avg"],
                n["wal_busy_pct"],
                n["messages_per_s"],
                n["passes_per_s"],
            ]
        )
    headers = (
        "node",
        "leads",
        "CPU %core",
        "fsyncs/s",
        "batches/fsync",
        "records/fsync",
        "KiB/fsync",
        "fsync ms",
        "fsync busy %",
        "msgs sent/s",
        "passes/s",
    )
    clients = [
        f"{k} {v:.1f} %"
        for k, v in pct.items()
        if (k.startswith("c") or k == "bench") and v is not None
    ]
    text = table(headers, rows)
    if clients:
        text += "\nclient CPU (% of one core): " + ", ".join(clients)
    return text + "\n" + machine_line(res["cpu"])


def machine_line(cpu: dict[str, Any]) -> str:
    return (
        f"machine busy: {_fmt(cpu['machine_busy_pct'])} % of {cpu['machine_cores']} cores, shared"
        f" by nodes and clients; other processes: {_fmt(cpu['others_pct_of_core'])} % of one core"
    )


def report(res: dict[str, Any]) -> str:
    out = []
    if res["scenario"] in ("throughput", "failover"):
        c = res["config"]
        out.append(
            f"{res['scenario']}: concurrency {c['concurrency']} in {c['procs']} client process(es),"
            f" {c['groups']} groups, {c['payload_bytes']} B payload, {c['duration_s']} s window"
            f" after {c['warmup_s']} s warm-up"
            + (f"  [node {c['profiled_node']} profiled]" if c["profiled_node"] else "")
            + (
                f"  [nodes: switch interval {c['node_switch_interval_ms']} ms]"
                if c["node_switch_interval_ms"]
                else ""
            )
        )
        rows = [_latency_row("window", res)]
        if res["scenario"] == "failover":
            rows += [
                _latency_row("before kill", res["before_kill"]),
                _latency_row("after kill", res["after_kill"]),
                _latency_row("after all led", res["after_all_led"]),
            ]
        out += ["", table(LATENCY_HEADERS, rows), "", report_nodes(res)]
        if res["unfinished_after_drain"]:
            out.append(f"requests unfinished after the drain: {res['unfinished_after_drain']}")
    if res["scenario"] == "failover":
        led = res["victim_groups_led_after_ms"]
        gap = res["ack_gap_on_victim_groups_ms"]
        base = res["baseline_ack_gap_on_victim_groups_ms"]
        first = res["first_ack_after_kill_on_victim_groups_ms"]
        r = res["restart"]
        out += [
            "",
            f"killed n{res['killed_node']} (leader of {res['killed_node_led_groups']} groups) "
            f"{res['killed_at_s']:.2f} s into the window",
            f"every group led again after: {_fmt(res['all_groups_led_after_s'], 3)} s "
            f"(its groups: p50 {_fmt(led.get('p50'))} ms, max {_fmt(led.get('max'))} ms;"
            f" {res['status_polls']} polls)",
            f"ack gap across the kill on its groups: max {_fmt(gap.get('max'))} ms, "
            f"p50 {_fmt(gap.get('p50'))} ms (before the kill: p50 {_fmt(base.get('p50'))} ms, "
            f"max {_fmt(base.get('max'))} ms); first ack after the kill: p50 "
            f"{_fmt(first.get('p50'))} ms, max {_fmt(first.get('max'))} ms",
            f"restart: ready after {_fmt(r['ready_s'], 2)} s, caught up "
            f"{_fmt(r['caught_up_s'], 2)} s later (live peers {r['live_peers']})",
        ]
    if res["scenario"] == "idle":
        pct = res["cpu"]["pct_of_core"]
        rows = []
        for name, n in res["nodes"].items():
            rows.append(
                [
                    name,
                    pct.get(name),
                    n["awake_start"],
                    n["awake_max_sampled"],
                    n["awake_end"],
                    n["driver"]["messages_sent"],
                    n["messages_per_s"],
                    n["host"]["ticks"],
                    n["host"]["woken"],
                    n["wal"]["fsyncs"],
                ]
            )
        headers = (
            "node",
            "CPU %core",
            "awake start",
            "awake max",
            "awake end",
            "msgs sent",
            "msgs/s",
            "ticks",
            "woken",
            "fsyncs",
        )
        out += [
            f"idle: {res['config']['duration_s']} s, {res['config']['groups']} groups, quiescent "
            f"{res['quiescent_after_s']:.2f} s after every group had a leader",
            "",
            table(headers, rows),
            f"goal: each node < 2 % of one core; bench process {_fmt(pct.get('bench'))} %",
            machine_line(res["cpu"]),
        ]
    return "\n".join(out)
