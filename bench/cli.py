"""``ctxstore-bench``: load, latency and a pass/fail gate for a ctxstore cluster.

    ctxstore-bench append --nodes 3 --concurrency 256 --duration 20
    ctxstore-bench append --target 10.0.0.1:7400,10.0.0.2:7400 --rate 5000 --duration 60
    ctxstore-bench mixed --nodes 3 --read-ratio 0.5
    ctxstore-bench replay --nodes 3 --backlog 10000 --page 1000 --readers 2
    ctxstore-bench failover --nodes 3 --concurrency 64 --duration 20
    ctxstore-bench append --nodes 3 --concurrency 256 --parts 3 --context-policy token_budget
    ctxstore-bench context --nodes 3 --concurrency 256 --context-tokens 100000 --context-rate 20
    ctxstore-bench append --nodes 3 --concurrency 256 --via ws    (or ws-json, http: web API;
                                                                   wt: WebTransport, HTTP/3)
    ctxstore-bench append --nodes 3 -- --groups 16 --tick-ms 20     (flags after -- go to nodes)
    ctxstore-bench agents --nodes 3 --conversations 200   (live agent chunks: bench/agents.py)
    ctxstore-bench idle --nodes 5 --duration 30   (an idle cluster's CPU per node: bench/idle.py)

Exit status: 0 when the gate passes, 1 when it does not (p99 over ``--p99-target-ms``, a request
that failed for good, a read-back problem, failover unavailability over its target), 2 for
usage errors and runs that could not be carried out (no cluster, a client process died).
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ctxstore.launcher import LocalCluster
from wire.client import ClientError

from .context import add_options, add_scenario_options, check_options
from .load import WorkerError
from .profile import RATE_DEFAULT, py_spy
from .report import log, print_report, write_json
from .scenarios import Target, discover, run_scenario
from .sysinfo import run_info, wait_quiet
from .webclients import VIAS

BACKGROUND_WARN_PCT = 10.0
SCENARIOS = {
    "append": "appends only: the hot path",
    "mixed": "appends and reads of the last messages of a session",
    "replay": "new readers replay a backlog session while writers append",
    "failover": "kill -9 the node leading the most groups mid-run (--nodes 3 or more)",
    "context": "get_context of full windows (--context-tokens) at a fixed rate while appending",
}


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value

    return parse


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    where = p.add_argument_group("cluster").add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="H:P[,H:P...] of an existing cluster")
    where.add_argument("--nodes", type=int, help="start a local cluster of N nodes (temporary)")
    c = p.add_argument_group("cluster options")
    c.add_argument("--token", default=None, help="client token, if the cluster wants one")
    c.add_argument(
        "--ops", default=None, metavar="ID=H:P[,...]",
        help="with --target: the nodes' ops ports, for their pauses (local nodes: known)",
    )  # fmt: skip
    c.add_argument("--data-parent", default=None, help="where the local cluster's data goes")
    c.add_argument("--keep-data", action="store_true", help="keep the local cluster's data")
    g = p.add_argument_group("load")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=_positive(int), help="closed loop (default 64)")
    mode.add_argument("--rate", type=_positive(float), help="open loop: requests per second")
    g.add_argument("--sessions", type=_positive(int), default=1000)
    g.add_argument("--payload-bytes", type=int, default=200)
    g.add_argument("--duration", type=_positive(float), default=10.0, help="measured seconds")
    g.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    g.add_argument("--procs", type=_positive(int), default=None, help="client processes")
    g.add_argument("--route", choices=("leader", "any"), default="leader")
    g.add_argument(
        "--via", choices=VIAS, default="native",
        help="the clients' transport: the native port (default), or each node's HTTP port: "
        "WebSocket /v1/ws (ws: msgpack, ws-json: JSON) or the HTTP/JSON API (http); "
        "with --target, --ops names the HTTP ports",
    )  # fmt: skip
    g.add_argument(
        "--max-outstanding", type=_positive(int), default=10_000,
        help="open loop: requests in flight at most (beyond: skipped as overload)",
    )  # fmt: skip
    g.add_argument("--retry-for-s", type=_positive(float), default=30.0)
    g.add_argument("--timeout-s", type=_positive(float), default=10.0, help="per request")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument(
        "--join-at", type=float, default=None, metavar="F",
        help="with --nodes: a new node joins at this fraction of the window (bench/join.py)",
    )  # fmt: skip
    g.add_argument("--run-id", default=None, help="prefix of session and message ids")
    add_options(p)
    o = p.add_argument_group("output and gate")
    o.add_argument("--json", default=None, metavar="FILE")
    o.add_argument("--p99-target-ms", type=_positive(float), default=150.0)
    o.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None,
        help="read every session back at the end (default: on with --nodes)",
    )  # fmt: skip
    o.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    o.add_argument(
        "--profile", default=None, metavar="DIR",
        help="sample every local node with py-spy in the window; per-append shares in "
        "DIR/profile.json (bench/profile.py; the run's own figures are then perturbed)",
    )  # fmt: skip
    o.add_argument(
        "--profile-rate", type=_positive(int), default=RATE_DEFAULT, metavar="HZ",
        help=f"py-spy's samples per second per node (default {RATE_DEFAULT})",
    )  # fmt: skip
    o.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="S",
        help="wait up to S seconds for other processes to use < 10%% of a core",
    )  # fmt: skip
    return p


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="ctxstore-bench",
        description="Benchmark a ctxstore cluster; flags after -- go to local nodes.",
        epilog="Two more scenarios take options of their own: 'ctxstore-bench agents --help' "
        "(live agent chunks, bench/agents.py) and 'ctxstore-bench idle --help' (an idle "
        "cluster's CPU per node, bench/idle.py).",
    )
    sub = top.add_subparsers(dest="scenario", required=True)
    parents = [common_options()]
    sub.add_parser("append", parents=parents, help=SCENARIOS["append"])
    mixed = sub.add_parser("mixed", parents=parents, help=SCENARIOS["mixed"])
    mixed.add_argument("--read-ratio", type=float, default=0.5, help="share of reads")
    mixed.add_argument("--read-last", type=int, default=50, help="messages per read")
    replay = sub.add_parser("replay", parents=parents, help=SCENARIOS["replay"])
    replay.add_argument("--backlog", type=_positive(int), default=10_000)
    replay.add_argument("--page", type=int, default=1000)
    replay.add_argument("--readers", type=_positive(int), default=2)
    fo = sub.add_parser("failover", parents=parents, help=SCENARIOS["failover"])
    fo.add_argument("--kill-at", type=float, default=0.5, help="fraction of the window")
    fo.add_argument("--poll-ms", type=_positive(float), default=25.0)
    fo.add_argument("--unavailability-target-s", type=_positive(float), default=3.0)
    add_scenario_options(sub.add_parser("context", parents=parents, help=SCENARIOS["context"]))
    return top


def parse(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    node_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, node_args = argv[:cut], argv[cut + 1 :]
    p = parser()
    args = p.parse_args(argv)
    args.node_args = node_args
    if args.rate is None and args.concurrency is None:
        args.concurrency = 64
    if args.verify is None:
        args.verify = args.nodes is not None
    if args.nodes is not None and not 1 <= args.nodes <= 7:
        p.error("--nodes: 1 to 7")
    if node_args and args.nodes is None:
        p.error("flags after -- are for local nodes (--nodes)")
    args.ops_ports = {}
    if args.ops is not None:
        if args.nodes is not None:
            p.error("--ops is for --target clusters (local nodes' ops ports are known)")
        try:
            for item in filter(None, (x.strip() for x in args.ops.split(","))):
                node, _, address = item.partition("=")
                if not address.rpartition(":")[2].isdigit():
                    raise ValueError(item)
                args.ops_ports[int(node)] = address
        except ValueError:
            p.error("--ops: NODE_ID=HOST:PORT[,...], e.g. 1=10.0.0.1:7600,2=10.0.0.2:7600")
    if args.via != "native" and args.nodes is None and not args.ops_ports:
        p.error(f"--via {args.via} with --target: --ops names each node's HTTP port")
    if args.scenario == "failover" and (args.nodes or 0) < 3:
        p.error("failover kills a node of a local cluster: --nodes 3 (or more)")
    if args.scenario == "mixed" and not (0 <= args.read_ratio <= 1 and 1 <= args.read_last <= 1000):
        p.error("--read-ratio in [0, 1], --read-last in 1..1000")
    if args.scenario == "replay" and not 1 <= args.page <= 1000:
        p.error("--page: 1 to 1000")
    if args.scenario == "failover" and not 0 < args.kill_at < 1:
        p.error("--kill-at: a fraction of the window in (0, 1)")
    if args.join_at is not None and not (args.nodes and 0 < args.join_at < 1):
        p.error("--join-at: a fraction of the window in (0, 1), with --nodes")
    if args.join_at is not None and args.scenario == "failover":
        p.error("--join-at: not with failover")
    if args.profile is not None:
        if args.nodes is None:
            p.error("--profile samples local nodes: --nodes")
        if args.scenario == "failover":
            p.error("--profile: not with failover (a node is killed mid-window)")
        if py_spy() is None:
            p.error("--profile needs py-spy (pip install py-spy, or the dev extra)")
    check_options(args, p.error)
    return args


def config(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"json", "quiet", "token", "data_parent", "keep_data", "ops_ports"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


async def _main(args: argparse.Namespace, argv: Sequence[str], background: float) -> int:
    local: LocalCluster | None = None
    data_dir: str | None = None
    failed = False  # keep the data and logs of a run that broke (not of an interrupted one)
    try:
        if args.nodes is not None:
            data_dir = tempfile.mkdtemp(prefix="ctxstore-bench-", dir=args.data_parent)
            # --via wt: the nodes serve HTTP/3 on their HTTP ports' numbers (a new certificate)
            h3 = args.via == "wt"
            local = LocalCluster(args.nodes, data_dir, extra_args=args.node_args, h3=h3)
            log(f"starting {args.nodes} local nodes in {data_dir}", args.quiet)
            await local.start()
            targets = local.targets
        else:
            targets = [t.strip() for t in args.target.split(",") if t.strip()]
        target: Target = await discover(targets, args.token, local, args.ops_ports)
        log(f"{len(target.nodes)} nodes, {target.groups} groups; setting up", args.quiet)
        figures = await run_scenario(args, target, background)
    except Exception:
        failed = True
        raise
    finally:
        if local is not None:
            await local.stop()
        if data_dir is not None and not failed and not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
        elif data_dir is not None:
            log(f"data (and the nodes' logs) kept in {data_dir}")
    doc = {
        "scenario": args.scenario,
        "via": args.via,
        **run_info(argv, data_dir or args.data_parent or tempfile.gettempdir()),
        "config": config(args),
        "background_pct_of_core": round(background, 1),
        "cluster": {
            "local": local is not None,
            "nodes": {str(k): v for k, v in sorted(target.nodes.items())},
            "groups": target.groups,
            "groups_led": {  # by node, as the bench found them (0: no leader known)
                str(k): v for k, v in sorted(Counter(target.leaders).items())
            },
            "node_args": local.extra_args if local is not None else [],
        },
        **figures,
    }
    print_report(doc)
    if args.json:
        write_json(args.json, doc)
    return 0 if doc["gate"]["passed"] else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agents"]:  # its own options (bench/agents.py)
        from .agents import main as agents_main

        return agents_main(argv[1:])
    if argv[:1] == ["idle"]:  # an idle local cluster's CPU per node (bench/idle.py)
        from .idle import main as idle_main

        return idle_main(argv[1:])
    args = parse(argv)
    import uvloop

    signal.signal(signal.SIGTERM, _interrupt)  # the same clean-up as Ctrl-C
    background = wait_quiet(args.wait_quiet)
    if background > BACKGROUND_WARN_PCT:
        log(f"warning: other processes use {background:.0f} % of a core before the run")
    try:
        return uvloop.run(_main(args, argv, background))
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    except (ClientError, WorkerError, RuntimeError, TimeoutError, OSError) as e:
        log(f"ctxstore-bench: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
