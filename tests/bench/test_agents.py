"""One short ``ctxstore-bench agents`` run against a real local cluster, through the command
line: live chunks are timed, replies come back, and the append comparison runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def test_a_short_agents_run_times_chunks_and_appends(tmp_path: Path) -> None:
    out = tmp_path / "agents.json"
    cmd = [sys.executable, "-m", "bench.cli", "agents", "--nodes", "3", "--conversations", "4",
           "--duration", "1.5", "--deltas", "5", "--delta-gap-ms", "5", "--slow-sessions", "10",
           "--slow-agent-s", "0.2", "--append-concurrency", "4", "--p99-target-ms", "5000",
           "--quiet", "--json", str(out), "--", "--groups", "16", "--tick-ms", "20"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    # the nodes' own default WAL writer (other local clusters run inline), then the flags
    assert doc["cluster"]["node_args"] == ["--wal-writer", "thread", "--groups", "16",
                                           "--tick-ms", "20"]  # fmt: skip
    chunks = doc["chunk_latency"]
    assert chunks["replies"] > 0 and chunks["count"] >= 5 * chunks["replies"]
    assert 0 < chunks["p50_ms"] <= chunks["p99_ms"] <= chunks["max_ms"]
    # The split by where each conversation subscribed: at its session's leader, or relayed.
    here, relayed = chunks["subscribed_at_leader"], chunks["relayed"]
    assert here["sessions"] + relayed["sessions"] == 4
    assert here["count"] + relayed["count"] == chunks["count"]
    assert chunks["groups_whose_leader_moved"] >= 0
    assert doc["appends_without_agents"]["count"] > 0
    assert doc["appends_with_agents"]["count"] > 0 and doc["appends_with_agents"]["agent_calls"] > 0
    # the echo agents run in a child process, whose counts come back at its end
    assert chunks["agent_calls"] >= chunks["replies"] and chunks["agent_connections"] > 0
    slow = doc["appends_with_agents"]
    assert 0 < slow["agent_connections"] <= slow["agent_calls"]
    assert 0 < slow["replies"] <= slow["agent_calls"]  # (the busy users' child process)
    assert doc["gate"]["passed"]


def test_appends_at_a_rate_beside_agents_spread(tmp_path: Path) -> None:
    """``--append-rate``: appends on a schedule (about rate x duration of them) in both
    phases; ``--busy-spread-s``: the slow sessions start spread, and their replies come."""
    out = tmp_path / "agents.json"
    cmd = [sys.executable, "-m", "bench.cli", "agents", "--nodes", "3", "--conversations", "2",
           "--duration", "1.5", "--deltas", "3", "--delta-gap-ms", "5", "--slow-sessions", "10",
           "--slow-agent-s", "0.2", "--busy-spread-s", "0.2", "--append-rate", "200",
           "--p99-target-ms", "5000", "--quiet", "--json", str(out),
           "--", "--groups", "16", "--tick-ms", "20"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    for phase in ("appends_without_agents", "appends_with_agents"):
        assert 200 <= doc[phase]["count"] <= 300, doc[phase]  # 200/s for 1.5 s
        assert doc[phase]["per_s"] == round(doc[phase]["count"] / 1.5)
    assert doc["appends_with_agents"]["replies"] > 0


def test_turns_on_a_schedule(tmp_path: Path) -> None:
    """``--turn-every-ms``: a turn every 300 ms per conversation, whatever the replies do: about
    duration / 0.3 of them each, and a reply slower than the period is counted late."""
    out = tmp_path / "agents.json"
    cmd = [sys.executable, "-m", "bench.cli", "agents", "--nodes", "3", "--conversations", "3",
           "--duration", "2", "--deltas", "3", "--delta-gap-ms", "5", "--turn-every-ms", "300",
           "--p99-target-ms", "5000", "--quiet", "--json", str(out),
           "--", "--groups", "16", "--tick-ms", "20"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    chunks = doc["chunk_latency"]
    assert doc["config"]["turn_every_ms"] == 300
    assert 3 * 5 <= chunks["replies"] <= 3 * 7, chunks  # 2 s / 0.3 s, the last may not end
    assert 0 <= chunks["turns_late"] < chunks["replies"]
