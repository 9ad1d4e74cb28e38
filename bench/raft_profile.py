"""Profiling a node of the Raft benchmark with py-spy (``python -m bench.raft_node ...
--profile-node N``): the collapsed stacks, and a report of the top functions per thread."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

from .profile import Stacks, parse_stack, py_spy
from .report import log


async def run_profile(args: argparse.Namespace, pid: int, node_id: int, seconds: float) -> None:
    """py-spy node ``node_id`` (``pid``) for ``seconds``; print and write its report."""
    exe = py_spy()
    if exe is None:
        log("py-spy not found (pip install py-spy): no profile")
        return
    out = args.profile_out or os.path.join(os.getcwd(), f"raft-profile-n{node_id}.txt")
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        str(args.profile_rate),
        "--format",
        "raw",
        "--function",
        "--threads",
        "--output",
        out,
        *(["--native"] if args.profile_native else []),
        *(["--gil"] if args.profile_gil else []),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        log(f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
        return
    report = profile_report(out, args.profile_top, seconds * args.profile_rate)
    print(report)
    with open(out + ".top.txt", "w") as f:
        f.write(report + "\n")
    log(f"profile: {out} (collapsed stacks), {out}.top.txt")


def profile_report(path: str, top: int, instants: float) -> str:
    """Per thread: its samples, and its top functions by self and by inclusive samples (as % of
    the thread's samples), from py-spy's collapsed stacks (``--threads --function``)."""
    threads: dict[str, Stacks] = {}
    with open(path) as f:
        for line in f:
            parsed = parse_stack(line)
            if parsed is not None:
                thread, frames, count = parsed
                threads.setdefault(thread or "?", Stacks()).add(frames, count)
    lines = [
        f"profile: {instants:.0f} sampling instants; a thread is sampled when it is not idle"
        " (running, runnable or in a blocking system call such as fdatasync)"
    ]
    for name, tp in sorted(threads.items(), key=lambda kv: -kv[1].samples):
        n = max(tp.samples, 1)
        lines.append(
            f"thread {name}: {tp.samples} samples ({100.0 * tp.samples / max(instants, 1):.0f} %"
            " of the instants)"
        )
        k = top if tp.samples * 3 >= sum(t.samples for t in threads.values()) else 5
        lines.append(f"  top {k} by self samples (% of the thread's samples):")
        for fr, c in tp.self_.most_common(k):
            lines.append(f"    {100.0 * c / n:6.2f} %  {fr}")
        lines.append(f"  top {k} by inclusive samples (frames present in every sample omitted):")
        for fr, c in [(fr, c) for fr, c in tp.incl.most_common() if c < tp.samples][:k]:
            lines.append(f"    {100.0 * c / n:6.2f} %  {fr}")
    return "\n".join(lines)
