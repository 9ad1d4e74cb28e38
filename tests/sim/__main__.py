"""Replay or sweep simulation seeds.

    python -m tests.sim --seeds 1-200 --nodes 3 --groups 3 --ticks 2000
    python -m tests.sim --seeds 4711 --nodes 5 --groups 2 --ticks 2000 --verbose

Prints one line per failing seed and a summary ``N seeds, V violations``; exits 1 when V > 0.
"""

from __future__ import annotations

import argparse
import sys
import time

from .runner import run_seed


def parse_seeds(text: str) -> range:
    if "-" in text:
        lo, hi = text.split("-", 1)
        return range(int(lo), int(hi) + 1)
    return range(int(text), int(text) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1-100", help="a seed or an inclusive range A-B")
    p.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--verbose", action="store_true", help="print the schedule of each seed")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    violations = 0
    started = time.monotonic()
    for i, seed in enumerate(seeds, 1):
        trace = print if args.verbose else None
        res = run_seed(seed, args.nodes, args.groups, args.ticks, trace=trace)
        if res.violation is not None:
            violations += 1
            print(f"seed {seed}: VIOLATION {res.violation}", flush=True)
        if args.verbose:
            print(f"seed {seed}: {res.stats}")
        if i % 100 == 0 and not args.verbose:
            rate = i / (time.monotonic() - started)
            print(f"... {i}/{len(seeds)} seeds, {violations} violations ({rate:.1f} seeds/s)",
                  file=sys.stderr, flush=True)
    print(f"{len(seeds)} seeds, {violations} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
