"""Argument handling and the gate (exit status 1 when a figure misses its target)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cli import main, parse
from bench.scenarios import gate


def test_defaults_and_node_flags() -> None:
    args = parse(["append", "--nodes", "3", "--", "--groups", "16", "--tick-ms", "20"])
    assert (args.concurrency, args.rate, args.sessions, args.payload_bytes) == (64, None, 1000, 200)
    assert args.verify and args.route == "leader" and args.p99_target_ms == 150
    assert args.node_args == ["--groups", "16", "--tick-ms", "20"]
    args = parse(["append", "--target", "h:1", "--rate", "5000"])
    assert args.concurrency is None and args.rate == 5000 and not args.verify
    assert args.ops_ports == {}
    args = parse(["append", "--target", "h:1", "--ops", "1=h:7600, 2=10.0.0.2:7601"])
    assert args.ops_ports == {1: "h:7600", 2: "10.0.0.2:7601"}
    assert args.via == "native"
    assert parse(["append", "--nodes", "3", "--via", "ws-json"]).via == "ws-json"


@pytest.mark.parametrize(
    "argv",
    [
        ["append"],  # neither --target nor --nodes
        ["append", "--nodes", "3", "--target", "h:1"],
        ["append", "--nodes", "1", "--rate", "10", "--concurrency", "2"],
        ["append", "--target", "h:1", "--", "--groups", "4"],
        ["failover", "--nodes", "1"],
        ["mixed", "--nodes", "1", "--read-ratio", "2"],
        ["replay", "--nodes", "1", "--page", "5000"],
        ["append", "--nodes", "1", "--duration", "0"],
        ["append", "--nodes", "1", "--ops", "1=h:7600"],  # local nodes' ops ports are known
        ["append", "--target", "h:1", "--ops", "h:7600"],  # no node id
        ["append", "--target", "h:1", "--ops", "1=h"],  # no port
        ["append", "--target", "h:1", "--ops", "x=h:7600"],
        ["append", "--nodes", "1", "--via", "grpc"],
        ["append", "--target", "h:1", "--via", "ws"],  # the HTTP ports: --ops
        ["append", "--target", "h:1", "--join-at", "0.5"],  # joins a local cluster only
        ["append", "--nodes", "3", "--join-at", "1.5"],
        ["failover", "--nodes", "3", "--join-at", "0.5"],
        ["append", "--target", "h:1", "--profile", "p"],  # samples local nodes only
        ["failover", "--nodes", "3", "--profile", "p"],  # a node dies mid-window
        ["append", "--nodes", "1", "--profile", "p", "--profile-rate", "0"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2


def summary(p99: float, count: int = 100) -> dict[str, float]:
    return {"count": count, "mean": p99 / 2, "p50": p99 / 2, "p90": p99, "p99": p99, "max": p99}


def figures(p99: float, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "appends": {"latency_ms": summary(p99)},
        "failed": {},
        "unfinished": 0,
        "verify": {"ok": True},
    }
    return {**base, **extra}


def test_gate_on_p99_failures_and_read_back() -> None:
    args = parse(["append", "--nodes", "1", "--p99-target-ms", "100"])
    assert gate(args, "append", figures(99.0))["passed"]
    assert not gate(args, "append", figures(101.0))["passed"]
    assert not gate(args, "append", figures(10.0, failed={"overload": 1}))["passed"]
    assert not gate(args, "append", figures(10.0, unfinished=2))["passed"]
    assert not gate(args, "append", figures(10.0, verify={"ok": False}))["passed"]
    assert not gate(args, "append", figures(10.0, appends={"latency_ms": summary(0, 0)}))["passed"]
    mixed = parse(["mixed", "--nodes", "1", "--p99-target-ms", "100"])
    reads = {"latency_ms": summary(200.0)}
    assert not gate(mixed, "mixed", figures(10.0, reads=reads))["passed"]


def test_failover_gate_ignores_the_outage_but_not_its_length() -> None:
    args = parse(["failover", "--nodes", "3", "--unavailability-target-s", "3"])
    fo = {"p99_before": summary(20), "p99_during": summary(2500), "p99_after": summary(30)}
    assert gate(args, "failover", figures(2500, failover={**fo, "unavailable_s": 2.5}))["passed"]
    result = gate(args, "failover", figures(2500, failover={**fo, "unavailable_s": 3.5}))
    assert not result["passed"] and "unavailability" in result["failures"][0]
    slow_after = {**fo, "p99_after": summary(400), "unavailable_s": 1.0}
    assert not gate(args, "failover", figures(10, failover=slow_after))["passed"]


@pytest.mark.parametrize("scenario", ["append", "agents", "idle"])
def test_every_scenario_prints_its_help(scenario: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([scenario, "--help"])
    assert e.value.code == 0
    assert "--duration" in capsys.readouterr().out
