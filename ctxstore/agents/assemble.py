"""One assistant message from an agent's validated chunks (ctxstore/agents/stream.py), in the
AI SDK UI-message shape (wire/parts.py), as the AI SDK's own client assembles it.

Rules of this file:
- Parts appear in the order their first chunk came.  Text and reasoning parts are found by
  their ``id`` (``*-start`` opens one, ``*-delta`` appends, ``*-end`` marks it ``done``); tool
  parts by ``toolCallId`` (``tool-<name>``, or ``dynamic-tool`` with ``toolName`` when the chunk
  says ``dynamic``), moving through the states input-streaming -> input-available ->
  output-available | output-error; ``data-*`` parts are replaced by (type, ``id``) and left out
  when ``transient``; ``start-step`` adds a ``step-start`` part; ``file`` and ``source-*`` add
  their part.  ``start``, ``message-metadata`` and ``finish`` merge ``messageMetadata`` into the
  message's metadata.
- ``finish`` or ``abort`` ends the message (``terminated``); an ``error`` chunk, or a chunk that
  does not fit what came before (a delta for an id never started, an output for an unknown tool
  call), raises ``StreamError`` (the attempt fails).  Bounded: at most ``PARTS_MAX`` parts and
  ``bytes_max`` bytes of text, input and output deltas.
"""

from __future__ import annotations

from typing import Any, Final

from wire.parts import PARTS_MAX

from .stream import StreamError

BYTES_MAX: Final = 1024 * 1024


class Assembler:
    def __init__(self, bytes_max: int = BYTES_MAX) -> None:
        self.parts: list[dict[str, Any]] = []
        self.metadata: dict[str, Any] = {}
        self.terminated: str | None = None  # "finish" | "abort"
        self.finish_reason: str | None = None
        self.chunks = 0
        self.bytes_max = bytes_max
        self._bytes = 0
        self._text: dict[tuple[str, str], dict[str, Any]] = {}  # (type, id) -> part
        self._tools: dict[str, dict[str, Any]] = {}  # toolCallId -> part
        self._data: dict[tuple[str, str], int] = {}  # (type, id) -> index in parts

    def add(self, chunk: dict[str, Any]) -> None:
        if self.terminated is not None:
            raise StreamError("after_end", f"a {chunk['type']} chunk after {self.terminated}")
        self.chunks += 1
        kind: str = chunk["type"]
        family, _, what = kind.partition("-")
        if family in ("text", "reasoning") and what in ("start", "delta", "end"):
            self._text_chunk(family, what, chunk)
        elif kind.startswith("tool-"):
            self._tool_chunk(kind, chunk)
        elif family == "data":
            self._data_chunk(kind, chunk)
        elif kind == "start-step":
            self._add({"type": "step-start"})
        elif kind == "file":
            self._add({"type": "file", "mediaType": chunk["mediaType"], "url": chunk["url"]})
        elif kind in ("source-url", "source-document"):
            keep = ("sourceId", "url", "title", "mediaType", "filename", "providerMetadata")
            self._add({"type": kind, **{k: chunk[k] for k in keep if chunk.get(k) is not None}})
        elif kind in ("start", "message-metadata", "finish"):
            meta = chunk.get("messageMetadata")
            if meta:
                self.metadata.update(meta)
            if kind == "finish":
                self.terminated = "finish"
                self.finish_reason = chunk.get("finishReason")
                for part in self._text.values():
                    part["state"] = "done"
        elif kind == "abort":
            self.terminated = "abort"
            self.finish_reason = chunk.get("reason")
        elif kind == "error":
            raise StreamError("agent_error", f"the agent reported: {chunk['errorText'][:1024]}")
        # finish-step: nothing to store

    def _add(self, part: dict[str, Any]) -> int:
        if len(self.parts) >= PARTS_MAX:
            raise StreamError("too_large", f"more than {PARTS_MAX} parts")
        self.parts.append(part)
        return len(self.parts) - 1

    def _count(self, text: str) -> None:
        self._bytes += len(text)
        if self._bytes > self.bytes_max:
            raise StreamError("too_large", f"the reply is over {self.bytes_max} bytes")

    def _text_chunk(self, family: str, what: str, chunk: dict[str, Any]) -> None:
        key = (family, chunk["id"])
        part = self._text.get(key)
        if what == "start":
            part = {"type": family, "text": "", "state": "streaming"}
            if chunk.get("providerMetadata"):
                part["providerMetadata"] = chunk["providerMetadata"]
            self._add(part)
            self._text[key] = part
            return
        if part is None:
            raise StreamError("out_of_order", f"{family}-{what} for {chunk['id']!r} never started")
        if what == "delta":
            self._count(chunk["delta"])
            part["text"] += chunk["delta"]
        else:
            part["state"] = "done"

    def _tool_chunk(self, kind: str, chunk: dict[str, Any]) -> None:
        call_id: str = chunk["toolCallId"]
        part = self._tools.get(call_id)
        if kind in ("tool-input-start", "tool-input-available", "tool-input-error"):
            if part is None:
                name = chunk["toolName"]
                part = {"type": f"tool-{name}", "toolCallId": call_id}
                if chunk.get("dynamic"):
                    part = {"type": "dynamic-tool", "toolName": name, "toolCallId": call_id}
                self._add(part)
                self._tools[call_id] = part
            if chunk.get("providerExecuted") is not None:
                part["providerExecuted"] = chunk["providerExecuted"]
            if kind == "tool-input-start":
                part["state"] = "input-streaming"
            elif kind == "tool-input-available":
                part["state"], part["input"] = "input-available", chunk["input"]
            else:
                part["state"], part["input"] = "output-error", chunk["input"]
                part["errorText"] = chunk.get("errorText", "")
            if kind != "tool-input-start":
                part.pop("rawInput", None)  # the streamed input text, now parsed
            return
        if part is None:
            raise StreamError("out_of_order", f"{kind} for unknown tool call {call_id!r}")
        if kind == "tool-input-delta":
            self._count(chunk["inputTextDelta"])
            part["rawInput"] = part.get("rawInput", "") + chunk["inputTextDelta"]
        elif kind == "tool-output-available":
            self._count(str(chunk["output"]))
            part["state"], part["output"] = "output-available", chunk["output"]
            if chunk.get("preliminary"):
                part["preliminary"] = True
            else:
                part.pop("preliminary", None)
        elif kind == "tool-output-error":
            part["state"], part["errorText"] = "output-error", chunk["errorText"]
        else:
            raise StreamError("invalid_chunk", f"unknown chunk type {kind!r}")

    def _data_chunk(self, kind: str, chunk: dict[str, Any]) -> None:
        if chunk.get("transient"):
            return  # shown live, never stored
        self._count(str(chunk["data"]))
        part: dict[str, Any] = {"type": kind, "data": chunk["data"]}
        data_id = chunk.get("id")
        if data_id is None:
            self._add(part)
            return
        part["id"] = data_id
        at = self._data.get((kind, data_id))
        if at is None:
            self._data[(kind, data_id)] = self._add(part)
        else:
            self.parts[at] = part


__all__ = ["BYTES_MAX", "Assembler"]
