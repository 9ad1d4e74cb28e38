"""Context windows through one in-process node (``Service``, the state machine, the client):
structured messages, token counts, policies, compaction with ``if_version``, the pushes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ctxstore import commands, context
from ctxstore.state import fingerprint
from ctxstore.tokens import TokenCounter
from ctxstore.window import Window
from wire.client import Client, ClientError, connect
from wire.framing import encode_frame
from wire.protocol import (
    Context,
    ContextEvent,
    GetContext,
    InboxSnapshot,
    LastN,
    Manual,
    Message,
    NewMessage,
    SkipParts,
    TokenBudget,
)

from .test_ops import run, single_node

O200K = TokenCounter("o200k_base")
CL100K = TokenCounter("cl100k_base")

TOOL_CALL: dict[str, Any] = {
    "type": "tool-weather",
    "toolCallId": "call-1",
    "state": "output-available",
    "input": {"city": "Paris"},
    "output": {"celsius": 21},
}
PARTS: list[dict[str, Any]] = [
    {"type": "reasoning", "text": "The user wants the weather; call the tool."},
    TOOL_CALL,
    {"type": "text", "text": "It is 21 degrees in Paris."},
]


async def node_client(h: Any) -> Client:
    assert await h.node.wait_leaders(10)
    return await connect(h.target)


def test_structured_messages_are_stored_with_their_role_parts_and_real_token_counts(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            await c.append("s", "What is the weather in Paris?")
            await c.append("s", "", "agent", "a", parts=PARTS)
            await c.append("s", "given count", token_count=99)
            messages = (await c.read("s")).messages
            assert [m.role for m in messages] == ["user", "assistant", "user"]
            assert messages[0].parts is None
            assert messages[1].parts == PARTS and messages[1].content == ""
            # no window yet: nothing is counted but what the client counted
            assert [m.token_count for m in messages] == [None, None, 99]
            assert h.service.messages_counted == 0
            window = await c.get_context("s")  # never configured: no window yet
            assert (window.messages, window.version, window.config) == ([], 0, None)
            assert window.window_first_seq == 4 and not window.needs_compaction
            with pytest.raises(ClientError) as e:
                await c.compact("s", 1, 1, [])
            assert e.value.code == "bad_request"
            # configured, it starts with the hot tail, counted by the node that took the
            # configuration (the client's count wins)
            await c.set_context_config("s", 1000, Manual())
            window = await c.get_context("s")
            counts = [m.token_count for m in window.messages]
            assert counts == [7, O200K.message("", PARTS)[0], 99]
            assert window.token_count == sum(counts)
            assert [m.seq for m in window.messages] == [1, 2, 3]
            assert window.config is not None and not window.needs_compaction
            # from now on every append is counted before it is proposed
            await c.append("s", "", "agent", "a", parts=PARTS)
            stored = (await c.read("s", 3)).messages[0]
            assert stored.token_count == O200K.message("", PARTS)[0]

    run(main())


def test_bad_parts_and_configs_are_refused_naming_the_field(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            cases: list[tuple[dict[str, Any], str]] = [
                ({"parts": [{"type": "video", "url": "x"}]}, "parts[0].type"),
                ({"parts": [{"type": "text"}]}, "parts[0].text"),
                ({"parts": [{**TOOL_CALL, "state": "output-error"}]}, "parts[0].errorText"),
                ({"parts": [{"type": "text", "text": "x"}], "content": "y"}, "content"),
                ({"role": "assistant"}, "role"),  # a user does not write as the assistant
            ]
            for fields, where in cases:
                with pytest.raises(ClientError) as e:
                    await c.append("s", **{"content": "", **fields})
                assert e.value.code == "bad_request", e.value
                assert e.value.details["field"] == where, e.value
            for budget, ratio, policy, field in [
                (0, 0.5, Manual(), "token_budget"),
                (10, 0.0, Manual(), "trigger_ratio"),
                (10, 1.5, Manual(), "trigger_ratio"),
            ]:
                with pytest.raises(ClientError) as e:
                    await c.set_context_config("s", budget, policy, ratio)
                assert (e.value.code, e.value.details["field"]) == ("bad_request", field)
            assert (await c.get_context("s")).version == 0  # nothing changed
            with pytest.raises(ClientError) as e:
                await c.set_context_config("missing", 10, Manual())
            assert e.value.code == "not_found"

    run(main())


def test_policies_shape_the_window_and_compaction_replaces_a_range(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            await c.set_context_config("s", 1000, Manual())  # counts per part from now on
            for i in range(1, 7):
                await c.append("s", f"message number {i}")
            await c.append("s", "", "agent", "a", parts=PARTS)  # seq 7
            changed = await c.set_context_config("s", 1000, LastN(5))
            window = await c.get_context("s")
            assert [m.seq for m in window.messages] == [3, 4, 5, 6, 7]
            assert window.window_first_seq == changed.window_first_seq == 3
            # skip_parts drops the reasoning and tool parts but keeps the message
            await c.set_context_config("s", 1000, SkipParts(["reasoning", "tool-"], None))
            window = await c.get_context("s")
            last = window.messages[-1]
            assert last.parts == [PARTS[2]]
            assert last.token_count == O200K.part(PARTS[2])
            assert [m.seq for m in window.messages] == [3, 4, 5, 6, 7]  # no limit: kept
            # compact 3..5 into one summary, guarded by the version
            version = window.version
            summary = NewMessage("system", "summary", "messages 3 to 5 were greetings", None,
                                 {}, None)  # fmt: skip
            with pytest.raises(ClientError) as e:
                await c.compact("s", 3, 5, [summary], if_version=version - 1)
            assert (e.value.code, e.value.details["version"]) == ("conflict", version)
            done = await c.compact("s", 3, 5, [summary], if_version=version)
            assert done.version == version + 1
            window = await c.get_context("s")
            assert [(m.seq, m.content) for m in window.messages[:2]] == [
                (0, "messages 3 to 5 were greetings"),
                (6, "message number 6"),
            ]
            assert [(s.from_seq, s.to_seq, s.count, s.compacted) for s in window.segments] == [
                (3, 5, 1, True),
                (6, 7, 2, False),
            ]
            # a range inside the summary or beyond the window is refused
            for a, b in [(4, 5), (3, 4), (1, 2), (6, 9)]:
                with pytest.raises(ClientError) as e:
                    await c.compact("s", a, b, [])
                assert e.value.code == "bad_request", (a, b)
            # the history is untouched
            assert [m.seq for m in (await c.read("s")).messages] == list(range(1, 8))
            # append if_version
            with pytest.raises(ClientError) as e:
                await c.append("s", "late", if_version=version)
            assert e.value.code == "conflict"
            await c.append("s", "on time", if_version=done.version)

    run(main())


def test_token_budget_trims_whole_tool_exchanges_and_pushes_context_events(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            sub = await c.subscribe("s", context_events=True)
            events: list[ContextEvent] = []
            seen: list[int] = []

            async def follow() -> None:
                async for item in sub:
                    if isinstance(item, ContextEvent):
                        events.append(item)
                    elif isinstance(item, Message):
                        seen.append(item.seq)

            task = asyncio.create_task(follow())
            await c.set_context_config("s", 100, Manual(), 0.5, "cl100k_base")
            await c.append("s", "", "agent", "a", token_count=20, role="assistant",
                           parts=[{**TOOL_CALL, "state": "input-available"}])  # fmt: skip
            await c.append("s", "", "agent", "a", token_count=20, role="tool",
                           parts=[TOOL_CALL])  # fmt: skip
            await c.append("s", "ok", token_count=20)  # 60 > 50: needs compaction
            window = await c.get_context("s")
            assert window.needs_compaction and window.config is not None
            assert window.config.tokenizer == "cl100k_base"
            await c.set_context_config("s", 100, TokenBudget(), 0.5, "cl100k_base")
            window = await c.get_context("s")
            # the call and its result left together: only "ok" remains
            assert [m.seq for m in window.messages] == [3]
            assert window.token_count == 20 and not window.needs_compaction
            await asyncio.sleep(0.3)
            task.cancel()
            reasons = [e.reason for e in events]
            assert reasons == ["configured", "needs_compaction", "configured", "trimmed"]
            assert events[-1].version == window.version and events[-1].window_first_seq == 3
            assert seen == [1, 2, 3]
            await sub.close()

    run(main())


def test_replacement_counts_use_the_session_tokenizer(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            await c.set_context_config("s", 10_000, Manual(), 1.0, "cl100k_base")
            await c.append("s", "tiktoken is great!")
            text = "tiktoken is great!"
            assert (await c.read("s")).messages[0].token_count == CL100K.text(text) == 6
            await c.compact("s", 1, 1, [NewMessage("system", "summary", text, None, {}, None)])
            window = await c.get_context("s")
            assert window.token_count == 6

    run(main())


def test_a_long_message_is_counted_off_the_loop_and_later_appends_keep_their_order(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            await c.set_context_config("s", 100_000, Manual())
            long_text = "word " * 40_000  # 200 000 characters: counted on a thread
            futures = [c.append_nowait("s", long_text)]
            futures += [c.append_nowait("s", f"short {i}") for i in range(20)]
            answers = [await f for f in futures if f is not None]
            assert len(answers) == 21
            assert [a.seq for a in answers] == list(range(1, 22))  # type: ignore[union-attr]
            assert h.service.counted_off_loop == 1
            first = (await c.read("s", 0, 1)).messages[0]
            assert first.token_count == O200K.text(long_text) == 40_001  # the last space too

    run(main())


def test_the_inbox_previews_a_structured_message_by_its_first_text_part(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            await c.append("s", "", "agent", "a", parts=PARTS)
            async with c.subscribe_inbox("u") as inbox:
                snapshot = await anext(aiter(inbox))
            assert isinstance(snapshot, InboxSnapshot)
            assert snapshot.entries[0].preview == "It is 21 degrees in Paris."

    run(main())


def test_a_new_tokenizer_recounts_the_window(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            await c.create_session("u", "a", {}, "s")
            await c.set_context_config("s", 1000, Manual(), 1.0, "o200k_base")
            await c.append("s", "こんにちは世界")
            assert (await c.get_context("s")).token_count == 2
            await c.set_context_config("s", 1000, Manual(), 1.0, "cl100k_base")
            window = await c.get_context("s")
            assert window.token_count == 4 and window.messages[0].token_count == 4
            await c.append("s", "こんにちは世界")  # counted by the new one from now on
            assert (await c.get_context("s")).token_count == 8

    run(main())


@pytest.mark.parametrize("cache_bytes", [64 * 1024 * 1024, 0])
def test_a_window_older_than_the_hot_tail_is_served_from_the_cache_or_the_archive(
    tmp_path: Path, cache_bytes: int
) -> None:
    async def main() -> None:
        async with (
            single_node(tmp_path, tail_messages_max=3, context_cache_bytes=cache_bytes) as h,
            await node_client(h) as c,
        ):
            await c.create_session("u", "a", {}, "s")
            await c.set_context_config("s", 100_000, Manual())
            for i in range(1, 21):
                await c.append("s", f"message {i}")
            reads = h.node.history.archive_reads
            window = await c.get_context("s")
            assert [m.content for m in window.messages] == [f"message {i}" for i in range(1, 21)]
            cache = h.service.window_cache
            if cache_bytes:  # the 17 evicted from the tail were kept: no archive read
                assert (h.node.history.archive_reads, cache.hits, len(cache)) == (reads, 1, 17)
            else:
                assert h.node.history.archive_reads > reads and len(cache) == 0

    run(main())


def _fresh(h: Any, rid: int, session_id: str) -> Context:
    """The answer ``get_context`` builds when nothing is kept (the reply cache bypassed)."""
    state = h.node.state
    plan = context.plan(state, GetContext(rid, session_id))
    assert plan is not None
    found = context.from_memory(state, h.service.window_cache, plan)
    assert found is not None
    return context.answer(rid, plan, found)


def _same_answer(got: Context, h: Any, session_id: str) -> None:
    """``got`` (decoded by the client) is what building the answer again gives, byte for byte."""
    fresh = _fresh(h, got.rid, session_id)
    assert encode_frame(got) == encode_frame(fresh)


def test_a_window_read_again_is_answered_from_its_encoded_reply_until_it_changes(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            replies = h.service.replies
            await c.create_session("u", "a", {}, "s")
            await c.create_session("u", "a", {}, "plain")  # no window: nothing kept
            await c.append("plain", "hello")
            assert (await c.get_context("plain")).messages == [] and len(replies) == 0
            await c.set_context_config("s", 1000, LastN(4))
            for i in range(1, 4):
                await c.append("s", f"message number {i}")
            await c.append("s", "", "agent", "a", parts=PARTS)
            first = await c.get_context("s")
            _same_answer(first, h, "s")
            assert (replies.hits, len(replies)) == (0, 1)
            again = await c.get_context("s")  # the same window: the kept reply, its own rid
            assert replies.hits == 1 and again.rid != first.rid
            _same_answer(again, h, "s")
            # every change of the window or the session is seen at once
            await c.append("s", "message number 5")
            moved = await c.get_context("s")
            assert [m.seq for m in moved.messages] == [2, 3, 4, 5] and replies.hits == 1
            _same_answer(moved, h, "s")
            await c.set_context_config("s", 1000, SkipParts(["reasoning", "tool-"], None))
            skipped = await c.get_context("s")
            assert skipped.messages[2].parts == [PARTS[2]] and replies.hits == 1
            _same_answer(skipped, h, "s")
            done = await c.compact("s", 2, 3, [], if_version=skipped.version)
            compacted = await c.get_context("s")
            assert compacted.version == done.version and [m.seq for m in compacted.messages] == [
                4,
                5,
            ]
            _same_answer(compacted, h, "s")
            _same_answer(await c.get_context("s"), h, "s")
            assert replies.hits == 2

    run(main())


def test_the_reply_cache_is_bounded_and_keeps_whole_windows_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            for sid in ("a", "b", "c"):
                await c.create_session("u", "a", {}, sid)
                await c.set_context_config(sid, 100_000, Manual())
                await c.append(sid, "x" * 1000)
            whole = context.ReplyCache(1 << 20)
            whole.keep(*_planned(h, "a"))
            one = whole.bytes  # one answer's charge (the three are the same size)
            replies = context.ReplyCache(2 * one)
            for sid in ("a", "b", "c"):
                replies.keep(*_planned(h, sid))
            assert len(replies) == 2 and replies.bytes <= replies.bytes_max  # "a" went first
            state = h.node.state
            assert replies.get(state, 5, "a") is None and replies.get(state, 5, "c") is not None
            too_small = context.ReplyCache(one - 1)  # an answer larger than the whole cache
            too_small.keep(*_planned(h, "a"))
            assert len(too_small) == 0
            # an answer missing a message of its window (gone from memory) is not kept
            plan, full = _planned(h, "b")
            partial = msgspec.structs.replace(full, messages=[])
            assert replies.keep(plan, partial) is partial
            # a window replaced by another at the same version (a snapshot installed) misses
            assert plan.window is not None
            replaced = Window(plan.window.limits)
            replaced.version = plan.window.version
            replies.keep(plan, full)

            class Installed:
                def window(self, session_id: str) -> tuple[Window, int]:
                    return replaced, plan.last_seq

            before = replies.bytes
            assert replies.get(Installed(), 5, "b") is None  # type: ignore[arg-type]
            assert "b" not in replies._entries and replies.bytes < before

    run(main())


def _planned(h: Any, session_id: str) -> tuple[context.Plan, Context]:
    plan = context.plan(h.node.state, GetContext(1, session_id))
    assert plan is not None
    return plan, _fresh(h, 1, session_id)


def test_the_node_that_takes_an_append_carries_its_dedupe_fingerprint(tmp_path: Path) -> None:
    """The command of an append with a ``client_msg_id`` carries the fingerprint of its own
    fields (computed by the node, never by the client), so replicas do not hash the parts
    again; a retry with the parts' keys in another order is still the same append."""

    async def main() -> None:
        async with single_node(tmp_path) as h, await node_client(h) as c:
            proposed: list[commands.Append] = []
            router = h.service.router
            submit = router.submit_then

            def spy(group: int, data: bytes, done: Any, append: bool = False) -> None:
                cmd = commands.decode_command(data)
                if isinstance(cmd, commands.Append):
                    proposed.append(cmd)
                submit(group, data, done, append)

            router.submit_then = spy
            await c.create_session("u", "a", {}, "s")
            await c.set_context_config("s", 1000, TokenBudget())
            reordered = [{k: v for k, v in reversed(p.items())} for p in PARTS]
            first = await c.append("s", "", "agent", "a", parts=PARTS, client_msg_id="m-1")
            again = await c.append("s", "", "agent", "a", parts=reordered, client_msg_id="m-1")
            plain = await c.append("s", "hi", metadata={"b": 1, "a": 2}, client_msg_id="m-2")
            await c.append("s", "no id")
            assert (first.seq, again.seq, again.deduped, plain.seq) == (1, 1, True, 2)
            assert len(proposed) == 4
            for cmd in proposed:
                printed = fingerprint(cmd.sender, cmd.sender_id, cmd.kind, cmd.content,
                                      cmd.metadata, cmd.role, cmd.parts)  # fmt: skip
                assert cmd.fingerprint == (None if cmd.client_msg_id is None else printed)
            assert proposed[0].parts != proposed[1].parts  # the bytes differ, not the print
            assert proposed[0].fingerprint == proposed[1].fingerprint

    run(main())
