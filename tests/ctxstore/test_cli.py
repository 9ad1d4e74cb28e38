"""The ``ctxstore`` command (cli.py, cli_client.py, cli_common.py) as a new user meets it:
help, one-line errors with exit statuses by class, JSON outputs and JSON logs (real processes,
a real node)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop

from ctxstore.cli import build_parser
from ctxstore.cli_common import (
    EXIT_ANSWER,
    EXIT_CONNECT,
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_START,
    EXIT_USAGE,
)
from ctxstore.config import FIELDS, HELP, Settings, unknown_env
from ctxstore.launcher import LocalCluster, free_ports
from ctxstore.logs import JsonFormatter

FAST = ["--tick-ms", "20", "--groups", "8"]
TIMEOUT_S = 60


def ctxstore(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctxstore", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
    )


def one_line_error(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The process failed with ``status`` and said why on stderr, with no traceback."""
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stderr


def json_error(done: subprocess.CompletedProcess[str], status: int) -> dict[str, object]:
    """The one JSON line on stderr of a client command or a node that failed."""
    lines = one_line_error(done, status).splitlines()
    assert len(lines) == 1, lines
    error = json.loads(lines[0])
    assert isinstance(error, dict)
    return error


# -- help ------------------------------------------------------------------------------------------
def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command, by its command line."""
    todo = [("ctxstore", build_parser())]
    while todo:
        name, parser = todo.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {n}", p) for n, p in action.choices.items()]


def test_every_option_has_help_with_its_default_and_no_markup() -> None:
    checked = 0
    for name, parser in parsers():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, where
            assert "``" not in action.help and "`" not in action.help, where
            if action.option_strings and not action.required:
                assert "default: " in action.help or "required" in action.help, where
            checked += 1
    assert checked > 50


def test_every_setting_has_a_help_that_states_its_default() -> None:
    assert set(HELP) == set(FIELDS)
    serve = dict(parsers())["ctxstore serve"]
    helps = {a.dest: a.help or "" for a in serve._actions}
    defaults = msgspec.structs.asdict(Settings())
    assert "(1 to 65535; default: 1; env CTXSTORE_NODE_ID)" in helps["node_id"]
    assert "default: 5;" in helps["request_timeout_s"]
    assert "thread or inline" in helps["wal_writer"] or "inline or thread" in helps["wal_writer"]
    for key in FIELDS:
        assert f"env CTXSTORE_{key.upper()}" in helps[key], key
        if isinstance(defaults[key], int) and not isinstance(defaults[key], bool):
            assert f"default: {defaults[key]}" in helps[key], key


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["serve", "--help"],
        ["cluster", "up", "--help"],
        ["client", "--help"],
        *(
            ["client", "--target", "h:1", sub, "--help"]
            for sub in (
                "create-session",
                "get-session",
                "list-sessions",
                "append",
                "read",
                "tail",
                "inbox",
                "mark-read",
                "ping",
            )
        ),
    ],
)
def test_help_as_printed_has_no_markup(command: list[str]) -> None:
    done = ctxstore(*command)
    assert done.returncode == 0, done.stderr
    assert "``" not in done.stdout and "usage: ctxstore" in done.stdout
    assert "--help" in done.stdout and "`" not in done.stdout


# -- argument errors (status 2) --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["client", "--target", "nowhere", "ping"], "--target"),
        (["client", "--target", "h:99999", "ping"], "--target"),
        (["client", "--target", "h:1", "--timeout", "-1", "ping"], "--timeout"),
        (["client", "--target", "h:1", "--timeout", "soon", "ping"], "--timeout"),
        (["client", "--target", "h:1", "--timeout", "nan", "ping"], "--timeout"),
        (["client", "--target", "h:1", "read", "s", "--limit", "0"], "--limit"),
        (["client", "--target", "h:1", "read", "s", "--limit", "-1"], "--limit"),
        (["client", "--target", "h:1", "read", "s", "--after-seq", "-5"], "--after-seq"),
        (
            [
                "client",
                "--target",
                "h:1",
                "create-session",
                "--user",
                "u",
                "--agent",
                "a",
                "--metadata",
                "{bad",
            ],
            "--metadata",
        ),
        (
            [
                "client",
                "--target",
                "h:1",
                "create-session",
                "--user",
                "u",
                "--agent",
                "a",
                "--metadata",
                "[1]",
            ],
            "--metadata",
        ),
        (["client", "--target", "h:1", "append", "s"], "--text"),
        (
            ["client", "--target", "h:1", "append", "s", "--text-file", "/nonexistent/f"],
            "--text-file",
        ),
        (["client", "--target", "h:1", "append", "s", "--parts", '{"type": "text"}'], "--parts"),
        (["client", "--target", "h:1", "configure-context", "s", "--budget", "0"], "--budget"),
        (
            [
                "client",
                "--target",
                "h:1",
                "configure-context",
                "s",
                "--budget",
                "9",
                "--ratio",
                "1.5",
            ],
            "--ratio",
        ),
        (
            [
                "client",
                "--target",
                "h:1",
                "configure-context",
                "s",
                "--budget",
                "9",
                "--policy",
                "last_n",
            ],
            "--limit",
        ),
        (
            [
                "client",
                "--target",
                "h:1",
                "compact",
                "s",
                "--from-seq",
                "1",
                "--to-seq",
                "2",
                "--replacement",
                '[{"content": "no role"}]',
            ],
            "--replacement",
        ),
        (["cluster", "up", "--nodes", "33"], "--nodes"),
        (["serve", "--tick-ms", "0"], "tick_ms"),
    ],
)
def test_a_bad_argument_is_one_line_naming_it_with_status_2(args: list[str], flag: str) -> None:
    err = one_line_error(ctxstore(*args), EXIT_USAGE)
    assert flag in err.splitlines()[-1], err


# -- a node: start-up failures (status 5), the client against it, its logs ------------------------
def serve_args(data_dir: Path, client: int, peer: int, *extra: str) -> list[str]:
    return ["serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{client}",
            "--peer-listen", f"127.0.0.1:{peer}", *FAST, *extra]  # fmt: skip


class RunningNode:
    def __init__(self, tmp: Path) -> None:
        self.client, self.peer = free_ports(2)
        self.target = f"127.0.0.1:{self.client}"
        self.data_dir = tmp / "node"
        self.log = tmp / "node.log"
        env = {**os.environ, "CTXSTORE_NO_SUCH_KEY": "1"}
        args = serve_args(self.data_dir, self.client, self.peer, "--log-level", "info")
        cmd = [sys.executable, "-m", "ctxstore", *args]
        self.stderr = open(self.log, "w")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if json.loads(line).get("event") == "ready":
                return
        raise AssertionError(f"the node exited: {self.log.read_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(TIMEOUT_S)
        finally:
            self.process.kill()  # if it did not stop in time
            self.stderr.close()

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return ctxstore("client", "--target", self.target, *args, stdin=stdin)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = RunningNode(tmp_path_factory.mktemp("cli"))
    try:
        yield running
    finally:
        running.stop()


def test_a_port_in_use_is_one_line_with_status_5(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (peer,) = free_ports(1)
        error = json_error(ctxstore(*serve_args(tmp_path / "d", port, peer)), EXIT_START)
    assert error["level"] == "ERROR"
    assert error["msg"] == f"cannot start: listen 127.0.0.1:{port}: address already in use " + (
        "(another process listens there)"
    )


def test_a_data_dir_locked_by_a_running_node_is_one_line_with_status_5(
    node: RunningNode,
) -> None:
    client, peer = free_ports(2)
    error = json_error(ctxstore(*serve_args(node.data_dir, client, peer)), EXIT_START)
    assert error["msg"] == f"cannot start: data_dir {node.data_dir}: locked by another " + (
        "process (a node running on it?)"
    )


def test_a_data_dir_that_cannot_be_created_is_one_line_with_status_5(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    client, peer = free_ports(2)
    error = json_error(ctxstore(*serve_args(tmp_path / "file" / "d", client, peer)), EXIT_START)
    assert str(error["msg"]).startswith(f"cannot start: data_dir {tmp_path}/file/d: Not a dir")


def test_a_port_that_does_not_speak_ctxstore_is_named_with_status_3() -> None:
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        http.listen()

        def answer() -> None:
            for _ in range(3):  # the client tries a target 3 times
                conn, _ = http.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        address = f"127.0.0.1:{http.getsockname()[1]}"
        error = json_error(ctxstore("client", "--target", address, "ping"), EXIT_CONNECT)
        server.join(TIMEOUT_S)
    assert f"{address} does not speak the ctxstore protocol (it answered b'HTTP/1.1" in str(
        error["message"]
    )


def test_nothing_listening_is_status_3() -> None:
    (port,) = free_ports(1)
    error = json_error(ctxstore("client", "--target", f"127.0.0.1:{port}", "ping"), EXIT_CONNECT)
    assert error["error"] == "unavailable"


def test_an_error_answered_by_the_server_is_status_4(node: RunningNode) -> None:
    error = json_error(node.cli("get-session", "nope"), EXIT_ANSWER)
    assert error["error"] == "not_found"


def test_non_ascii_text_is_printed_as_is_from_stdin_and_from_a_file(
    node: RunningNode, tmp_path: Path
) -> None:
    created = node.cli("create-session", "--user", "zoe", "--agent", "a", "--id", "utf",
                       "--metadata", '{"ville": "Besançon"}')  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert '"Besançon"' in created.stdout
    assert node.cli("append", "utf", "--text", "-", stdin="déjà vu ✓\n").returncode == 0
    (tmp_path / "m.txt").write_text("日本語\nline two", encoding="utf-8")
    assert node.cli("append", "utf", "--text-file", str(tmp_path / "m.txt")).returncode == 0
    read = node.cli("read", "utf")
    assert read.returncode == 0, read.stderr
    contents = [json.loads(line)["content"] for line in read.stdout.splitlines()]
    assert contents == ["déjà vu ✓\n", "日本語\nline two"]
    assert "日本語" in read.stdout and "\\u" not in read.stdout


def test_a_context_window_is_configured_printed_and_compacted(node: RunningNode) -> None:
    assert node.cli("create-session", "--user", "u", "--agent", "a", "--id", "ctx").returncode == 0
    for text in ("first question", "first answer", "second question"):
        assert node.cli("append", "ctx", "--text", text).returncode == 0
    parts = '[{"type": "reasoning", "text": "think"}, {"type": "text", "text": "reply"}]'
    appended = node.cli("append", "ctx", "--sender", "agent", "--parts", parts)
    assert appended.returncode == 0, appended.stderr
    configured = node.cli("configure-context", "ctx", "--budget", "1000", "--policy",
                          "skip_parts", "--skip", "reasoning")  # fmt: skip
    assert configured.returncode == 0, configured.stderr
    window = json.loads(configured.stdout)
    assert window["config"]["policy"] == {"type": "skip_parts", "types": ["reasoning"],
                                          "limit": None}  # fmt: skip
    assert window["messages"][-1]["parts"] == [{"type": "text", "text": "reply"}]
    assert window["messages"][-1]["role"] == "assistant"
    summary = '[{"role": "system", "content": "they asked twice"}]'
    stale = node.cli("compact", "ctx", "--from-seq", "1", "--to-seq", "3", "--replacement",
                     summary, "--if-version", str(window["version"] - 1))  # fmt: skip
    error = json_error(stale, EXIT_ANSWER)
    assert (error["error"], error["details"]) == ("conflict", {"version": window["version"]})
    compacted = node.cli("compact", "ctx", "--from-seq", "1", "--to-seq", "3", "--replacement",
                         summary, "--if-version", str(window["version"]))  # fmt: skip
    assert compacted.returncode == 0, compacted.stderr
    after = json.loads(node.cli("context", "ctx").stdout)
    assert [m["content"] for m in after["messages"]] == ["they asked twice", ""]
    assert after["segments"][0] == {"from_seq": 1, "to_seq": 3, "count": 1, "compacted": True}
    assert after["version"] == window["version"] + 1


def test_creating_an_existing_session_with_other_metadata_says_so(node: RunningNode) -> None:
    args = ["create-session", "--user", "u", "--agent", "a", "--id", "again"]
    first = node.cli(*args, "--metadata", '{"v": 1}')
    assert first.returncode == 0, first.stderr
    assert node.cli(*args, "--metadata", '{"v": 1}').stdout == first.stdout  # idempotent
    error = json_error(node.cli(*args, "--metadata", '{"v": 2}'), EXIT_ANSWER)
    assert error["error"] == "conflict"
    assert error["message"] == "session again exists with other metadata"
    assert error["details"] == {**json.loads(first.stdout)}


def test_every_line_nodes_log_is_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At start (warnings: an unknown CTXSTORE_* variable, the development secret), while they
    run (a peer connected) and at shutdown (a peer down), for both nodes of a cluster."""
    monkeypatch.setenv("CTXSTORE_NO_SUCH_KEY", "1")

    async def start_and_stop() -> None:
        cluster = LocalCluster(2, str(tmp_path), extra_args=[*FAST, "--log-level", "info"])
        try:
            await cluster.start()
        finally:
            assert await cluster.stop() == {1: 0, 2: 0}

    uvloop.run(asyncio.wait_for(start_and_stop(), TIMEOUT_S))
    for i in (1, 2):
        lines = (tmp_path / f"node{i}.log").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        assert all(set(r) >= {"t", "level", "logger", "msg"} for r in records)
        messages = [(r["level"], r["msg"]) for r in records]
        assert messages[:2] == [
            ("WARNING", "ignoring CTXSTORE_NO_SUCH_KEY: no setting has that name "
             "(ctxstore serve --help)"),
            ("WARNING", "using the development cluster secret"),
        ]  # fmt: skip
        assert any(m.startswith(f"node {i}: connected to node ") for _, m in messages)
        assert any(m == f"node {i}: node {3 - i} down" for _, m in messages)


def test_the_log_formatter_writes_any_message_and_traceback_as_one_json_line() -> None:
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "quote ' \" newline \n é %s", ("arg",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == "quote ' \" newline \n é arg"
    assert "ValueError: boom" in parsed["exc"]
    assert parsed["t"].endswith("Z")


def test_unknown_ctxstore_variables_are_found() -> None:
    env = {"CTXSTORE_TICK_MS": "20", "CTXSTORE_TICKMS": "20", "CTXSTORE_PURE_PYTHON": "1"}
    assert unknown_env({**env, "OTHER": "x"}) == ["CTXSTORE_TICKMS"]


# -- cluster up ------------------------------------------------------------------------------------
class ClusterUp:
    """``ctxstore cluster up`` in a session of its own: whatever happens, the test ends it and
    its nodes (its process group)."""

    def __init__(self, tmp_path: Path, *args: str, node_flags: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ctxstore", "cluster", "up", "--nodes", "1",
             "--data-dir", str(tmp_path), *args, "--", *FAST, *node_flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip

    def started(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        started: dict[str, Any] = json.loads(self.process.stdout.readline())
        return started

    def wait(self) -> tuple[str, str]:
        return self.process.communicate(timeout=TIMEOUT_S)

    def __enter__(self) -> ClusterUp:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate()


def test_cluster_up_says_where_the_logs_are_and_what_ctrl_c_stopped(tmp_path: Path) -> None:
    with ClusterUp(tmp_path, "--base-port", "0") as up:
        (node,) = up.started()["nodes"]
        assert node["log"] == str(tmp_path / "node1.log") and os.path.exists(node["log"])
        up.process.send_signal(signal.SIGINT)
        out, err = up.wait()
    assert up.process.returncode == 0, err
    assert json.loads(out) == {
        "event": "stopped",
        "data_dir": str(tmp_path),
        "nodes": [{"id": 1, "exit_code": 0}],
    }


def test_cluster_up_reports_a_node_that_died(tmp_path: Path) -> None:
    with ClusterUp(tmp_path, "--base-port", "0") as up:
        (node,) = up.started()["nodes"]
        os.kill(node["pid"], signal.SIGKILL)
        out, err = up.wait()
    assert up.process.returncode == EXIT_FATAL  # its only node died
    exited = json.loads(err)
    assert (exited["event"], exited["node"], exited["exit_code"], exited["signal"]) == (
        "node_exited", 1, -9, "SIGKILL",
    )  # fmt: skip
    assert exited["log"] == node["log"] and isinstance(exited["log_tail"], list)
    assert json.loads(out)["nodes"] == [{"id": 1, "exit_code": -9}]


def test_cluster_up_reports_a_node_that_cannot_start(tmp_path: Path) -> None:
    """Its ops port is taken: the node exits with status 5, and cluster up says which and why."""
    with socket.socket() as taken:
        for port in random.Random().sample(range(20_000, 60_000), 100):  # base + 200, base > 1024
            with contextlib.suppress(OSError):
                taken.bind(("127.0.0.1", port))
                break
        else:
            raise AssertionError("no free port in 100 tries")
        taken.listen()
        base = taken.getsockname()[1] - 200  # node 1's ops port is base + 200
        with ClusterUp(tmp_path, "--base-port", str(base)) as up:
            out, err = up.wait()
    assert up.process.returncode == EXIT_START and out == "", err
    error = json.loads(err)
    assert error["message"] == f"node 1 exited with status {EXIT_START}; its log: " + str(
        tmp_path / "node1.log"
    )
    assert json.loads(error["log_tail"][-1])["msg"] == (
        f"cannot start: http 127.0.0.1:{base + 200}: address already in use (another process "
        "listens there)"
    )


def test_ctrl_c_while_cluster_up_starts_stops_what_it_started(tmp_path: Path) -> None:
    """The node never becomes ready (a peer that never answers: no quorum)."""
    (nobody,) = free_ports(1)
    with ClusterUp(
        tmp_path, "--base-port", "0", node_flags=("--peers", f"2=127.0.0.1:{nobody}")
    ) as up:
        deadline = time.monotonic() + TIMEOUT_S
        while not (tmp_path / "node1.log").exists():  # the node is starting
            assert time.monotonic() < deadline and up.process.poll() is None
            time.sleep(0.01)
        up.process.send_signal(signal.SIGINT)
        out, err = up.wait()
    assert up.process.returncode == EXIT_INTERRUPTED, err
    stopped = json.loads(out)
    assert stopped["event"] == "stopped" and [n["id"] for n in stopped["nodes"]] == [1]


def test_agents_are_created_updated_listed_and_disabled(node: RunningNode) -> None:
    headers = '{"Authorization": "Bearer k"}'
    created = node.cli("agent", "create", "helper", "--url", "http://127.0.0.1:9/hook",
                       "--headers", headers, "--history", "tail 20")  # fmt: skip
    assert created.returncode == 0, created.stderr
    agent = json.loads(created.stdout)
    assert agent == {
        "id": "helper", "url": "http://127.0.0.1:9/hook",
        "headers": {"Authorization": "Bearer k"}, "timeout_ms": 120_000,
        "idle_timeout_ms": 30_000, "debounce_ms": 500, "history": "tail 20", "max_attempts": 5,
        "status": "active", "protocol": "auto",
    }  # fmt: skip
    updated = node.cli("agent", "update", "helper", "--debounce-ms", "0", "--protocol", "h2")
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout) == {**agent, "debounce_ms": 0, "protocol": "h2"}
    assert json_error(node.cli("agent", "create", "helper", "--url", "http://x.y/"),
                      EXIT_ANSWER)["error"] == "conflict"  # fmt: skip
    bad = node.cli("agent", "create", "b", "--url", "ftp://x.y/")
    assert bad.returncode == EXIT_USAGE and "url" in bad.stderr
    listed = node.cli("agent", "list")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == ["helper"]
    disabled = node.cli("agent", "disable", "helper")
    assert json.loads(disabled.stdout)["status"] == "disabled"
    assert json.loads(node.cli("agent", "get", "helper").stdout)["status"] == "disabled"
    assert json_error(node.cli("agent", "get", "nobody"), EXIT_ANSWER)["error"] == "not_found"
