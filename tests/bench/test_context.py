"""The bench's structured messages, context windows and ``context`` scenario (issue 19), and
the tokenizer micro-benchmark."""

from __future__ import annotations

import asyncio
import random
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import tokens
from bench.cli import parse
from bench.context import message_parts, payload, prose
from bench.scenarios import gate
from ctxstore.launcher import LocalCluster
from ctxstore.tokens import TokenCounter
from wire.client import connect
from wire.parts import check_parts
from wire.protocol import LastN

from .test_cli import figures, summary
from .test_smoke import bench


def test_options_parse_and_bad_ones_exit_2() -> None:
    args = parse(["append", "--nodes", "3", "--parts", "3", "--context-policy", "skip_parts"])
    assert (args.parts, args.context_policy, args.context_budget) == (3, "skip_parts", 4000)
    assert (args.context_ratio, args.context_limit) == (0.7, 100)
    args = parse(["context", "--nodes", "3", "--concurrency", "256"])
    assert (args.context_tokens, args.context_rate, args.context_p99_target_ms) == (
        100_000, 20.0, 20.0,
    )  # fmt: skip
    assert parse(["append", "--nodes", "1"]).parts == 0
    for argv in (
        ["append", "--nodes", "1", "--parts", "2"],
        ["append", "--nodes", "1", "--parts", "3", "--via", "ws"],
        ["append", "--nodes", "1", "--context-policy", "fifo"],
        ["append", "--nodes", "1", "--context-policy", "manual", "--context-budget", "0"],
        ["append", "--nodes", "1", "--context-policy", "manual", "--context-ratio", "1.5"],
        ["append", "--nodes", "1", "--context-limit", "0"],
        ["context", "--nodes", "1", "--via", "ws-json"],
        ["context", "--nodes", "1", "--context-rate", "0"],
        ["context", "--nodes", "1", "--context-sessions", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2, argv


def test_gate_on_the_get_context_p99() -> None:
    args = parse(["context", "--nodes", "1", "--context-p99-target-ms", "20"])
    ok = {"latency_ms": summary(19.0)}
    assert gate(args, "context", figures(10.0, context=ok))["passed"]
    result = gate(args, "context", figures(10.0, context={"latency_ms": summary(21.0)}))
    assert not result["passed"] and "get_context p99 21.0 ms" in result["failures"][0]
    none = {"latency_ms": summary(0.0, 0)}
    assert not gate(args, "context", figures(10.0, context=none))["passed"]


@pytest.mark.parametrize("payload", [3, 200, 2001])
def test_parts_are_valid_and_carry_the_payload(payload: int) -> None:
    text = prose(random.Random(1), payload)
    assert len(text) == payload
    assert message_parts(0, text) is None
    for count in (1, 3):
        parts = message_parts(count, text)
        assert parts is not None and len(parts) == count
        check_parts(parts)  # what the server checks
        carried = [p.get("text", "") for p in parts]
        if count == 3:
            assert [p["type"] for p in parts] == ["reasoning", "tool-search", "text"]
            carried.insert(1, parts[1]["input"]["query"] + parts[1]["output"]["result"])
        assert "".join(carried) == text


def test_payload_texts_are_one_word_or_words() -> None:
    letters = payload(random.Random(1), 200, "letters")
    words = payload(random.Random(1), 200, "prose")
    assert len(letters) == len(words) == 200
    assert letters.isalnum()
    assert " " in words and set(words.replace(" ", "")) <= set(string.ascii_lowercase)
    counter = TokenCounter()
    assert counter.text(letters) > 2 * counter.text(words)  # the tokenizer's dearest input
    assert parse(["append", "--nodes", "1"]).payload_text == "letters"
    with pytest.raises(SystemExit):
        parse(["append", "--nodes", "1", "--payload-text", "poetry"])


@pytest.mark.parametrize("encoding", tokens.ENCODINGS)
def test_the_micro_benchmark_counts_as_a_node_does(encoding: str) -> None:
    counter, tok = TokenCounter(encoding), tokens.tokenizer(encoding)
    for content, parts in tokens.samples(200).values():
        assert tokens.count_message(tok, content, parts) == counter.message(content, parts)[0]
    result = tokens.measure(encoding, 200, count=20, repeat=2)
    assert len(result["messages"]) == 5
    assert all(m["us"] > 0 and m["tokens"] > 0 for m in result["messages"])


def test_tokens_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokens.main(["--count", "10", "--repeat", "1"]) == 0
    assert "plain 200 B (bench append)" in capsys.readouterr().out
    cold = tokens.measure("cl100k_base", 200, count=1, repeat=1, cold=True)
    assert cold["cold"] and all(m["us"] > 0 for m in cold["messages"])


@pytest.mark.cluster
def test_append_writes_structured_messages_into_configured_windows(tmp_path: Path) -> None:
    """--parts 3 --context-policy last_n against a running node: every session holds the
    agent's 3-part messages, and its window is configured and kept at the limit."""

    async def main() -> None:
        flags = ["--groups", "16", "--tick-ms", "20"]
        async with LocalCluster(1, str(tmp_path / "node"), extra_args=flags) as cluster:
            argv = [
                sys.executable, "-m", "bench.cli", "append", "--target", cluster.targets[0],
                "--concurrency", "8", "--parts", "3", "--context-policy", "last_n",
                "--context-limit", "5", "--run-id", "ctx", "--verify", "--quiet",
                "--payload-text", "prose",
                "--duration", "2", "--warmup", "0.5", "--sessions", "4",
            ]  # fmt: skip
            done = await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, timeout=90
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "200 B in 3 parts of prose, window last_n" in done.stdout
            async with await connect(cluster.targets[0]) as c:
                for i in range(4):
                    messages = (await c.read(f"ctx-s{i}")).messages
                    assert len(messages) > 5
                    assert {m.role for m in messages} == {"assistant"}
                    assert all(m.parts and len(m.parts) == 3 and not m.content for m in messages)
                    assert all(" " in m.parts[0]["text"] for m in messages)  # words
                    window = await c.get_context(f"ctx-s{i}")
                    assert window.config is not None and window.config.policy == LastN(5)
                    last = window.last_seq
                    assert last > 5 and [m.seq for m in window.messages] == [
                        *range(last - 4, last + 1)
                    ]

    asyncio.run(main())


@pytest.mark.cluster
def test_context_scenario_reads_full_windows_under_load(tmp_path: Path) -> None:
    doc: dict[str, Any] = bench(
        tmp_path, "context", "--nodes", "1", "--concurrency", "8", "--parts", "3",
        "--context-sessions", "2", "--context-tokens", "3000", "--context-rate", "50",
        "--context-p99-target-ms", "5000", "--context-policy", "manual",
    )  # fmt: skip
    ctx = doc["context"]
    assert ctx["count"] == pytest.approx(50 * doc["window_s"], abs=3)
    filled, served = ctx["filled"], ctx["served"]
    assert filled["sessions"] == 2 and filled["parts"] == 3
    # full windows: trimmed by the token_budget policy to just under the budget
    assert 3000 - 1000 < filled["tokens_min"] <= filled["tokens_max"] <= 3000
    assert served["tokens_min"] == filled["tokens_min"] and served["messages_min"] > 1
    assert doc["verify"]["sessions"] == 50 + 2  # the filled sessions are read back too
    clients = [k for k in doc["cpu"]["pct_of_core"] if k.startswith("client")]
    assert clients == ["client1", "client2"]  # the load's process, then get_context's
    # the node's own figure of what counting the appends' tokens cost it in the window (the
    # load's sessions have windows: --context-policy; appends to others are not counted)
    counted = doc["node_pauses"]["node1"]["tokens"]
    assert counted["counted"] >= doc["appends"]["count"] // 2 and counted["us_per_message"] > 0
