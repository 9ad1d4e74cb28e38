"""ctxstore/errors.py: the one mapping from a failed proposal to what a request does next, as
the router applies it on both sides of a forward."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop

from ctxstore.errors import OUTCOME_CODES, Outcome, ServiceError, proposal_outcome
from ctxstore.router import RouteError, Router, RouterConfig
from raft import NotLeader, ProposalDropped, RaftError
from raft.errors import NodeStopped, OutcomeUnknown


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (NotLeader(2), Outcome.NOT_APPLIED),
        (ProposalDropped("replaced"), Outcome.NOT_APPLIED),
        (OutcomeUnknown("snapshot jumped over it"), Outcome.UNKNOWN),
        (NodeStopped("stopping"), Outcome.CANNOT),
        (RaftError("anything else"), Outcome.CANNOT),
    ],
)
def test_every_failure_has_one_outcome(exc: BaseException, outcome: Outcome) -> None:
    assert proposal_outcome(exc) is outcome
    if outcome is not Outcome.NOT_APPLIED:
        assert OUTCOME_CODES[outcome] in ("timeout", "unavailable")
    assert RouteError is ServiceError


class _Refusing:
    """Leads every group; each proposal fails with ``exc`` (raised, or given to its callback)."""

    host = range(256)  # hosts every group

    def __init__(self, exc: BaseException, raised: bool) -> None:
        self.exc, self.raised, self.proposals = exc, raised, 0

    def leader(self, group: int) -> int:
        return 1

    def propose_then(self, group: int, data: bytes, done: Any) -> None:
        self.proposals += 1
        if self.raised:
            raise self.exc
        done(None, self.exc)


@pytest.mark.parametrize(
    ("exc", "raised", "code", "retried"),
    [
        (ProposalDropped("refused"), True, "unavailable", True),  # sent again, then gives up
        (ProposalDropped("replaced"), False, "unavailable", True),
        (OutcomeUnknown("lost"), False, "timeout", False),  # only ever given to the callback
        (NodeStopped("stopping"), True, "unavailable", False),
        (NodeStopped("stopping"), False, "unavailable", False),
    ],
)
def test_the_router_acts_on_the_outcome(
    exc: BaseException, raised: bool, code: str, retried: bool
) -> None:
    async def main() -> None:
        driver = _Refusing(exc, raised)
        router = Router(1, driver, RouterConfig(hops_max=2, retry_delay_s=0.001))  # type: ignore[arg-type]
        router.start()
        try:
            with pytest.raises(RouteError) as e:
                await asyncio.wait_for(router.submit(0, b"x"), 5)
        finally:
            router.stop()
        assert e.value.code == code
        assert (driver.proposals > 1) is retried

    uvloop.run(main())


class _FollowerOf2:
    """Node 1 follows node 2 in every group; read barriers are asked and never answered."""

    host = range(256)  # hosts every group

    def __init__(self) -> None:
        self.reads: list[Any] = []

    def leader(self, group: int) -> int:
        return 2

    def read_index_then(self, group: int, done: Any, *more: Any) -> None:
        self.reads.append(done)


class _Lane:
    """A peer connection to node 2 that takes every application message."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def is_connected(self, peer: int) -> bool:
        return True

    def connected_peers(self) -> list[int]:
        return [2]

    def send_app(self, peer: int, data: bytes) -> bool:
        self.sent.append(data)
        return True


def test_a_stopping_router_fails_a_forwarded_write_as_timeout_and_a_read_as_unavailable() -> None:
    """The forwarded write may still be applied by the leader: its outcome is unknown."""

    async def main() -> None:
        driver, lane = _FollowerOf2(), _Lane()
        router = Router(1, driver, RouterConfig())  # type: ignore[arg-type]
        router.attach(lane)  # type: ignore[arg-type]
        router.start()
        write, read = router.submit(0, b"x"), router.barrier(0)
        await asyncio.sleep(0.01)
        assert lane.sent and driver.reads  # forwarded; the barrier asked
        router.stop()
        with pytest.raises(RouteError) as w:
            await write
        with pytest.raises(RouteError) as r:
            await read
        assert (w.value.code, r.value.code) == ("timeout", "unavailable")

    uvloop.run(main())
