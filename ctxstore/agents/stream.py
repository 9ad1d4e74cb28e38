"""The AI SDK UI message stream, sans I/O: bytes of an agent's response in, validated chunks out.

Rules of this file:
- Two framings, chosen by the response's content type (``framing_of``): **SSE**
  (``text/event-stream``: events of ``data:`` lines ended by a blank line, ``data: [DONE]`` ends
  the stream; ``event:``, ``id:``, ``retry:`` and ``:`` comment lines are ignored) and **JSONL**
  (one JSON object a line; blank lines are skipped).
- Each chunk is a JSON object whose ``type`` picks its schema (``CHUNK_TYPES``, plus the open
  family ``data-<name>``); it is validated with msgspec and handed on as the decoded map (keys
  as the agent sent them; unknown keys are ignored, as the AI SDK does).  Anything else (a line
  that is not JSON, an unknown type, a missing field, a line over ``line_bytes_max``) raises
  ``StreamError``: the attempt fails and is retried (docs/agents.md).
- SSE events of one ``data: `` line (what agents write) are cut out whole; any other shape is
  read line by line.  Both give the same chunks wherever the bytes are split.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import msgspec
import msgspec.json

LINE_BYTES_MAX: Final = 1024 * 1024  # one SSE event or JSONL line
Framing = Literal["sse", "jsonl"]
_DATA_NAME = re.compile(r"^data-[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")


class StreamError(ValueError):
    """The agent's stream is malformed (``reason``: a stable word for metrics)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Chunk(msgspec.Struct, rename="camel"):
    type: str


class _Id(_Chunk):
    id: str
    provider_metadata: dict[str, Any] | None = None


class _Delta(_Id):
    delta: str = ""


class _ErrorChunk(_Chunk):
    error_text: str


class _ToolStart(_Chunk):
    tool_call_id: str
    tool_name: str
    provider_executed: bool | None = None
    dynamic: bool | None = None


class _ToolDelta(_Chunk):
    tool_call_id: str
    input_text_delta: str


class _ToolInput(_Chunk):
    tool_call_id: str
    tool_name: str
    input: Any
    provider_executed: bool | None = None
    dynamic: bool | None = None


class _ToolInputError(_ToolInput):
    error_text: str = ""


class _ToolOutput(_Chunk):
    tool_call_id: str
    output: Any
    provider_executed: bool | None = None
    dynamic: bool | None = None
    preliminary: bool | None = None


class _ToolOutputError(_Chunk):
    tool_call_id: str
    error_text: str
    provider_executed: bool | None = None
    dynamic: bool | None = None


class _SourceUrl(_Chunk):
    source_id: str
    url: str
    title: str | None = None


class _SourceDocument(_Chunk):
    source_id: str
    media_type: str
    title: str
    filename: str | None = None


class _File(_Chunk):
    url: str
    media_type: str


class _Data(_Chunk):
    data: Any
    id: str | None = None
    transient: bool | None = None


class _Start(_Chunk):
    message_id: str | None = None
    message_metadata: dict[str, Any] | None = None


class _Finish(_Chunk):
    message_metadata: dict[str, Any] | None = None
    finish_reason: str | None = None


class _Abort(_Chunk):
    reason: str | None = None


class _Metadata(_Chunk):
    message_metadata: dict[str, Any]


CHUNK_TYPES: Final[dict[str, type[_Chunk]]] = {
    "start": _Start,
    "text-start": _Id,
    "text-delta": _Delta,
    "text-end": _Id,
    "reasoning-start": _Id,
    "reasoning-delta": _Delta,
    "reasoning-end": _Id,
    "tool-input-start": _ToolStart,
    "tool-input-delta": _ToolDelta,
    "tool-input-available": _ToolInput,
    "tool-input-error": _ToolInputError,
    "tool-output-available": _ToolOutput,
    "tool-output-error": _ToolOutputError,
    "source-url": _SourceUrl,
    "source-document": _SourceDocument,
    "file": _File,
    "start-step": _Chunk,
    "finish-step": _Chunk,
    "message-metadata": _Metadata,
    "finish": _Finish,
    "abort": _Abort,
    "error": _ErrorChunk,
}
"""The chunk types with a fixed name; ``data-<name>`` comes besides."""

_json = msgspec.json.Decoder()


def framing_of(content_type: str) -> Framing | None:
    """The framing of a response by its content type, None for one that is neither."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    if media in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines",
                 "application/json-seq", "application/json", "text/plain"):  # fmt: skip
        return "jsonl"
    return None


def check_chunk(obj: Any) -> dict[str, Any]:
    """A decoded chunk validated by its type; raises ``StreamError``."""
    if not isinstance(obj, dict):
        raise StreamError("invalid_chunk", f"a chunk is a JSON object, not {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise StreamError("invalid_chunk", "a chunk without a string type")
    schema = CHUNK_TYPES.get(kind)
    if schema is None:
        if not _DATA_NAME.match(kind):
            raise StreamError("invalid_chunk", f"unknown chunk type {kind[:64]!r}")
        schema = _Data
    try:
        msgspec.convert(obj, schema)
    except msgspec.ValidationError as e:
        raise StreamError("invalid_chunk", f"{kind} chunk: {e}") from None
    return obj


def _decode(line: bytes) -> dict[str, Any]:
    try:
        obj = _json.decode(line)
    except msgspec.DecodeError as e:
        raise StreamError("invalid_json", f"not JSON: {e}") from None
    return check_chunk(obj)


class StreamDecoder:
    """``feed(bytes)`` -> the chunks completed by them; ``end()`` at the end of the body.
    ``done``: ``[DONE]`` was seen (later bytes are ignored).  A malformed line ends the
    decoding: ``feed`` returns the valid chunks before it, and ``error`` holds the
    ``StreamError`` (raised by every later ``feed`` and ``end``)."""

    def __init__(self, framing: Framing, line_bytes_max: int = LINE_BYTES_MAX) -> None:
        self.framing = framing
        self.line_bytes_max = line_bytes_max
        self.done = False
        self.error: StreamError | None = None
        self._buffer = bytearray()
        self._data: list[bytes] = []  # SSE: the data lines of the event being read
        self._data_bytes = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self.error is not None:
            raise self.error
        if self.done:
            return []
        buf = self._buffer
        buf += data
        out: list[dict[str, Any]] = []
        start = self._whole_events(buf, out) if self.framing == "sse" else 0
        while not self.done and self.error is None:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            try:
                self._line(line, out)
            except StreamError as e:
                self.error = e
                break
        del buf[:start]
        if self.error is None and len(buf) > self.line_bytes_max:
            self.error = StreamError("line_too_long", f"a line over {self.line_bytes_max} bytes")
        return out

    def _whole_events(self, buf: bytearray, out: list[dict[str, Any]]) -> int:
        """The common case at once: the complete events at the front of ``buf`` that are one
        ``data: `` line each (what agents write), without going line by line.  Where the line
        by line reading goes on: at the first event of any other shape (several lines, other
        fields, comments, CRLF), or what is not complete yet."""
        if self._data:  # an event begun in an earlier feed: line by line
            return 0
        start = 0
        while not self.done:
            end = buf.find(b"\n\n", start)
            if end < 0 or not buf.startswith(b"data: ", start):
                break
            value = bytes(buf[start + 6 : end])
            if b"\n" in value or b"\r" in value:
                break
            start = end + 2
            if len(value) > self.line_bytes_max:
                self.error = StreamError(
                    "line_too_long", f"an event over {self.line_bytes_max} bytes"
                )
                break
            if value.strip() == b"[DONE]":
                self.done = True
                break
            try:
                out.append(_decode(value))
            except StreamError as e:
                self.error = e
                break
        return start

    def end(self) -> list[dict[str, Any]]:
        """The chunks of a last line without its newline (and of an SSE event not ended by a
        blank line)."""
        if self.error is not None:
            raise self.error
        out: list[dict[str, Any]] = []
        if not self.done and self._buffer:
            line = bytes(self._buffer).rstrip(b"\r")
            self._buffer.clear()
            self._line(line, out)
        if not self.done and self._data:
            self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[dict[str, Any]]) -> None:
        if self.framing == "jsonl":
            if line.strip():
                out.append(_decode(line))
            return
        if not line:  # the end of an SSE event
            if self._data:
                data = b"\n".join(self._data)
                self._data.clear()
                self._data_bytes = 0
                if data.strip() == b"[DONE]":
                    self.done = True
                else:
                    out.append(_decode(data))
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if field != b"data":
            return  # event, id, retry and unknown fields
        if value.startswith(b" "):
            value = value[1:]
        self._data_bytes += len(value)
        if self._data_bytes > self.line_bytes_max:
            raise StreamError("line_too_long", f"an event over {self.line_bytes_max} bytes")
        self._data.append(value)


__all__ = ["CHUNK_TYPES", "LINE_BYTES_MAX", "StreamDecoder", "StreamError", "check_chunk",
           "framing_of"]  # fmt: skip
