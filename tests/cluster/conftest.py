"""Fixtures of the cluster tests: the ``cluster`` marker, clusters that are always killed at
teardown, node logs attached to the report of a failed test, measured figures in the summary."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Cluster

CLUSTERS = pytest.StashKey[list[Cluster]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: runs real bench.raft_testnode processes on loopback (tests/cluster)"
    )


ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterFactory]:
    """``make_cluster(**kw)`` builds a ``Cluster`` under ``tmp_path``; its processes are
    SIGKILLed at teardown whatever the test did."""
    made: list[Cluster] = []
    request.node.stash[CLUSTERS] = made

    def make(**kw: Any) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(made)}", **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.kill_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and CLUSTERS in item.stash:
        clusters: list[Cluster] = item.stash[CLUSTERS]
        for k, cluster in enumerate(clusters):
            report.sections.append((f"cluster {k} node logs ({report.when})", cluster.logs()))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = []
    for report in terminalreporter.stats.get("passed", []):
        figures = [(k, v) for k, v in report.user_properties if k.startswith("figure:")]
        if report.when == "call" and figures:
            name = report.nodeid.split("::")[-1]
            lines.append(f"{name}: " + ", ".join(f"{k[7:]}={v}" for k, v in figures))
    if lines:
        terminalreporter.section("raft cluster figures")
        for line in lines:
            terminalreporter.write_line(line)
