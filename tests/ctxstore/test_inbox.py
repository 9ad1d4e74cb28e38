"""Unread counts and read cursors end to end, on a real ``ctxstore serve`` process: the user's
own messages are never unread, and ``mark_read`` is the session's user's (design §5.1, §5.7)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from ctxstore.launcher import LocalCluster
from wire.client import ClientError, connect
from wire.protocol import InboxDelta, InboxSnapshot

from .test_e2e import FAST, run

pytestmark = pytest.mark.cluster


def test_the_users_own_messages_stay_read_and_only_the_user_marks_read(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = LocalCluster(1, str(tmp_path), extra_args=FAST)
        await cluster.start()
        target = cluster.targets[0]
        try:
            async with await connect(target) as c, await connect(target) as w:
                await w.create_session("ann", "bot", {}, "s1")
                await w.append("s1", "hi", "user", "ann")
                async with c.subscribe_inbox("ann") as inbox:
                    it = aiter(inbox)
                    snap = await anext(it)
                    assert isinstance(snap, InboxSnapshot)
                    assert [(e.last_seq, e.unread) for e in snap.entries] == [(1, 0)]

                    async def after(sender: str) -> tuple[int, int]:
                        await w.append("s1", f"from {sender}", sender, sender)  # type: ignore[arg-type]
                        delta = await asyncio.wait_for(anext(it), 5)
                        assert isinstance(delta, InboxDelta)
                        (e,) = delta.entries
                        return e.last_seq, e.unread

                    assert await after("agent") == (2, 1)
                    assert await after("user") == (3, 0)  # answering reads what came before
                    assert await after("agent") == (4, 1)
                    assert await after("system") == (5, 2)
                with pytest.raises(ClientError) as refused:
                    await w.mark_read("s1", "mallory", 5)
                assert (refused.value.code, refused.value.retryable) == ("forbidden", False)
                marked = await w.mark_read("s1", "ann", 4)
                assert (marked.user_id, marked.seq) == ("ann", 4)
                # The CLI says so too, with the error's code, and fails.
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "ctxstore", "client", "--target", target,
                    "mark-read", "s1", "--user", "mallory", "--seq", "5",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode != 0 and out == b""
                assert json.loads(err.splitlines()[-1])["error"] == "forbidden"
                async with c.subscribe_inbox("ann") as inbox:
                    snap = await anext(aiter(inbox))
                    assert isinstance(snap, InboxSnapshot)
                    assert [(e.last_seq, e.unread) for e in snap.entries] == [(5, 1)]
        finally:
            await cluster.stop()

    run(main())
