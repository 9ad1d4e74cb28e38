"""``python -m bench wal-records``: what encoding one group's WAL records of one round costs
the node that writes them (docs/benchmarks.md).

Every round writes, for every group it carries, an ``ENTRIES`` record of the group's new entries
and usually a ``HARD_STATE`` record (raft/wal_records.py, the format; raft/wal_segments.py,
``append_record``, the encoder, compiled).  This encodes ``--rounds`` such pairs into one buffer
(cleared at 1 MiB, as a round's buffer is short) with ``--entries`` entries of
``--payload-bytes`` bytes each (330: an encoded ``Append`` of 200 characters), and prints the
median over ``--repeat`` runs of the process's CPU time per pair.  No file is written: the disk
is not measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from statistics import median

from raft.messages import Entry, HardState
from raft.wal_records import EntriesRecord
from raft.wal_segments import append_record


def per_pair(entries: int, payload_bytes: int, rounds: int) -> float:
    """CPU seconds to encode one group's ENTRIES and HARD_STATE records, over ``rounds``."""
    record = EntriesRecord([Entry(5, 1000 + i, data=bytes(payload_bytes)) for i in range(entries)])
    state = HardState(5, 1, 1000 + entries - 1)
    buf = bytearray()
    started = time.process_time()
    for _ in range(rounds):
        append_record(buf, 17, record)
        append_record(buf, 17, state)
        if len(buf) > 1 << 20:
            buf.clear()
    return (time.process_time() - started) / rounds


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench wal-records", description=__doc__)
    p.add_argument("--entries", type=int, default=1, help="entries in the ENTRIES record")
    p.add_argument("--payload-bytes", type=int, default=330)
    p.add_argument("--rounds", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the figure as one JSON object")
    args = p.parse_args(argv)
    if min(args.entries, args.rounds, args.repeat) < 1 or args.payload_bytes < 0:
        p.error("--entries, --rounds and --repeat positive, --payload-bytes not negative")
    us = (
        median(per_pair(args.entries, args.payload_bytes, args.rounds) for _ in range(args.repeat))
        * 1e6
    )
    if args.json:
        print(json.dumps({"us_per_group_round": us, "entries": args.entries,
                          "payload_bytes": args.payload_bytes}))  # fmt: skip
    else:
        print(
            f"WAL records of one group and round ({args.entries} x {args.payload_bytes} B "
            f"entries + a hard state), median of {args.repeat} x {args.rounds:,}: {us:.2f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
