"""One short run of each scenario against a real local cluster, through the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.histogram import LatencyHistogram

pytestmark = pytest.mark.cluster

NODE_FLAGS = ["--", "--groups", "16", "--tick-ms", "20"]
SHORT = ["--duration", "2", "--warmup", "0.5", "--sessions", "50", "--p99-target-ms", "5000"]


def bench(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    where = ["--data-parent", str(tmp_path), "--json", str(out)]
    cmd = [sys.executable, "-m", "bench.cli", *argv, *SHORT, *where, *NODE_FLAGS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gate" in done.stdout and "PASS" in done.stdout
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["gate"]["passed"] and doc["verify"]["ok"]
    assert doc["verify"]["acked"] >= doc["appends"]["count"] > 0
    assert not doc["failed"] and doc["unfinished"] == 0
    lat = doc["appends"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert LatencyHistogram.decode(doc["appends"]["histogram"]).count == doc["appends"]["count"]
    assert doc["appends"]["per_s"] == pytest.approx(doc["appends"]["count"] / doc["window_s"], 0.01)
    assert doc["command"].startswith("ctxstore-bench " + argv[0])
    assert f"ctxstore-bench {argv[0]} via {doc['via']}:" in done.stdout
    assert doc["machine"]["nproc"] and "git_commit" in doc
    assert all(v is not None for v in doc["cpu"]["pct_of_core"].values())
    assert not list(tmp_path.glob("ctxstore-bench-*")), "the cluster's data was not removed"
    # The local nodes share this machine: the inline WAL writer, then the flags after --.
    assert doc["cluster"]["node_args"] == ["--wal-writer", "inline", *NODE_FLAGS[1:]]
    assert "local nodes (--wal-writer inline --groups 16" in done.stdout
    # Second by second: the steps' counts add up to the window's appends.
    tl = doc["timeline"]
    assert tl["step_s"] == 1.0 and tl["steps"] == len(tl["appends"]) == 2
    assert sum(step["count"] for step in tl["appends"]) == doc["appends"]["count"]
    assert tl["worst"]["p99"] == max(step["p99"] for step in tl["appends"])
    assert tl["over_target"] == [] and "timeline" in done.stdout
    assert sum(doc["cluster"]["groups_led"].values()) == 16
    # The nodes' own pauses in the window, from their ops ports (a restarted node: since then).
    pauses = doc["node_pauses"]
    assert pauses and set(pauses) <= {f"node{i}" for i in range(1, 8)}
    assert all(
        set(p["gc"]) == {"0", "1", "2"} and p["pass_max_ms_since_start"] > 0
        for p in pauses.values()
    )
    assert "node pauses" in done.stdout
    return doc


def test_append_closed_loop(tmp_path: Path) -> None:
    doc = bench(tmp_path, "append", "--nodes", "1", "--concurrency", "8")
    assert doc["cpu"]["pct_of_core"]["node1"] > 0
    assert list(doc["node_pauses"]) == ["node1"] and not doc["node_pauses"]["node1"]["restarted"]


def test_mixed_open_loop(tmp_path: Path) -> None:
    doc = bench(tmp_path, "mixed", "--nodes", "1", "--rate", "300", "--route", "any")
    assert 200 < doc["appends"]["per_s"] + doc["reads"]["per_s"] < 400
    assert doc["reads"]["count"] > 0 and doc["client"]["send_lag_ms"]["count"] > 0


def test_replay_reads_the_backlog(tmp_path: Path) -> None:
    doc = bench(tmp_path, "replay", "--nodes", "1", "--backlog", "1500", "--page", "500")
    assert doc["replay"]["count"] > 0
    assert doc["replay"]["page_latency_ms"]["count"] >= 3 * doc["replay"]["count"]
    assert doc["verify"]["sessions"] == 51  # with the backlog session


@pytest.mark.parametrize(
    "load", [["--concurrency", "16"], ["--rate", "300"]], ids=["closed", "open"]
)
def test_failover_kills_and_restarts_a_leader(tmp_path: Path, load: list[str]) -> None:
    """Open loop: appends go out without a task each (``Worker.append_nowait``); those the
    kill fails are retried in a task, and every ack is read back."""
    doc = bench(tmp_path, "failover", "--nodes", "3", *load, "--unavailability-target-s", "20")
    fo = doc["failover"]
    assert fo["victim"] in (1, 2, 3) and fo["groups_led"] > 0
    assert 0 < fo["all_led_again_s"] < 20 and 0 < fo["unavailable_s"] < 20
    assert fo["p99_before"]["count"] > 0 and fo["p99_after"]["count"] > 0
    assert doc["verify"]["read_from_node"] == fo["victim"]
    assert doc["cpu"]["gone"] == [f"node{fo['victim']}"]  # killed in the window


@pytest.mark.parametrize(
    ("via", "load"),
    [
        ("ws", ["append", "--concurrency", "16"]),
        ("ws-json", ["append", "--rate", "300"]),  # the open loop's append_nowait
        ("http", ["mixed", "--concurrency", "8"]),
        ("wt", ["mixed", "--concurrency", "16"]),  # WebTransport: HTTP/3 on the same number
    ],
)
def test_through_the_http_port(tmp_path: Path, via: str, load: list[str]) -> None:
    """The same load through a WebSocket or the HTTP/JSON API of each node (docs/web.md):
    every append acked and read back, the transport named in the JSON and the report."""
    doc = bench(tmp_path, load[0], "--nodes", "1", "--via", via, *load[1:])
    assert doc["via"] == doc["config"]["via"] == via
    assert not doc["errors"] and doc["retries"] == 0
    if load[0] == "mixed":
        assert doc["reads"]["count"] > 0


def test_archive_benchmark_runs() -> None:
    from bench.__main__ import main

    assert main(["archive", "--rows", "2000", "--sessions", "10", "--json"]) == 0


def test_apply_benchmark_runs(capfd: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    assert main(["apply", "--appends", "300", "--repeat", "1", "--json"]) == 0
    figures = json.loads(capfd.readouterr().out)
    assert figures["plain_cpu_us_per_append"] > 0
    assert figures["structured_window_cpu_us_per_append"] > 0


def test_wal_records_benchmark_runs(capfd: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    assert main(["wal-records", "--rounds", "200", "--repeat", "1", "--json"]) == 0
    figures = json.loads(capfd.readouterr().out)
    assert figures["us_per_group_round"] > 0 and figures["entries"] == 1


def test_the_raft_benchmark_runs_and_cleans_up(tmp_path: Path) -> None:
    """``python -m bench.raft_node``: the bare Raft's cluster (bench/raft_cluster.py, shared
    with tests/cluster), its client processes and its report, through the command line."""
    out = tmp_path / "raft.json"
    cmd = [
        sys.executable, "-m", "bench.raft_node", "throughput", "--duration", "1",
        "--warmup", "0.3", "--groups", "4", "--tick-ms", "20", "--concurrency", "4",
        "--procs", "2", "--data-parent", str(tmp_path), "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    result = doc["result"]
    assert result["scenario"] == "throughput" and result["acks"] > 0
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert set(result["nodes"]) == {"n1", "n2", "n3"}
    assert sum(n["leads"] for n in result["nodes"].values()) == 4
    assert {"n1", "n2", "n3", "c1", "c2", "bench"} <= set(result["cpu"]["pct_of_core"])
    assert doc["command"].endswith("bench.raft_node throughput " + " ".join(cmd[4:]))
    assert "acks/s" in done.stdout and "fsyncs/s" in done.stdout
    assert not list(tmp_path.glob("raft-bench-*")), "the cluster's data was not removed"
