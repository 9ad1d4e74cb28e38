"""Replay or sweep simulation seeds.

    python -m tests.sim --seeds 1-200 --nodes 3 --groups 3 --ticks 2000
    python -m tests.sim --seeds 4711 --nodes 5 --groups 2 --ticks 2000 --verbose
    python -m tests.sim --seeds 1-10000 --jobs 2        # a soak, on every core

Prints one line per failing seed (with the command that replays it), progress on stderr, and a
summary ``N seeds, V violations``; exits 1 when V > 0.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

from .runner import SimResult, run_seed


def parse_seeds(text: str) -> range:
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def _run(job: tuple[int, int, int, int]) -> SimResult:
    seed, nodes, groups, ticks = job
    return run_seed(seed, nodes, groups, ticks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1-100", help="a seed or an inclusive range A-B")
    p.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (0: one per core)")
    p.add_argument("--verbose", action="store_true", help="print each seed's schedule")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    jobs = [(s, args.nodes, args.groups, args.ticks) for s in seeds]
    workers = args.jobs or os.cpu_count() or 1
    violations = 0
    started = time.monotonic()

    def report(i: int, res: SimResult) -> None:
        nonlocal violations
        if res.violation is not None:
            violations += 1
            print(
                f"seed {res.seed}: VIOLATION {res.violation}\n  replay: python -m tests.sim "
                f"--seeds {res.seed} --nodes {res.nodes} --groups {res.groups} "
                f"--ticks {res.ticks} --verbose",
                flush=True,
            )
        if i % 100 == 0 or i == len(jobs):
            rate = i / (time.monotonic() - started)
            print(
                f"... {i}/{len(jobs)} seeds, {violations} violations ({rate:.1f} seeds/s)",
                file=sys.stderr,
                flush=True,
            )

    if args.verbose:
        for i, (seed, nodes, groups, ticks) in enumerate(jobs, 1):
            res = run_seed(seed, nodes, groups, ticks, trace=print)
            print(f"seed {seed}: {res.stats}")
            report(i, res)
    elif workers == 1:
        for i, job in enumerate(jobs, 1):
            report(i, _run(job))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, res in enumerate(pool.imap_unordered(_run, jobs, chunksize=4), 1):
                report(i, res)
    print(f"{len(jobs)} seeds, {violations} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
