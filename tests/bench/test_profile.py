"""``ctxstore-bench --profile`` and ``python -m bench profile-diff`` (bench/profile.py): py-spy's
collapsed stacks summed per function, per 1 000 appends; and one real profiled run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile import Stacks, diff, load, main, parse_stack, summary
from bench.raft_profile import profile_report

# Three samples of one stack, one of another, a torn line and a --threads prefix.
RAW = """main (a.py:1);loop (a.py:2);append (b.py:3) 3
main (a.py:1);loop (a.py:2);fsync (c.py:4) 1
main (a.py:1);lo
thread (0x7f): MainThread;main (a.py:1);loop (a.py:2);append (b.py:3) 2
"""


def stacks(text: str) -> Stacks:
    s = Stacks()
    for line in text.splitlines(keepends=True):
        s.add_line(line)
    return s


def test_samples_are_summed_per_function_self_and_inclusive() -> None:
    s = stacks(RAW)
    assert s.samples == 6  # the torn line is skipped, the thread prefix is not a function
    assert s.self_ == {"append (b.py:3)": 5, "fsync (c.py:4)": 1}
    assert s.incl["main (a.py:1)"] == s.incl["loop (a.py:2)"] == 6
    assert s.incl["append (b.py:3)"] == 5 and "thread (0x7f): MainThread" not in s.incl
    doc = summary(s, appends=3000, rate=100, nodes=["node1"])
    assert doc["samples_per_1000_appends"] == 2.0 and doc["ms_per_append"] == 0.02
    assert doc["self_per_1000_appends"] == {"append (b.py:3)": 1.667, "fsync (c.py:4)": 0.333}
    assert summary(s, appends=0, rate=100, nodes=[])["samples_per_1000_appends"] == 0.0
    # The thread's name stays known to who asks (bench/raft_profile.py's report per thread).
    frames = ["main (a.py:1)", "loop (a.py:2)", "append (b.py:3)"]
    assert parse_stack(RAW.splitlines()[3]) == ("MainThread", frames, 2)
    assert parse_stack(RAW.splitlines()[0]) == (None, frames, 3)
    assert parse_stack(RAW.splitlines()[2]) is None


def test_the_raft_benchmark_s_report_is_per_thread(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(RAW + "thread (0x8): wal;write (w.py:1) 4\n")
    report = profile_report(str(raw), top=5, instants=10)
    assert "thread wal: 4 samples (40 % of the instants)" in report
    assert "thread MainThread: 2 samples" in report and "thread ?: 4 samples" in report
    assert "100.00 %  write (w.py:1)" in report


def test_the_diff_ranks_what_grew_per_append_and_leaves_out_the_roots(tmp_path: Path) -> None:
    a = summary(stacks(RAW), 3000, 100, ["node1"])
    more = RAW + "main (a.py:1);loop (a.py:2);count (t.py:9) 4\n"  # B: +4 samples in count
    b = summary(stacks(more), 3000, 100, ["node1"])
    text = diff(a, b, top=10)
    lines = text.splitlines()
    grown = lines[lines.index(next(x for x in lines if x.startswith("--- inclusive: B - A"))) + 1]
    assert grown.split() == ["+1.33", "0.00", "1.33", "count", "(t.py:9)"]
    assert "frames under which more than half" in text  # main and loop: in every sample
    assert not any(x.endswith("loop (a.py:2)") for x in lines if x.startswith(" "))
    # Files: a profile.json, or the directory that holds it; anything else is refused.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "profile.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert load(str(tmp_path / "a")) == a
    assert main([str(tmp_path / "a"), str(tmp_path / "b.json"), "--top", "3"]) == 0
    (tmp_path / "c.json").write_text(json.dumps({"format": 0}))
    assert main([str(tmp_path / "a"), str(tmp_path / "c.json")]) == 2
    assert main([str(tmp_path / "a"), str(tmp_path / "missing.json")]) == 2


@pytest.mark.cluster
def test_a_profiled_run_writes_each_node_s_stacks_and_the_shares(tmp_path: Path) -> None:
    out, prof = tmp_path / "result.json", tmp_path / "prof"
    cmd = [sys.executable, "-m", "bench.cli", "append", "--nodes", "1", "--concurrency", "16",
           "--duration", "3", "--warmup", "0.5", "--sessions", "50", "--p99-target-ms", "5000",
           "--data-parent", str(tmp_path), "--json", str(out), "--profile", str(prof),
           "--profile-rate", "200", "--", "--groups", "16", "--tick-ms", "20"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    p = doc["profile"]
    assert p["nodes"] == ["node1"] and p["errors"] == [] and p["rate_hz"] == 200
    assert (prof / "node1.txt").stat().st_size > 0
    shares = load(str(prof))
    assert shares["appends"] == doc["appends"]["count"] > 0
    # A busy node over 3 s at 200 Hz: hundreds of samples, under its loop's frames.
    assert shares["samples"] == p["samples"] > 100
    assert any("Service.on_request" in fn for fn in shares["incl_per_1000_appends"])
    assert any("py-spy sampled the nodes" in w for w in doc["warnings"])
    assert re.search(r"^profile\s+\S*profile", done.stdout, re.M), done.stdout  # the report's row
