"""The AI SDK UI message stream, sans I/O: the SSE and JSONL decoder split at every byte offset,
its refusals, and the assembler against a naive model over random valid chunk sequences (every
chunk type)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstore.agents.assemble import Assembler
from ctxstore.agents.engine import _retry_after_s, _status_failure
from ctxstore.agents.stream import CHUNK_TYPES, StreamDecoder, StreamError, framing_of
from wire.parts import check_parts

SAMPLE: list[dict[str, Any]] = [
    {"type": "start", "messageId": "m1", "messageMetadata": {"model": "x"}},
    {"type": "start-step"},
    {"type": "reasoning-start", "id": "r"},
    {"type": "reasoning-delta", "id": "r", "delta": "think"},
    {"type": "reasoning-end", "id": "r"},
    {"type": "text-start", "id": "t"},
    {"type": "text-delta", "id": "t", "delta": "Héllo, "},
    {"type": "text-delta", "id": "t", "delta": "world\nline"},
    {"type": "text-end", "id": "t"},
    {"type": "tool-input-start", "toolCallId": "c", "toolName": "search"},
    {"type": "tool-input-delta", "toolCallId": "c", "inputTextDelta": '{"q":'},
    {"type": "tool-input-available", "toolCallId": "c", "toolName": "search", "input": {"q": 1}},
    {"type": "tool-output-available", "toolCallId": "c", "output": [1, 2]},
    {"type": "data-weather", "id": "w", "data": {"c": 20}},
    {"type": "data-weather", "id": "w", "data": {"c": 21}},
    {"type": "file", "url": "https://x/y.png", "mediaType": "image/png"},
    {"type": "source-url", "sourceId": "s1", "url": "https://x", "title": "X"},
    {"type": "source-document", "sourceId": "s2", "mediaType": "text/plain", "title": "T"},
    {"type": "finish-step"},
    {"type": "message-metadata", "messageMetadata": {"usage": 3}},
    {"type": "finish", "finishReason": "stop"},
]


def sse(chunks: list[dict[str, Any]], eol: str = "\n") -> bytes:
    events = "".join(f"data: {json.dumps(c)}{eol}{eol}" for c in chunks)
    return (f": comment{eol}event: message{eol}" + events + f"data: [DONE]{eol}{eol}").encode()


def jsonl(chunks: list[dict[str, Any]], eol: str = "\n") -> bytes:
    return "".join(json.dumps(c) + eol for c in chunks).encode()


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize(("framing", "encode"), [("sse", sse), ("jsonl", jsonl)])
def test_the_decoder_gives_the_chunks_wherever_the_bytes_are_split(
    framing: Any, encode: Any, eol: str
) -> None:
    data = encode(SAMPLE, eol)
    for i in range(len(data) + 1):
        d = StreamDecoder(framing)
        got = d.feed(data[:i]) + d.feed(data[i:]) + d.end()
        assert got == SAMPLE, i
        assert d.done == (framing == "sse")


def test_one_line_events_and_others_mix_wherever_the_bytes_are_split() -> None:
    """One-line events (read whole, at once) between events of other shapes (line by line)."""
    one = "".join(f"data: {json.dumps(c)}\n\n" for c in SAMPLE[:6])
    multi = 'data: {"type":\ndata: "text-delta", "id": "t", "delta": "x"}\n\n: note\n'
    crlf = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in SAMPLE[6:9])
    rest = "".join(f"data: {json.dumps(c)}\n\n" for c in SAMPLE[9:])
    data = (one + multi + crlf + "retry: 5\n" + rest + "data: [DONE]\n\n").encode()
    want = [*SAMPLE[:6], {"type": "text-delta", "id": "t", "delta": "x"}, *SAMPLE[6:]]
    for i in range(len(data) + 1):
        for j in (i, min(len(data), i + 7)):
            d = StreamDecoder("sse")
            got = d.feed(data[:i]) + d.feed(data[i:j]) + d.feed(data[j:]) + d.end()
            assert got == want and d.done, (i, j)


def test_a_bad_one_line_event_fails_after_the_chunks_before_it() -> None:
    d = StreamDecoder("sse")
    assert d.feed(b'data: {"type": "start"}\n\ndata: {not json\n\ndata: {"type": "x"}\n\n') == [
        {"type": "start"}
    ]
    assert d.error is not None and d.error.reason == "invalid_json"
    long = StreamDecoder("sse", line_bytes_max=64)
    assert long.feed(b"data: " + b'"' + b"x" * 80 + b'"\n\n') == []
    assert long.error is not None and long.error.reason == "line_too_long"


def test_an_sse_event_may_span_several_data_lines_and_later_bytes_are_ignored() -> None:
    d = StreamDecoder("sse")
    got = d.feed(b'data: {"type":\ndata: "start"}\n\ndata: [DONE]\n\ndata: {"type": "x"}\n\n')
    assert got == [{"type": "start"}] and d.done and d.end() == []


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_chunk"),
        (b'{"type": "text-delta", "id": "t"}', "invalid_chunk"),  # no delta... defaulted
        (b'{"type": "made-up"}', "invalid_chunk"),
        (b'{"type": "tool-output-available", "toolCallId": "c"}', "invalid_chunk"),
        (b'{"type": "data-x"}', "invalid_chunk"),
    ],
)
def test_malformed_lines_fail_after_the_valid_chunks_before_them(line: bytes, reason: str) -> None:
    d = StreamDecoder("jsonl")
    if line.startswith(b'{"type": "text-delta"'):  # the delta defaults to "": a valid chunk
        assert d.feed(line + b"\n") == [{"type": "text-delta", "id": "t"}]
        return
    assert d.feed(b'{"type": "start"}\n' + line + b"\n" + b'{"type": "finish"}\n') == [
        {"type": "start"}
    ]
    with pytest.raises(StreamError) as e:
        d.feed(b"")
    assert e.value.reason == reason


def test_a_line_over_the_limit_is_refused_before_it_is_buffered_further() -> None:
    d = StreamDecoder("sse", line_bytes_max=64)
    assert d.feed(b"data: " + b"x" * 100) == []
    assert d.error is not None and d.error.reason == "line_too_long"


def test_framing_follows_the_content_type() -> None:
    assert framing_of("text/event-stream; charset=utf-8") == "sse"
    assert framing_of("application/x-ndjson") == "jsonl"
    assert framing_of("text/html") is None


def test_statuses_and_retry_after() -> None:
    assert _status_failure(404, "", 60).retryable is False
    assert _status_failure(408, "", 60).retryable is True
    assert _status_failure(500, "", 60).retryable is True
    assert _status_failure(429, "7", 60).after_s == 7
    assert _status_failure(503, "120", 60).after_s == 60
    assert _status_failure(500, "7", 60).after_s == 0
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 60) == 0
    assert _retry_after_s("soon", 60) == 0


def test_the_sample_assembles_into_valid_parts() -> None:
    a = Assembler()
    for c in SAMPLE:
        a.add(c)
    check_parts(a.parts)
    assert a.terminated == "finish" and a.metadata == {"model": "x", "usage": 3}
    assert [p["type"] for p in a.parts] == [
        "step-start", "reasoning", "text", "tool-search", "data-weather", "file", "source-url",
        "source-document",
    ]  # fmt: skip
    assert a.parts[2] == {"type": "text", "text": "Héllo, world\nline", "state": "done"}
    assert a.parts[4]["data"] == {"c": 21}


@pytest.mark.parametrize(
    "chunks",
    [
        [{"type": "text-delta", "id": "t", "delta": "x"}],
        [{"type": "tool-output-available", "toolCallId": "c", "output": 1}],
        [{"type": "error", "errorText": "boom"}],
        [{"type": "finish"}, {"type": "start-step"}],
    ],
)
def test_chunks_that_do_not_fit_fail_the_attempt(chunks: list[dict[str, Any]]) -> None:
    a = Assembler()
    with pytest.raises(StreamError):
        for c in chunks:
            a.add(c)


def test_the_reply_is_bounded() -> None:
    a = Assembler(bytes_max=10)
    a.add({"type": "text-start", "id": "t"})
    with pytest.raises(StreamError) as e:
        a.add({"type": "text-delta", "id": "t", "delta": "x" * 11})
    assert e.value.reason == "too_large"


# -- the assembler against a naive model -------------------------------------------------------
names = st.sampled_from(["a", "b", "search"])
texts = st.text(max_size=5)
values = st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2))


@st.composite
def part_chunks(draw: st.DrawFn, i: int) -> list[dict[str, Any]]:
    """The chunks of one part, in their own order."""
    kind = draw(st.sampled_from(["text", "reasoning", "tool", "data", "file", "source-url",
                                 "source-document", "step"]))  # fmt: skip
    if kind in ("text", "reasoning"):
        pid = f"{kind}{i}"
        deltas = draw(st.lists(texts, max_size=4))
        return [{"type": f"{kind}-start", "id": pid},
                *({"type": f"{kind}-delta", "id": pid, "delta": d} for d in deltas),
                *([{"type": f"{kind}-end", "id": pid}] if draw(st.booleans()) else [])]  # fmt: skip
    if kind == "tool":
        cid, name = f"call{i}", draw(names)
        dynamic = draw(st.booleans())
        out: list[dict[str, Any]] = []
        if draw(st.booleans()):
            out.append({"type": "tool-input-start", "toolCallId": cid, "toolName": name,
                        "dynamic": dynamic})  # fmt: skip
            out += [{"type": "tool-input-delta", "toolCallId": cid, "inputTextDelta": d}
                    for d in draw(st.lists(texts, max_size=3))]  # fmt: skip
        if draw(st.integers(0, 4)) == 0:
            out.append({"type": "tool-input-error", "toolCallId": cid, "toolName": name,
                        "input": draw(values), "errorText": "bad", "dynamic": dynamic})  # fmt: skip
            return out
        out.append({"type": "tool-input-available", "toolCallId": cid, "toolName": name,
                    "input": draw(values), "dynamic": dynamic})  # fmt: skip
        for _ in range(draw(st.integers(0, 2))):
            out.append({"type": "tool-output-available", "toolCallId": cid, "output": draw(values),
                        "preliminary": True})  # fmt: skip
        end = draw(st.sampled_from(["none", "output", "error"]))
        if end == "output":
            out.append({"type": "tool-output-available", "toolCallId": cid, "output": draw(values)})
        elif end == "error":
            out.append({"type": "tool-output-error", "toolCallId": cid, "errorText": "failed"})
        return out
    if kind == "data":
        name = draw(names)
        transient = draw(st.booleans())
        if draw(st.booleans()):
            return [{"type": f"data-{name}", "data": draw(values), "transient": transient}]
        return [{"type": f"data-{name}", "id": f"d{i}", "data": v}
                for v in draw(st.lists(values, min_size=1, max_size=3))]  # fmt: skip
    if kind == "file":
        return [{"type": "file", "url": f"https://f/{i}", "mediaType": "image/png"}]
    if kind == "source-url":
        return [{"type": "source-url", "sourceId": f"s{i}", "url": "https://s"}]
    if kind == "source-document":
        return [{"type": "source-document", "sourceId": f"s{i}", "mediaType": "text/plain",
                 "title": "doc"}]  # fmt: skip
    return [{"type": "start-step"}]


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A valid stream: the parts' chunks interleaved at random, each part's in its order,
    between a start and a finish or an abort, with metadata chunks anywhere."""
    queues = [draw(part_chunks(i)) for i in range(draw(st.integers(0, 6)))]
    out: list[dict[str, Any]] = [{"type": "start", "messageMetadata": {"m": 0}}]
    while any(queues):
        q = draw(st.sampled_from([q for q in queues if q]))
        out.append(q.pop(0))
        if draw(st.integers(0, 5)) == 0:
            out.append(draw(st.sampled_from([
                {"type": "finish-step"},
                {"type": "message-metadata", "messageMetadata": {"m": len(out)}},
            ])))  # fmt: skip
    out.append(draw(st.sampled_from([{"type": "finish", "messageMetadata": {"end": 1}},
                                     {"type": "abort"}])))  # fmt: skip
    return out


def _key(c: dict[str, Any], n: int) -> tuple[Any, ...]:
    t = c["type"]
    if t.split("-")[0] in ("text", "reasoning"):
        return ("text", c["id"])
    if t.startswith("tool-"):
        return ("tool", c["toolCallId"])
    if t.startswith("data-") and c.get("id") is not None:
        return ("data", t, c["id"])
    return ("single", n)


def naive(chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Group the chunks by part, in the order of each part's first chunk, then build each."""
    order: list[tuple[Any, ...]] = []
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    meta: dict[str, Any] = {}
    for n, c in enumerate(chunks):
        if c["type"] in ("start", "message-metadata", "finish", "abort", "finish-step"):
            meta.update(c.get("messageMetadata") or {})
            continue
        if c["type"].startswith("data-") and c.get("transient"):
            continue
        key = _key(c, n)
        if key not in groups:
            order.append(key)
        groups[key].append(c)
    finished = chunks[-1]["type"] == "finish"
    parts = []
    for key in order:
        cs = groups[key]
        first, last = cs[0], cs[-1]
        t = first["type"]
        if key[0] == "text":
            family = t.split("-")[0]
            done = finished or last["type"].endswith("-end")
            parts.append({"type": family, "text": "".join(c.get("delta", "") for c in cs),
                          "state": "done" if done else "streaming"})  # fmt: skip
        elif key[0] == "tool":
            name = first["toolName"]
            part: dict[str, Any] = (
                {"type": "dynamic-tool", "toolName": name} if first.get("dynamic")
                else {"type": f"tool-{name}"}
            )  # fmt: skip
            part["toolCallId"] = first["toolCallId"]
            inputs = [c for c in cs if "input" in c]
            if inputs:
                part["input"] = inputs[-1]["input"]
            outputs = [c for c in cs if c["type"] == "tool-output-available"]
            if outputs:
                part["output"] = outputs[-1]["output"]
                if outputs[-1].get("preliminary"):
                    part["preliminary"] = True
            states = {"tool-input-start": "input-streaming",
                      "tool-input-available": "input-available",
                      "tool-input-error": "output-error", "tool-output-error": "output-error",
                      "tool-output-available": "output-available"}  # fmt: skip
            part["state"] = states[[c for c in cs if c["type"] in states][-1]["type"]]
            errors = [c for c in cs if "errorText" in c]
            if errors and part["state"] == "output-error":
                part["errorText"] = errors[-1]["errorText"]
            if part["state"] == "input-streaming":
                part["rawInput"] = "".join(c.get("inputTextDelta", "") for c in cs)
            parts.append(part)
        elif key[0] == "data":
            parts.append({"type": t, "data": last["data"], "id": last["id"]})
        elif t.startswith("data-"):
            parts.append({"type": t, "data": first["data"]})
        elif t == "start-step":
            parts.append({"type": "step-start"})
        else:
            parts.append({k: v for k, v in first.items()})
    return parts, meta, "finish" if finished else "abort"


@settings(max_examples=300, deadline=None)
@given(streams())
def test_the_assembler_matches_the_naive_model(chunks: list[dict[str, Any]]) -> None:
    a = Assembler()
    for c in chunks:
        a.add(c)
    parts, meta, end = naive(chunks)
    assert a.terminated == end and a.metadata == meta
    assert a.parts == parts
    check_parts(a.parts)


def test_the_generator_covers_every_chunk_type() -> None:
    seen: set[str] = set()

    @settings(max_examples=200, deadline=None)
    @given(streams())
    def collect(chunks: list[dict[str, Any]]) -> None:
        seen.update("data-*" if c["type"].startswith("data-") else c["type"] for c in chunks)

    collect()
    assert set(CHUNK_TYPES) - {"error"} <= seen and "data-*" in seen
