"""Output: live progress on stderr while the load runs, the results table on stdout, JSON.

Progress is shown only when stderr is a terminal (and not ``--quiet``): a rich ``Live`` panel
refreshed 4 times a second with the phase, the acks per second over the last second, totals,
errors and the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .nodestats import describe, describe_context_reads, describe_tokens

REFRESH_S = 0.25
LATENCY_COLUMNS = ("mean", "p50", "p90", "p99", "p99.9", "max")
ACKS, ERRORS, READS, REPLAYS, OUTSTANDING = range(5)  # as in load


class Counters(Protocol):
    def total(self, counter: int) -> int: ...


class Progress:
    """Live progress of a run between ``t0`` and ``end`` (measured from ``measure``)."""

    def __init__(
        self, counters: Counters, t0: float, measure: float, end: float, enabled: bool = True
    ) -> None:
        self.counters = counters
        self.t0, self.measure, self.end = t0, measure, end
        self.enabled = enabled and sys.stderr.isatty()
        self.notes: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self.history: list[tuple[float, int]] = []  # (t, acks) of the last refreshes

    def phase_note(self, note: str) -> None:
        self.notes = [*self.notes[-3:], f"[{time.monotonic() - self.t0:5.1f}s] {note}"]

    def start(self) -> None:
        if self.enabled:
            self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def render(self) -> Group:
        t = time.monotonic()
        acks = self.counters.total(ACKS)
        self.history = [*[(ht, a) for ht, a in self.history if t - ht <= 1.0], (t, acks)]
        t_old, acks_old = self.history[0]
        rate = (acks - acks_old) / (t - t_old) if t > t_old else 0.0
        if t < self.measure:
            phase = "warm-up"
        elif t < self.end:
            phase = "measure"
        else:
            phase = "drain"
        table = Table.grid(padding=(0, 2))
        for _ in range(6):
            table.add_column(justify="right")
        table.add_row("phase", "elapsed", "acks/s", "acks", "errors", "in flight")
        table.add_row(
            phase,
            f"{t - self.t0:5.1f} / {self.end - self.t0:.0f} s",
            f"{rate:,.0f}",
            f"{acks:,}",
            f"{self.counters.total(ERRORS):,}",
            f"{self.counters.total(OUTSTANDING):,}",
        )
        reads, replays = self.counters.total(READS), self.counters.total(REPLAYS)
        extra = [Text(f"reads {reads:,}  replays {replays:,}")] if reads or replays else []
        return Group(table, *extra, *(Text(n, style="dim") for n in self.notes))

    async def _run(self) -> None:
        console = Console(stderr=True)
        with Live(self.render(), console=console, auto_refresh=False, transient=True) as live:
            while True:
                await asyncio.sleep(REFRESH_S)
                live.update(self.render(), refresh=True)


# -- the results table ----------------------------------------------------------------------------
def _ms(v: float) -> str:
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _latency_row(name: str, fig: dict[str, Any]) -> list[str]:
    lat = fig["latency_ms"]
    return [
        name,
        f"{fig['count']:,}",
        f"{fig['per_s']:,.0f}",
        *(_ms(lat[c]) for c in LATENCY_COLUMNS),
    ]


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"


def _summary_row(name: str, s: dict[str, float]) -> list[str]:
    return [name, f"{int(s['count']):,}", "", *(_ms(s[c]) for c in LATENCY_COLUMNS)]


def latency_table(doc: dict[str, Any]) -> Table:
    table = Table()
    table.add_column("")
    for column in ("count", "per s", *(f"{c} ms" for c in LATENCY_COLUMNS)):
        table.add_column(column, justify="right")
    table.add_row(*_latency_row("append", doc["appends"]))
    if "reads" in doc:
        table.add_row(*_latency_row("read (last 50)", doc["reads"]))
    if "replay" in doc:
        table.add_row(*_latency_row("replay (backlog)", doc["replay"]))
        table.add_row(*_summary_row("  replay page", doc["replay"]["page_latency_ms"]))
    if "context" in doc:
        table.add_row(*_latency_row("get_context", doc["context"]))
    if "failover" in doc:
        fo = doc["failover"]
        table.add_row(*_summary_row("append before kill", fo["p99_before"]))
        table.add_row(*_summary_row("append during", fo["p99_during"]))
        table.add_row(*_summary_row("append after", fo["p99_after"]))
    if "join" in doc:
        jo = doc["join"]
        table.add_row(*_summary_row("append before join", jo["p99_before"]))
        table.add_row(*_summary_row("append during moves", jo["p99_during"]))
        table.add_row(*_summary_row("append after", jo["p99_after"]))
    if "send_lag_ms" in doc["client"]:
        table.add_row(*_summary_row("client send lag", doc["client"]["send_lag_ms"]))
    return table


def title(doc: dict[str, Any]) -> str:
    c = doc["config"]
    load = (
        f"open loop {c['rate']:,}/s"
        if c["rate"]
        else f"closed loop, concurrency {c['concurrency']}"
    )
    where = f"{c['nodes']} local nodes" if c["nodes"] else f"target {c['target']}"
    body = f"{c['payload_bytes']} B" + (f" in {c['parts']} parts" if c.get("parts") else "")
    if c.get("payload_text", "letters") != "letters":
        body += f" of {c['payload_text']}"
    if c.get("context_policy"):
        body += f", window {c['context_policy']} (budget {c['context_budget']:,})"
    node_args = doc.get("cluster", {}).get("node_args")
    if node_args:
        where += f" ({' '.join(node_args)})"
    return (
        f"ctxstore-bench {doc['scenario']} via {doc.get('via', 'native')}: {load}, "
        f"{c['sessions']:,} sessions, "
        f"{body}, route {c['route']}, {where}, {doc['window_s']:g} s measured"
    )


def details_table(doc: dict[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("errors", _counts(doc["errors"]))
    table.add_row("retries", f"{doc['retries']:,}")
    table.add_row("failed", _counts(doc["failed"]))
    table.add_row("unfinished", f"{doc['unfinished']:,}")
    cpu = doc["cpu"]
    gone = set(cpu.get("gone", ()))
    procs = ", ".join(
        (f"{k} {v:.0f}" if v is not None else f"{k} -") + (" (killed)" if k in gone else "")
        for k, v in cpu["pct_of_core"].items()
    )
    per_op = [f"{k} {v:.0f} µs" for k, v in cpu.get("us_per_op", {}).items() if v is not None]
    if per_op:
        procs += "; per op: " + ", ".join(per_op)
    table.add_row("CPU % of a core", procs)
    table.add_row(
        "machine",
        f"{cpu['machine_cores']} cores, {cpu['machine_busy_pct']} % busy, "
        f"other processes {cpu['others_pct_of_core']} % of a core",
    )
    if doc.get("node_pauses"):
        table.add_row("node pauses", describe(doc["node_pauses"]))
        if (tokens := describe_tokens(doc["node_pauses"])) is not None:
            table.add_row("token counting", tokens)
        if (reads := describe_context_reads(doc["node_pauses"])) is not None:
            table.add_row("context reads", reads)
    tl = doc.get("timeline")
    if tl is not None and tl["worst"] is not None:
        over = tl["over_target"]
        at = ", ".join(f"{t:g}" for t in over[:8]) + (" …" if len(over) > 8 else "")
        table.add_row(
            "timeline",
            f"worst {tl['step_s']:g} s step at {tl['worst']['t']:g} s: p99 "
            f"{tl['worst']['p99']:.1f} ms; {len(over)} of {tl['steps']} steps over the p99 "
            f"target" + (f" (at {at})" if over else ""),
        )
    if "failover" in doc:
        fo = doc["failover"]
        table.add_row(
            "failover",
            f"killed node {fo['victim']} (led {fo['groups_led']} groups); every group led again "
            f"after {fo['all_led_again_s']} s; longest no-ack gap on its groups "
            f"{fo['unavailable_s']} s (median {fo['unavailable_median_s']} s); "
            f"restart {fo['restart_s']} s",
        )
    if "join" in doc:
        jo = doc["join"]
        table.add_row(
            "join",
            f"node {jo['node']} joined at {jo['join_at_s']} s, ready after {jo['ready_after_s']}"
            f" s; {jo['groups_placed']} groups placed on it; moves over after "
            f"{jo['moves_over_after_s']} s",
        )
    if "context" in doc:
        f, s = doc["context"].get("filled", {}), doc["context"]["served"]
        table.add_row(
            "context",
            f"{f.get('sessions', 0)} windows filled with {f.get('message_bytes', 0):,} B messages "
            f"to {f.get('tokens_min', 0):,}-{f.get('tokens_max', 0):,} tokens; served "
            f"{s.get('tokens_min', 0):,}-{s.get('tokens_max', 0):,} tokens in "
            f"{s.get('messages_min', 0):,}-{s.get('messages_max', 0):,} messages; get_context "
            f"p99 target {doc['config']['context_p99_target_ms']:g} ms",
        )
    if "replay" in doc:
        table.add_row("replay", f"{doc['config']['backlog']:,} messages per replay")
    v = doc.get("verify")
    if v is not None:
        where = f" through node {v['read_from_node']}" if v["read_from_node"] else ""
        text = (
            f"{v['sessions']:,} sessions{where}, {v['messages']:,} messages, "
            f"{v['acked']:,} acked: missing {v['missing']}, duplicated {v['duplicated']}, "
            f"misplaced {v['misplaced']}, bad seqs {v['bad_seqs']}, unreadable "
            f"{v['unreadable']}; landed unacked {v['landed_unacked']}, evicted {v['evicted']}"
        )
        table.add_row("verify", ("OK: " if v["ok"] else "FAILED: ") + text)
        for problem in v["problems"][:5]:
            table.add_row("", problem)
    prof = doc.get("profile")
    if prof is not None:
        table.add_row(
            "profile",
            f"{prof['file']}: {prof['samples']:,} samples of {', '.join(prof['nodes'])} at "
            f"{prof['rate_hz']} Hz, {prof['samples_per_1000_appends']:g} per 1,000 appends "
            "(python -m bench profile-diff A B compares two)",
        )
    for warning in doc.get("warnings", []):
        table.add_row("warning", Text(warning, style="yellow"))
    g = doc["gate"]
    verdict = "PASS" if g["passed"] else "FAIL: " + "; ".join(g["failures"])
    table.add_row("gate", f"p99 target {g['p99_target_ms']:g} ms: {verdict}")
    return table


def print_report(doc: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(title(doc), highlight=False, soft_wrap=True)  # one line, for grep
    console.print(latency_table(doc))
    console.print(details_table(doc))


def write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def log(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


__all__: Sequence[str] = ["Progress", "log", "print_report", "write_json"]
