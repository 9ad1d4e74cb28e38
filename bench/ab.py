"""``python -m bench ab``: two builds, or two configurations of one, run alternating (A/B).

    python -m bench ab --a a831098 --b . --pairs 3 -- \\
        append --nodes 3 --concurrency 256 --duration 20 --warmup 3
    python -m bench ab --pairs 3 --b-args=--wal-writer=thread -- \\
        agents --nodes 3 --conversations 200 --duration 15
    python -m bench ab --pairs 3 --b-args="--postgres-dsn postgresql://postgres@127.0.0.1/ab" \\
        --before-b "dropdb --if-exists ab; createdb ab" -- append --nodes 3 --concurrency 256

A side is a tree and the node flags it adds: ``--a``/``--b`` name the tree (``.``, this checkout,
the default; a directory; or a git revision, exported with ``git archive`` into ``--work`` and
compiled there as ``make`` compiles, once), ``--a-args``/``--b-args`` the flags for its nodes
(after the command's own ``--``), ``--before-a``/``--before-b`` a shell command run before each
of its runs (a fresh database, say).  The command after ``--`` is any ``python -m bench``
scenario that writes ``--json`` (the ``ctxstore-bench`` scenarios and ``agents``); each run is
``PYTHONPATH=<tree> python -m bench <command> --json F --quiet [-- <flags>]`` from the tree.

The pairs run A then B, then B then A, and so on (``--order ab`` keeps A first): a box whose
speed drifts over minutes moves both sides alike.  The report gives each run's figures (the
scenario's throughput, latencies and the nodes' CPU per operation), each pair's B/A ratio,
and per figure the medians, the median ratio and in how many pairs B did better: on a shared
box a single pair decides nothing.  Everything goes to ``--out`` (each run's JSON and
``ab.json``).  Exit status: 0 when every run wrote its report (whatever its gate said), 2 for
usage errors and runs that wrote none.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .report import log, write_json

REPO = Path(__file__).resolve().parents[1]
BUILT = ".ab-built"  # in an exported tree once it is compiled
RUN_TIMEOUT_S = 3600.0

# Each figure: where it is in a report, and which way is better (None: shown, not judged).
METRICS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("appends/s", ("appends", "per_s"), "higher"),
    ("p50 ms", ("appends", "latency_ms", "p50"), "lower"),
    ("p99 ms", ("appends", "latency_ms", "p99"), "lower"),
    ("nodes µs/op", ("cpu", "us_per_op", "nodes"), "lower"),
    ("get_context p99 ms", ("context", "latency_ms", "p99"), "lower"),
    ("chunk p50 ms", ("chunk_latency", "p50_ms"), "lower"),
    ("chunk p99 ms", ("chunk_latency", "p99_ms"), "lower"),
    ("replies", ("chunk_latency", "replies"), "higher"),
    ("alone p99 ms", ("appends_without_agents", "p99_ms"), "lower"),
    ("beside agents p99 ms", ("appends_with_agents", "p99_ms"), "lower"),
    ("machine busy %", ("cpu", "machine_busy_pct"), None),
    ("others % of a core", ("cpu", "others_pct_of_core"), None),
)
BETTER = {name: better for name, _, better in METRICS} | {"nodes % of a core": None}


class UsageError(Exception):
    pass


@dataclass
class Side:
    name: str  # "a" or "b"
    spec: str  # ".", a directory or a git revision
    node_args: list[str]
    before: str | None
    tree: Path = field(default=REPO)
    commit: str = ""


def figures(doc: dict[str, Any]) -> dict[str, float]:
    """The figures of ``METRICS`` a report holds (an agents report has no appends, an append
    report no chunks; the nodes' CPU of an agents run is its share of a core)."""
    out: dict[str, float] = {}
    for name, path, _ in METRICS:
        value: Any = doc
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    chunks = doc.get("chunk_latency")
    if isinstance(chunks, dict):
        cpu = chunks.get("cpu", {})
        shares = cpu.get("pct_of_core", {})
        out["nodes % of a core"] = float(
            sum(v for k, v in shares.items() if k.startswith("node") and v is not None)
        )
        if "machine_busy_pct" in cpu:
            out["machine busy %"] = float(cpu["machine_busy_pct"])
    return out


def command(bench_args: Sequence[str], json_path: str, node_args: Sequence[str]) -> list[str]:
    """``python -m bench`` with ``bench_args``, its report to ``json_path``, quiet, and
    ``node_args`` after the command's own node flags (those after its ``--``)."""
    head, tail = list(bench_args), []
    if "--" in head:
        cut = head.index("--")
        head, tail = head[:cut], head[cut + 1 :]
    cmd = [sys.executable, "-m", "bench", *head, "--json", json_path, "--quiet"]
    rest = [*tail, *node_args]
    return cmd + (["--", *rest] if rest else [])


def _git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout.strip()


def resolve(side: Side, work: Path, quiet: bool) -> None:
    """Set ``side.tree`` and ``side.commit``: this checkout, a directory, or a revision
    exported and compiled under ``work`` (kept there: a second run reuses it)."""
    spec = side.spec
    if spec == "." or Path(spec).resolve() == REPO:
        side.tree = REPO
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        side.commit = _git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
        return
    if Path(spec).is_dir():
        side.tree = Path(spec).resolve()
        side.commit = f"directory {side.tree}"
        return
    sha = _git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    tree = work / f"tree-{sha[:12]}"
    side.tree, side.commit = tree, sha
    if (tree / BUILT).exists():
        return
    log(f"ab: exporting {spec} ({sha[:12]}) to {tree} and compiling it", quiet)
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise UsageError(f"git archive {sha}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    with open(tree / "build.log", "wb") as build_log:
        built = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
            stdout=build_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if built.returncode != 0:
        raise UsageError(f"compiling {spec} failed: see {tree / 'build.log'}")
    (tree / BUILT).write_text(sha + "\n")


def run_once(side: Side, bench_args: Sequence[str], out: Path, label: str) -> dict[str, Any]:
    """One run of ``side``: its ``before`` command, then the bench; the run's record."""
    before_exit = None
    if side.before:
        before_exit = subprocess.run(side.before, shell=True, cwd=side.tree,
                                     capture_output=True).returncode  # fmt: skip
    json_path = out / f"{label}.json"
    json_path.unlink(missing_ok=True)
    cmd = command(bench_args, str(json_path), side.node_args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(side.tree), *filter(None, [env.get("PYTHONPATH")])])
    started = time.monotonic()
    with open(out / f"{label}.log", "wb") as run_log:
        done = subprocess.run(
            cmd, cwd=side.tree, env=env, stdout=run_log, stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
    record: dict[str, Any] = {
        "side": side.name, "label": label, "exit": done.returncode,
        "seconds": round(time.monotonic() - started, 1), "command": shlex.join(cmd[1:]),
    }  # fmt: skip
    if before_exit is not None:
        record["before_exit"] = before_exit
    if json_path.exists():
        record["json"] = str(json_path)
        record["figures"] = figures(json.loads(json_path.read_text()))
    else:
        record["error"] = f"no report (exit {done.returncode}): see {out / (label + '.log')}"
    return record


def summarize(pairs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per figure: both sides' medians, the median of the pairs' B/A ratios, and how many
    pairs B did better (by the figure's direction), over the pairs where both ran."""
    whole = [p for p in pairs if "figures" in p["a"] and "figures" in p["b"]]
    names = [n for n in BETTER if any(n in p["a"]["figures"] for p in whole)]
    names += sorted({n for p in whole for n in p["a"]["figures"]} - set(names))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        both = [
            (p["a"]["figures"][name], p["b"]["figures"][name])
            for p in whole
            if name in p["a"]["figures"] and name in p["b"]["figures"]
        ]
        if not both:
            continue
        better = BETTER.get(name)
        ratios = [b / a for a, b in both if a]
        wins = None
        if better is not None:
            wins = sum((b > a) if better == "higher" else (b < a) for a, b in both)
        out[name] = {
            "a_median": statistics.median(a for a, _ in both),
            "b_median": statistics.median(b for _, b in both),
            "ratio_median": statistics.median(ratios) if ratios else None,
            "better": better,
            "b_better_pairs": wins,
            "pairs": len(both),
        }
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def print_report(doc: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=140)
    a, b = doc["a"], doc["b"]
    console.print(f"A: {a['spec']} ({a['commit']}) {shlex.join(a['node_args'])}".rstrip())
    console.print(f"B: {b['spec']} ({b['commit']}) {shlex.join(b['node_args'])}".rstrip())
    console.print(f"command: python -m bench {shlex.join(doc['bench_args'])}")
    names = list(doc["summary"])
    runs = Table("pair", "side", *names)
    for p in doc["pairs"]:
        for s in ("a", "b"):
            r = p[s]
            cells = [_fmt(r.get("figures", {}).get(n)) for n in names]
            runs.add_row(str(p["pair"]), s.upper() if "figures" in r else f"{s.upper()} (failed)",
                         *cells)  # fmt: skip
    console.print(runs)
    summary = Table("figure", "A median", "B median", "B/A (median of pairs)", "B better in")
    for name, s in doc["summary"].items():
        wins = "-" if s["b_better_pairs"] is None else f"{s['b_better_pairs']} of {s['pairs']}"
        ratio = "-" if s["ratio_median"] is None else f"{s['ratio_median']:.3f}"
        summary.add_row(name, _fmt(s["a_median"]), _fmt(s["b_median"]), ratio, wins)
    console.print(summary)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench ab", description=__doc__.split("\n")[0],
        usage="python -m bench ab [options] -- SCENARIO [SCENARIO OPTIONS] [-- NODE FLAGS]",
    )  # fmt: skip
    p.add_argument("--a", default=".", help="A's tree: '.', a directory or a git revision")
    p.add_argument("--b", default=".", help="B's tree (default: this checkout)")
    p.add_argument("--a-args", default="", help="flags for A's nodes (one shell-quoted string)")
    p.add_argument("--b-args", default="", help="flags for B's nodes")
    p.add_argument("--before-a", default=None, help="a shell command before each A run")
    p.add_argument("--before-b", default=None, help="a shell command before each B run")
    p.add_argument("--pairs", type=int, default=3, help="(default: 3)")
    p.add_argument(
        "--order",
        choices=("alternate", "ab"),
        default="alternate",
        help="alternate: AB, BA, AB, ... (default); ab: A first in every pair",
    )
    p.add_argument("--out", default=None, help="where the runs' reports go (default: a new "
                   "directory under the system's temporary one)")  # fmt: skip
    p.add_argument(
        "--work",
        default=None,
        help="where revisions are exported and compiled (default: under --out)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the A/B report here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    bench_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    try:
        if not bench_args or bench_args[0].startswith("-"):
            raise UsageError("no scenario: put it after --, e.g. -- append --nodes 3")
        if bench_args[0] == "ab":
            raise UsageError("ab cannot compare ab runs")
        if args.pairs < 1:
            raise UsageError("--pairs must be at least 1")
        out = Path(args.out or tempfile.mkdtemp(prefix="ctxstore-ab-")).resolve()
        out.mkdir(parents=True, exist_ok=True)
        work = Path(args.work).resolve() if args.work else out / "trees"
        sides = {
            "a": Side("a", args.a, shlex.split(args.a_args), args.before_a),
            "b": Side("b", args.b, shlex.split(args.b_args), args.before_b),
        }
        for side in sides.values():
            resolve(side, work, args.quiet)
    except UsageError as e:
        log(f"python -m bench ab: {e}")
        return 2
    pairs: list[dict[str, Any]] = []
    failed = 0
    for i in range(1, args.pairs + 1):
        order = ("a", "b") if args.order == "ab" or i % 2 == 1 else ("b", "a")
        pair: dict[str, Any] = {"pair": i, "order": "".join(order)}
        for name in order:
            side = sides[name]
            log(f"ab: pair {i}/{args.pairs}, {name.upper()} ({side.spec})", args.quiet)
            record = run_once(side, bench_args, out, f"{name}{i}")
            pair[name] = record
            if "figures" in record:
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in record["figures"].items())
                log(f"ab:   {shown}", args.quiet)
            else:
                failed += 1
                log(f"ab:   {record['error']}")
        pairs.append(pair)
    described = {
        name: {"spec": s.spec, "tree": str(s.tree), "commit": s.commit,
               "node_args": s.node_args, "before": s.before}
        for name, s in sides.items()
    }  # fmt: skip
    doc: dict[str, Any] = {
        "bench_args": bench_args,
        "order": args.order,
        "out": str(out),
        **described,
        "pairs": pairs,
        "failed_runs": failed,
        "summary": summarize(pairs),
    }
    write_json(str(out / "ab.json"), doc)
    if args.json:
        write_json(args.json, doc)
    print_report(doc)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
