"""What a result is worth without: the machine, the commit, and CPU use from ``/proc``."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine over every core, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return 0.0, 0.0
    values = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


@dataclasses.dataclass
class CpuSample:
    t: float
    pids: dict[str, float | None]
    machine: tuple[float, float]


def sample_cpu(pids: dict[str, int]) -> CpuSample:
    return CpuSample(
        time.monotonic(), {k: cpu_seconds(p) for k, p in pids.items()}, machine_busy_seconds()
    )


def cpu_between(
    a: CpuSample, b: CpuSample, last_seen: dict[str, float] | None = None
) -> dict[str, Any]:
    """CPU over [a, b]: per process in % of one core; the machine's busy %; everything else.

    A process gone by ``b`` counts with its CPU seconds in ``last_seen`` (read just before it
    was killed), still averaged over the whole window; without one it is reported as None and
    its CPU lands in "other processes"."""
    span = b.t - a.t
    last_seen = last_seen or {}
    processes: dict[str, float | None] = {}
    ours = 0.0
    for key, before in a.pids.items():
        after = b.pids.get(key)
        if after is None:
            after = last_seen.get(key)
        if before is None or after is None or span <= 0:
            processes[key] = None
            continue
        processes[key] = round(100.0 * (after - before) / span, 1)
        ours += after - before
    busy = b.machine[0] - a.machine[0]
    total = b.machine[1] - a.machine[1]
    return {
        "seconds": round(span, 3),
        "pct_of_core": processes,
        "gone": sorted(k for k in a.pids if b.pids.get(k) is None),
        "machine_busy_pct": round(100.0 * busy / total, 1) if total > 0 else None,
        "machine_cores": os.cpu_count() or 1,
        "others_pct_of_core": round(100.0 * max(0.0, busy - ours) / span, 1) if span else None,
    }


def background_load(seconds: float = 1.0) -> float:
    """The machine's busy CPU over ``seconds`` (before a run), in % of one core."""
    a = machine_busy_seconds()
    time.sleep(seconds)
    b = machine_busy_seconds()
    return 100.0 * (b[0] - a[0]) / seconds


def wait_quiet(limit_s: float, busy_pct_max: float = 10.0) -> float:
    """Sample the background load each second until it is under ``busy_pct_max`` % of a
    core or ``limit_s`` passed; return the last sample."""
    deadline = time.monotonic() + limit_s
    busy = background_load()
    while busy > busy_pct_max and time.monotonic() < deadline:
        busy = background_load()
    return busy


def run_command(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def filesystem_of(path: str) -> str:
    path = os.path.realpath(path)
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} on {parts[0]}"
    return kind


def machine_info(data_parent: str | None) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "data_filesystem": filesystem_of(data_parent) if data_parent else None,
    }


def run_info(argv: Sequence[str], data_parent: str | None) -> dict[str, Any]:
    dirty = run_command(
        ["git", "-C", ROOT, "status", "--porcelain", "--", "raft", "wire", "ctxstore"]
    )
    return {
        "command": shlex.join(["ctxstore-bench", *argv]),
        "python": sys.executable,
        "git_commit": run_command(["git", "-C", ROOT, "rev-parse", "HEAD"]),
        "git_dirty": bool(dirty),
        "machine": machine_info(data_parent),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


__all__ = ["CpuSample", "cpu_between", "cpu_seconds", "run_info", "sample_cpu", "wait_quiet"]
