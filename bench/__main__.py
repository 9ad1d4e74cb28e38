"""``python -m bench ...``: the benchmarks.

python -m bench append --nodes 3 --concurrency 256   (= ctxstore-bench, docs/benchmarks.md)
python -m bench raft-node throughput --concurrency 256   (= python -m bench.raft_node ...)
python -m bench archive   (= python -m ctxstore.archive_bench: the local archive's cost per message)
python -m bench apply   (= python -m ctxstore.apply_bench: a replica's apply of an append)
python -m bench wal-records   (bench/wal_records.py: encoding a round's WAL records)
python -m bench pg-flush  (= python -m ctxstore.pg.bench: the Postgres write-behind's rows/s)
python -m bench tokens   (the tokenizer's cost per append)
python -m bench agents --conversations 200   (= ctxstore-bench agents, docs/agents.md)
python -m bench idle --nodes 5 --duration 30   (= ctxstore-bench idle: an idle cluster's CPU)
python -m bench profile-diff A B   (bench/profile.py: two ctxstore-bench --profile runs, per append)
python -m bench ab --a REV -- append ...   (bench/ab.py: two builds or setups, alternating)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence


def _raft_node(argv: Sequence[str]) -> int:
    from bench.raft_node import main

    return main(argv)


def _tokens(argv: Sequence[str]) -> int:
    from bench.tokens import main

    return main(argv)


def _archive(argv: Sequence[str]) -> int:
    # A benchmark of a component inside the node: bench runs it through its command, as it
    # runs the nodes (bench uses ctxstore's public client and commands, not its internals).
    return subprocess.run([sys.executable, "-m", "ctxstore.archive_bench", *argv]).returncode


def _apply(argv: Sequence[str]) -> int:
    return subprocess.run([sys.executable, "-m", "ctxstore.apply_bench", *argv]).returncode


def _wal_records(argv: Sequence[str]) -> int:
    from bench.wal_records import main

    return main(argv)


def _pg_flush(argv: Sequence[str]) -> int:
    return subprocess.run([sys.executable, "-m", "ctxstore.pg.bench", *argv]).returncode


def _agents(argv: Sequence[str]) -> int:
    from bench.agents import main

    return main(argv)


def _idle(argv: Sequence[str]) -> int:
    from bench.idle import main

    return main(argv)


def _ab(argv: Sequence[str]) -> int:
    from bench.ab import main

    return main(argv)


def _profile_diff(argv: Sequence[str]) -> int:
    from bench.profile import main

    return main(argv)


BENCHMARKS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "agents": (_agents, "live agent chunks at subscribers (= ctxstore-bench agents)"),
    "idle": (_idle, "an idle local cluster's CPU per node (= ctxstore-bench idle)"),
    "raft-node": (_raft_node, "raft/ on a local 3-node cluster (docs/raft-bench.md)"),
    "archive": (_archive, "the local SQLite archive: rows/s and CPU per message"),
    "apply": (_apply, "a replica's state machine: CPU per applied append, plain vs structured"),
    "wal-records": (_wal_records, "the WAL's record encoder: CPU per group and round"),
    "pg-flush": (_pg_flush, "the Postgres write-behind: rows/s copied (needs PostgreSQL)"),
    "tokens": (_tokens, "the tokenizer's CPU per message, as a node counts an append"),
    "profile-diff": (_profile_diff, "two ctxstore-bench --profile runs compared per append"),
    "ab": (_ab, "two builds or node configurations run alternating, pair by pair"),
}


SCENARIOS = ("append", "mixed", "replay", "failover", "context")


def main(argv: Sequence[str]) -> int:
    if argv and (argv[0] in SCENARIOS or argv[0] in ("-h", "--help")):
        from bench.cli import main as ctxstore_bench

        return ctxstore_bench(argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(
            "usage: python -m bench {append,mixed,replay,failover,context} ... (ctxstore-bench)\n"
            "       python -m bench BENCHMARK [ARGS...]\n\nbenchmarks:",
            file=sys.stderr,
        )
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:12s} {what}", file=sys.stderr)
        return 2
    run, _ = BENCHMARKS[argv[0]]
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
