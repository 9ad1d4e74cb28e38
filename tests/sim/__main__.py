"""Replay or sweep simulation seeds.

    python -m tests.sim --seeds 1-200 --nodes 3 --groups 3 --ticks 2000
    python -m tests.sim --seeds 4711 --nodes 5 --groups 2 --ticks 2000 --verbose
    python -m tests.sim --seeds 1-10000 --jobs 2        # a soak, on every core
    python -m tests.sim --seeds 1-100 --wal             # every seed on the real WAL
    python -m tests.sim --seeds 1-100 --no-quiesce      # the bare core's timers, no quiescence
    python -m tests.sim --membership --seeds 1-1000 --nodes 5 --groups 3 --ticks 800 --jobs 2
                                                        # scale-out: joins, drains, removals

By default a seed runs on the real WAL when seed % 3 == 0 and without quiescence when
seed % 7 == 0; ``--wal``/``--no-wal`` and ``--quiesce``/``--no-quiesce`` force either for
every seed.  Prints one line per failing seed (with the command that replays it), progress on
stderr, and a summary ``N seeds, V violations``; exits 1 when V > 0.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from dataclasses import fields

from .cluster import Stats
from .runner import SimResult, run_seed

Job = tuple[int, int, int, int, bool | None, bool | None, bool]


def parse_seeds(text: str) -> range:
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def _run(job: Job) -> SimResult:
    seed, nodes, groups, ticks, wal, quiesce, membership = job
    return run_seed(seed, nodes, groups, ticks, wal=wal, quiesce=quiesce, membership=membership)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1-100", help="a seed or an inclusive range A-B")
    p.add_argument("--nodes", type=int, choices=(3, 4, 5, 6), default=3)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (0: one per core)")
    p.add_argument("--verbose", action="store_true", help="print each seed's schedule")
    p.add_argument(
        "--wal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the nodes' disk is the real WAL, torn by crashes (default: when seed %% 3 == 0)",
    )
    p.add_argument(
        "--quiesce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the hosts quiesce idle groups (default: unless seed %% 7 == 0)",
    )
    p.add_argument(
        "--membership",
        action="store_true",
        help="scale-out: 3 nodes start with every group, the others join; nodes are drained "
        "and removed while the reconciler moves groups (tests/sim/membership.py)",
    )
    args = p.parse_args(argv)
    if args.membership and args.nodes < 4:
        p.error("--membership needs --nodes 4 or more (3 start, the others join)")
    seeds = parse_seeds(args.seeds)
    jobs: list[Job] = [
        (s, args.nodes, args.groups, args.ticks, args.wal, args.quiesce, args.membership)
        for s in seeds
    ]
    workers = args.jobs or os.cpu_count() or 1
    violations = 0
    wal_seeds = 0
    quiesce_ticks_max = 0
    totals = Stats()
    started = time.monotonic()

    def report(i: int, res: SimResult) -> None:
        nonlocal violations, wal_seeds, quiesce_ticks_max
        wal_seeds += res.wal
        quiesce_ticks_max = max(quiesce_ticks_max, res.stats.quiesce_ticks)
        for f in fields(Stats):
            setattr(totals, f.name, getattr(totals, f.name) + getattr(res.stats, f.name))
        if res.violation is not None:
            violations += 1
            print(f"seed {res.seed}: VIOLATION {res.violation}", flush=True)
            print(f"  replay: {res.replay()}", flush=True)
        if i % 100 == 0 or i == len(jobs):
            rate = i / (time.monotonic() - started)
            print(
                f"... {i}/{len(jobs)} seeds, {violations} violations ({rate:.1f} seeds/s)",
                file=sys.stderr,
                flush=True,
            )

    if args.verbose:
        for i, job in enumerate(jobs, 1):
            seed, nodes, groups, ticks, wal, quiesce, membership = job
            res = run_seed(
                seed,
                nodes,
                groups,
                ticks,
                trace=print,
                wal=wal,
                quiesce=quiesce,
                membership=membership,
            )
            print(f"seed {seed} (wal {res.wal}, quiesce {res.quiesce}): {res.stats}")
            report(i, res)
    elif workers == 1:
        for i, job in enumerate(jobs, 1):
            report(i, _run(job))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, res in enumerate(pool.imap_unordered(_run, jobs, chunksize=4), 1):
                report(i, res)
    elapsed = time.monotonic() - started
    print(f"totals: {totals}; slowest quiescence: {quiesce_ticks_max} ticks", file=sys.stderr)
    print(f"{len(jobs)} seeds ({wal_seeds} on the WAL), {violations} violations, {elapsed:.0f} s")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
