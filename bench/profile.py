"""Where the nodes' time goes, per operation: ``ctxstore-bench ... --profile DIR`` samples every
local node with py-spy during the measured window, and ``python -m bench profile-diff A B``
compares two such profiles per acknowledged append (docs/benchmarks.md "Profiles per append").

``--profile DIR`` writes, per node, py-spy's collapsed stacks (``DIR/node<i>.txt``, lines of
``frame;frame;... count``: ``record --format raw``) and, once the run is over,
``DIR/profile.json``: the samples of all the nodes together, their rate, the appends
acknowledged in the window, and per function (py-spy's ``name (file:line)``) its *self* samples
(the sample's innermost frame) and its *inclusive* samples (present anywhere in the sample's
stack), each as samples per 1 000 appends.  A sample is one node thread seen busy at one
sampling instant: running, runnable, or in a blocking system call such as ``fdatasync``, so a
figure here is time, not CPU time; compiled code (mypyc, msgspec, uvloop) shows as the
interpreted frame that called it.  py-spy runs ``--nonblocking`` (it does not pause a node to
read its stack: less disturbance, an occasional torn stack).

Sampling costs the machine: py-spy takes about 5-10 % of a core per node at 100 Hz, which the
run's figures include (its processes count as "others").  A profiled run's throughput and
latency are not figures to report; its per-append shares are, against another profiled run.

``profile-diff A B`` (each a ``profile.json`` or the directory holding it) prints the functions
whose inclusive (and then self) samples per 1 000 appends grew the most from A to B, with both
values: what a change (B) adds to an append, or what a configuration costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1
TOP_DEFAULT = 40
KEEP_FUNCTIONS = 400  # per kind in profile.json: the rest is in the raw stacks
RATE_DEFAULT = 100
ROOT_SHARE = 0.5  # profile-diff leaves out inclusive frames over this share of both profiles


def py_spy() -> str | None:
    """py-spy beside this Python (a venv's ``bin``), else on the PATH."""
    near = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return near if os.access(near, os.X_OK) else shutil.which("py-spy")


def parse_stack(line: str) -> tuple[str | None, list[str], int] | None:
    """One line of py-spy's collapsed stacks: (its thread's name with ``--threads``, else None;
    its frames, outermost first; its samples), or None for a line that holds no sample."""
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None  # py-spy writes nothing else; a torn last line (a killed py-spy) is skipped
    frames = [fr.strip() for fr in stack.split(";") if fr.strip()]
    thread = None
    if frames and frames[0].startswith("process "):
        frames = frames[1:]  # (--subprocesses: not a function)
    if frames and frames[0].startswith("thread "):
        thread = frames.pop(0).split(": ", 1)[-1]  # (--threads: "thread (0x..): MainThread")
    return (thread, frames, int(count)) if frames else None


@dataclass
class Stacks:
    """Collapsed stacks summed: samples in all, and per function self and inclusive samples."""

    samples: int = 0
    self_: Counter[str] = field(default_factory=Counter)
    incl: Counter[str] = field(default_factory=Counter)

    def add_file(self, path: str) -> None:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                self.add_line(line)

    def add_line(self, line: str) -> None:
        parsed = parse_stack(line)
        if parsed is not None:
            self.add(parsed[1], parsed[2])

    def add(self, frames: list[str], n: int) -> None:
        self.samples += n
        self.self_[frames[-1]] += n
        for fr in set(frames):
            self.incl[fr] += n


def summary(stacks: Stacks, appends: int, rate: int, nodes: list[str]) -> dict[str, Any]:
    """``profile.json``'s content: per function, samples per 1 000 appends (self, inclusive)."""
    per = 1000.0 / appends if appends > 0 else 0.0

    def table(counts: Counter[str]) -> dict[str, float]:
        return {fn: round(c * per, 3) for fn, c in counts.most_common(KEEP_FUNCTIONS)}

    return {
        "format": FORMAT,
        "nodes": nodes,
        "rate_hz": rate,
        "appends": appends,
        "samples": stacks.samples,
        "samples_per_1000_appends": round(stacks.samples * per, 3),
        "ms_per_append": round(stacks.samples * per / rate, 4) if rate else None,
        "self_per_1000_appends": table(stacks.self_),
        "incl_per_1000_appends": table(stacks.incl),
    }


class Profiler:
    """py-spy on each node for the measured window; ``finish`` writes ``profile.json``."""

    def __init__(self, out_dir: str, rate: int, exe: str) -> None:
        self.out_dir = out_dir
        self.rate = rate
        self.exe = exe
        self.files: dict[str, str] = {}
        self.errors: list[str] = []
        self._procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(self, pids: dict[str, int], seconds: float) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        for name, pid in sorted(pids.items()):
            out = os.path.join(self.out_dir, f"{name}.txt")
            cmd = [
                self.exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                "--rate", str(self.rate), "--format", "raw", "--nonblocking", "--output", out,
            ]  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            self._procs.append((name, proc))
            self.files[name] = out

    async def wait(self, timeout_s: float) -> None:
        """Wait for every py-spy (it stops by itself after its duration), at most ``timeout_s``."""
        for name, proc in self._procs:
            try:
                _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                self.errors.append(f"{name}: py-spy did not stop in time")
                continue
            if proc.returncode != 0:
                tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
                self.errors.append(f"{name}: py-spy exited {proc.returncode}: {tail[0][:300]}")

    def kill(self) -> None:
        for _, proc in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def finish(self, appends: int) -> dict[str, Any]:
        """Sum what every node's py-spy wrote into ``profile.json``; the bench JSON's entry."""
        stacks = Stacks()
        read = []
        for name, path in sorted(self.files.items()):
            if os.path.exists(path):
                stacks.add_file(path)
                read.append(name)
        doc = summary(stacks, appends, self.rate, read)
        path = os.path.join(self.out_dir, "profile.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        return {
            "file": path,
            "nodes": read,
            "errors": self.errors,
            "rate_hz": self.rate,
            "samples": stacks.samples,
            "samples_per_1000_appends": doc["samples_per_1000_appends"],
        }


# -- profile-diff --------------------------------------------------------------------------------
def load(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, "profile.json")
    with open(path) as f:
        doc: dict[str, Any] = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a profile.json of format {FORMAT}")
    return doc


def diff(a: dict[str, Any], b: dict[str, Any], top: int) -> str:
    """The functions whose samples per 1 000 appends grew most from ``a`` to ``b`` (then fell
    most), inclusive and self, with both values."""
    lines = [
        f"samples per 1 000 appends: A {a['samples_per_1000_appends']} "
        f"({a['appends']} appends, {a['rate_hz']} Hz), B {b['samples_per_1000_appends']} "
        f"({b['appends']} appends, {b['rate_hz']} Hz)"
    ]
    if a["rate_hz"] != b["rate_hz"]:
        lines.append("warning: the two profiles were sampled at different rates")
    # The frames under which most samples are (``<module>``, the loop's ``run``...) say nothing.
    ia, ib = a["incl_per_1000_appends"], b["incl_per_1000_appends"]
    roots = {
        fn for fn in set(ia) & set(ib)
        if ia[fn] >= ROOT_SHARE * a["samples_per_1000_appends"]
        and ib[fn] >= ROOT_SHARE * b["samples_per_1000_appends"]
    }  # fmt: skip
    if roots:
        lines.append(f"inclusive: {len(roots)} frames under which more than half of both "
                     "profiles' samples are omitted (the main thread's outer frames)")  # fmt: skip
    for kind in ("incl", "self"):
        ta, tb = a[f"{kind}_per_1000_appends"], b[f"{kind}_per_1000_appends"]
        names = set(ta) | set(tb)
        if kind == "incl":
            names -= roots
        rows = sorted(
            ((tb.get(fn, 0.0) - ta.get(fn, 0.0), ta.get(fn, 0.0), tb.get(fn, 0.0), fn)
             for fn in names),
            key=lambda r: -r[0],
        )  # fmt: skip
        label = "inclusive" if kind == "incl" else "self"
        lines.append(f"--- {label}: B - A, A, B (samples per 1 000 appends), the most grown")
        lines += [f"{d:+9.2f} {x:9.2f} {y:9.2f}  {fn}" for d, x, y, fn in rows[:top] if d > 0]
        lines.append(f"--- {label}: the most shrunk")
        lines += [f"{d:+9.2f} {x:9.2f} {y:9.2f}  {fn}" for d, x, y, fn in rows[::-1][:top] if d < 0]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench profile-diff",
        description="Compare two ctxstore-bench --profile runs per acknowledged append.",
    )
    p.add_argument("a", help="profile.json (or its directory) of the baseline run")
    p.add_argument("b", help="profile.json (or its directory) of the other run")
    p.add_argument("--top", type=int, default=TOP_DEFAULT)
    args = p.parse_args(argv)
    try:
        print(diff(load(args.a), load(args.b), args.top))
    except (OSError, ValueError, KeyError) as e:
        print(f"profile-diff: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["Profiler", "Stacks", "diff", "load", "main", "parse_stack", "py_spy", "summary"]
