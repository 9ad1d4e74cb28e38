"""The size limits' start-up relation (ctxstore/limits.py) and the router's deadline on every
path (ctxstore/router.py): units with fakes, no cluster."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ctxstore import commands
from ctxstore.config import ConfigError, Settings
from ctxstore.history import message_bytes
from ctxstore.limits import Limits, check, largest_append, largest_message
from ctxstore.node import Node
from ctxstore.records import StoredMessage, encode_parts
from ctxstore.router import RouteError, Router, RouterConfig
from raft import NONE
from wire.protocol import MESSAGE_BYTES_MAX

_encode = msgspec.msgpack.Encoder().encode


# -- the start-up relation ---------------------------------------------------------------------
def test_the_default_limits_agree_and_a_largest_append_fits_its_entry() -> None:
    check(Limits())
    command = commands.encode_command(largest_append(MESSAGE_BYTES_MAX))
    assert len(command) <= commands.ENTRY_BYTES_MAX
    assert len(command) > MESSAGE_BYTES_MAX  # the bound is not vacuous


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"peer_queue_bytes_max": 4 * 1024 * 1024 - 1, "message_bytes_max": 2 * 1024 * 1024,
          "entry_bytes_max": 2 * 1024 * 1024 + 4096}, "peer_queue_bytes_max"),
        ({"peer_queue_bytes_max": 2 * 1024 * 1024}, "peer_queue_bytes_max"),
        ({"raft_msg_bytes_max": 3 * 1024 * 1024}, "peer_queue_bytes_max"),
        ({"peer_frame_bytes_max": 2 * 1024 * 1024}, "peer_frame_bytes_max"),
        ({"app_queue_bytes_max": 2 * 1024 * 1024}, "app_queue_bytes_max"),
        ({"history_page_bytes": 6 * 1024 * 1024}, "app_queue_bytes_max"),
        ({"entry_bytes_max": MESSAGE_BYTES_MAX}, "entry_bytes_max"),
        ({"client_frame_bytes_max": 2 * 1024 * 1024}, "client_frame_bytes_max"),
        ({"read_bytes_max": 4 * 1024 * 1024}, "client_frame_bytes_max"),
        ({"push_page_bytes": 4 * 1024 * 1024}, "client_frame_bytes_max"),
        ({"window_bytes_max": 4 * 1024 * 1024}, "window_bytes_max"),
        ({"window_records_max": 100_000}, "window_records_max"),
    ],
)  # fmt: skip
def test_limits_that_do_not_fit_each_other_are_refused(change: dict[str, int], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        check(replace(Limits(), **change))


def test_the_issues_limits_are_refused() -> None:
    """Before: a message of up to 4 MiB (1 Mi 4-byte characters) next to a 4 MiB peer queue."""
    with pytest.raises(ConfigError, match="peer_queue_bytes_max"):
        check(Limits(message_bytes_max=4 * 1024 * 1024, entry_bytes_max=4 * 1024 * 1024 + 4096))


def test_a_node_refuses_to_start_with_limits_that_disagree(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "n1"), listen="127.0.0.1:0", groups=4)
    with pytest.raises(ConfigError, match="inconsistent size limits"):
        Node(settings, Limits(peer_queue_bytes_max=1024 * 1024))
    assert not (tmp_path / "n1").exists()  # refused before anything was written


def test_the_stored_size_estimate_bounds_the_encoded_size() -> None:
    rng = random.Random(7)
    alphabet = ["a", "\u00e9", "\u4e2d", "\U0001f600"]
    messages = [largest_message(MESSAGE_BYTES_MAX), largest_message(1)]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
        meta = {"k": text[: rng.randrange(0, 50)]} if rng.random() < 0.5 else {}
        messages.append(StoredMessage(
            "s" * rng.randrange(1, 129), rng.randrange(2**63), "agent",
            text[: rng.randrange(0, 129)], text[:64] or "t", text, meta,
            rng.choice([None, "c" * rng.randrange(1, 129)]), rng.randrange(2**63),
            rng.choice([None, rng.randrange(2**63)]), rng.choice([None, "assistant", "tool"]),
            encode_parts(rng.choice([None, [{"type": "text", "text": text}],
                                     [{"type": "tool-t" + text[:8], "toolCallId": text[:64],
                                       "state": "input-available", "input": {"q": text}}]])),
        ))  # fmt: skip
    for m in messages:
        assert len(_encode(m)) <= message_bytes(m), m.seq


# -- the router's deadline ---------------------------------------------------------------------
class _StuckDriver:
    """Leads every group; proposals are never applied, read barriers never confirmed (a group
    whose replication messages are lost for good)."""

    host = range(256)  # hosts every group

    def __init__(self, lead: bool = True) -> None:
        self.lead = lead
        self.proposals = 0
        self.reads = 0

    def leader(self, group: int) -> int:
        return 1 if self.lead else NONE

    def propose_then(self, group: int, data: bytes, done: Any) -> None:
        self.proposals += 1

    def read_index_then(self, group: int, done: Any, abandoned: Any = None) -> None:
        self.reads += 1


def _router(driver: _StuckDriver, **config: Any) -> Router:
    router = Router(1, driver, RouterConfig(**config))  # type: ignore[arg-type]
    router.start()
    return router


async def _failure(fut: asyncio.Future[Any], within_s: float) -> tuple[RouteError, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(RouteError) as e:
        await asyncio.wait_for(fut, within_s)
    return e.value, loop.time() - start


def test_a_proposal_the_group_never_applies_fails_at_the_deadline() -> None:
    async def main() -> None:
        driver = _StuckDriver()
        router = _router(driver, request_timeout_s=0.3)
        try:
            error, took = await _failure(router.submit(0, b"cmd"), 2)
            assert (error.code, driver.proposals) == ("timeout", 1)
            assert 0.25 <= took < 0.6
        finally:
            router.stop()

    asyncio.run(main())


def test_a_read_barrier_retried_past_the_deadline_fails_at_the_deadline() -> None:
    async def main() -> None:
        driver = _StuckDriver()
        router = _router(driver, request_timeout_s=0.3, read_retry_s=0.2)
        try:
            error, took = await _failure(router.barrier(0), 2)
            assert error.code == "timeout" and took < 0.6
            assert driver.reads == 2  # asked again once, after read_retry_s
        finally:
            router.stop()

    asyncio.run(main())


def test_a_command_over_the_entry_limit_is_too_large_and_never_proposed() -> None:
    async def main() -> None:
        driver = _StuckDriver()
        router = _router(driver, entry_bytes_max=100)
        try:
            error, _ = await _failure(router.submit(0, bytes(101)), 1)
            assert (error.code, driver.proposals) == ("too_large", 0)
        finally:
            router.stop()

    asyncio.run(main())
