"""``python -m bench ab``: figures from each report shape, the command each run gets, the
pair-by-pair summary, usage errors, a revision exported and built, and a real pair."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import ab


def append_report(per_s: float, p99: float, us: float, context_p99: float | None = None) -> dict:
    doc: dict[str, Any] = {
        "appends": {"per_s": per_s, "latency_ms": {"p50": p99 / 2, "p99": p99}},
        "cpu": {"us_per_op": {"nodes": us, "clients": 20.0}, "machine_busy_pct": 90.0,
                "others_pct_of_core": 2.5},
    }  # fmt: skip
    if context_p99 is not None:
        doc["context"] = {"latency_ms": {"p50": 1.0, "p99": context_p99}}
    return doc


def test_figures_are_read_from_each_report_shape() -> None:
    got = ab.figures(append_report(10_000, 40.0, 150.0, context_p99=45.0))
    assert got == {
        "appends/s": 10_000, "p50 ms": 20.0, "p99 ms": 40.0, "nodes µs/op": 150.0,
        "get_context p99 ms": 45.0, "machine busy %": 90.0, "others % of a core": 2.5,
    }  # fmt: skip
    agents = {
        "chunk_latency": {
            "p50_ms": 7.5, "p99_ms": 31.0, "replies": 5800,
            "cpu": {"pct_of_core": {"node1": 40.0, "node2": 45.0, "node3": None, "agent": 30.0},
                    "machine_busy_pct": 93.0},
        },
        "appends_with_agents": {"p99_ms": 60.0, "per_s": 4000},
        "appends_without_agents": {"p99_ms": 25.0, "per_s": 4500},
    }  # fmt: skip
    assert ab.figures(agents) == {
        "chunk p50 ms": 7.5, "chunk p99 ms": 31.0, "replies": 5800, "alone p99 ms": 25.0,
        "beside agents p99 ms": 60.0, "nodes % of a core": 85.0, "machine busy %": 93.0,
    }  # fmt: skip
    assert ab.figures({"gate": {"passed": True}}) == {}


def test_the_report_path_and_quiet_go_before_the_node_flags_which_gain_the_side_s() -> None:
    cmd = ab.command(["append", "--nodes", "3", "--", "--groups", "16"], "/o/a1.json", ["-x"])
    assert cmd[1:] == ["-m", "bench", "append", "--nodes", "3", "--json", "/o/a1.json",
                       "--quiet", "--", "--groups", "16", "-x"]  # fmt: skip
    assert ab.command(["agents"], "f", [])[3:] == ["agents", "--json", "f", "--quiet"]
    assert ab.command(["agents"], "f", ["--wal-writer", "thread"])[-3:] == [
        "--", "--wal-writer", "thread",
    ]  # fmt: skip


def test_the_summary_is_taken_pair_by_pair_over_the_pairs_both_sides_ran() -> None:
    def run(per_s: float, p99: float) -> dict[str, Any]:
        return {"figures": ab.figures(append_report(per_s, p99, 1e6 / per_s))}

    pairs = [
        {"pair": 1, "a": run(10_000, 40), "b": run(11_000, 38)},
        {"pair": 2, "a": run(8_000, 50), "b": run(7_600, 52)},
        {"pair": 3, "a": run(9_000, 44), "b": run(9_900, 40)},
        {"pair": 4, "a": run(9_000, 44), "b": {"error": "no report"}},  # left out
    ]
    s = ab.summarize(pairs)
    assert s["appends/s"]["pairs"] == 3 and s["appends/s"]["b_better_pairs"] == 2
    assert s["appends/s"]["a_median"] == 9_000 and s["appends/s"]["b_median"] == 9_900
    assert s["appends/s"]["ratio_median"] == pytest.approx(1.1)
    assert s["p99 ms"]["better"] == "lower" and s["p99 ms"]["b_better_pairs"] == 2
    assert s["machine busy %"]["b_better_pairs"] is None  # shown, not judged
    assert list(s)[:3] == ["appends/s", "p50 ms", "p99 ms"]


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--pairs", "1"], "no scenario"),
        (["--", "--nodes", "3"], "no scenario"),
        (["--pairs", "0", "--", "append", "--nodes", "1"], "at least 1"),
        (["--", "ab", "--", "append"], "cannot compare"),
        (["--a", "no-such-revision-xyz", "--", "append", "--nodes", "1"], "git rev-parse"),
    ],
)
def test_usage_errors_exit_2_and_say_why(
    argv: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ab.main(["--out", str(tmp_path), *argv]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.skipif(not (ab.REPO / ".git").exists(), reason="not a git checkout")
def test_a_revision_is_exported_and_built_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTXSTORE_PURE_PYTHON", "1")  # (builds nothing: the test stays short)
    side = ab.Side("a", "HEAD", [], None)
    ab.resolve(side, tmp_path, quiet=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.REPO, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert side.commit == head and side.tree == tmp_path / f"tree-{head[:12]}"
    assert (side.tree / "ctxstore" / "node.py").exists()
    assert (side.tree / ab.BUILT).read_text().strip() == head
    (side.tree / "ctxstore" / "marker").write_text("kept")
    again = ab.Side("b", head[:12], [], None)
    ab.resolve(again, tmp_path, quiet=True)  # the same tree, not exported again
    assert again.tree == side.tree and (side.tree / "ctxstore" / "marker").exists()


@pytest.mark.cluster
def test_a_real_pair_alternates_the_sides_with_their_flags(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "before-b"
    code = ab.main([
        "--pairs", "2", "--out", str(out), "--b-args", "--tick-ms 40",
        "--before-b", f"echo x >> {marker}", "--quiet", "--",
        "append", "--nodes", "1", "--concurrency", "4", "--duration", "1", "--warmup", "0.5",
        "--sessions", "20", "--p99-target-ms", "5000", "--data-parent", str(tmp_path),
        "--", "--groups", "16",
    ])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "ab.json").read_text())
    assert [p["order"] for p in doc["pairs"]] == ["ab", "ba"]
    for p in doc["pairs"]:
        assert p["a"]["figures"]["appends/s"] > 0 and p["b"]["figures"]["appends/s"] > 0
        assert p["a"]["command"].endswith("-- --groups 16")
        assert p["b"]["command"].endswith("-- --groups 16 --tick-ms 40")
        assert p["b"]["before_exit"] == 0 and "before_exit" not in p["a"]
    assert marker.read_text() == "x\nx\n"
    assert doc["summary"]["appends/s"]["pairs"] == 2 and doc["failed_runs"] == 0
    assert json.loads((out / "b2.json").read_text())["cluster"]["node_args"][-2:] == [
        "--tick-ms", "40",
    ]  # fmt: skip


def test_a_run_that_writes_no_report_is_counted_and_exits_2(tmp_path: Path) -> None:
    # ``append`` without --nodes or --target is a usage error of ctxstore-bench: no report.
    code = ab.main(["--pairs", "1", "--out", str(tmp_path), "--quiet", "--", "append"])
    assert code == 2
    doc = json.loads((tmp_path / "ab.json").read_text())
    assert doc["failed_runs"] == 2 and "no report" in doc["pairs"][0]["a"]["error"]
    assert doc["summary"] == {}
