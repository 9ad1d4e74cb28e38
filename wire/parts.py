"""Structured message parts: the AI SDK UI-message part shapes, validated at the boundary.

Rules of this file:
- A part travels as a map with a ``type`` key and camelCase keys, exactly as the AI SDK's
  ``UIMessage.parts`` (so a browser can hand its messages over unchanged).  One Struct per
  part shape is its schema: unknown keys are refused, optional keys may be left out.
- ``type`` picks the schema: the fixed names of ``PART_TYPES``, plus the open families
  ``tool-<name>`` (a typed tool call) and ``data-<name>`` (application data), whose name is
  checked against ``PART_NAME_PATTERN``.  Any other type is refused.
- ``check_parts`` validates a list of decoded maps in place of a tagged union (msgspec's tags
  are exact values, these families are prefixes); the maps themselves are what is stored and
  served (validation does not rewrite them).  A failure raises ``PartError`` whose ``path``
  names the offending key (``parts[2].toolCallId``).
- A tool part's ``state`` decides what it must carry: ``input-available`` an ``input``,
  ``output-available`` an ``output``, ``output-error`` an ``errorText``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

PARTS_MAX: Final = 1024  # parts of one message
PART_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"
_NAME = re.compile(PART_NAME_PATTERN)
_FIELD_IN_MESSAGE = re.compile(r"(?:required|unknown) field `([^`]+)`")

Role = Literal["user", "assistant", "system", "tool"]
TextState = Literal["streaming", "done"]
ToolState = Literal[
    "input-streaming",
    "input-available",
    "approval-requested",
    "approval-responded",
    "output-available",
    "output-error",
    "output-denied",
]
ShortStr = Annotated[str, Meta(max_length=1024)]
ProviderMetadata = dict[str, Any]


class _Part(msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    type: str


class TextPart(_Part):
    text: str
    state: TextState | None = None
    provider_metadata: ProviderMetadata | None = None


class ReasoningPart(_Part):
    text: str
    state: TextState | None = None
    provider_metadata: ProviderMetadata | None = None


class StepStartPart(_Part):
    pass


class FilePart(_Part):
    media_type: ShortStr
    url: str  # an http(s) URL or a data: URL
    filename: ShortStr | None = None
    provider_metadata: ProviderMetadata | None = None


class SourceUrlPart(_Part):
    source_id: ShortStr
    url: str
    title: str | None = None
    provider_metadata: ProviderMetadata | None = None


class SourceDocumentPart(_Part):
    source_id: ShortStr
    media_type: ShortStr
    title: str
    filename: ShortStr | None = None
    provider_metadata: ProviderMetadata | None = None


class ToolApproval(msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    id: ShortStr
    approved: bool | None = None
    reason: str | None = None


class ToolPart(_Part):
    """``tool-<name>``: a call of the tool ``name`` and, once it ran, its result."""

    tool_call_id: ShortStr
    state: ToolState
    input: Any = None
    output: Any = None
    error_text: str | None = None
    raw_input: Any = None
    provider_executed: bool | None = None
    preliminary: bool | None = None
    call_provider_metadata: ProviderMetadata | None = None
    approval: ToolApproval | None = None


class DynamicToolPart(ToolPart):
    """``dynamic-tool``: a call of a tool not known in advance, named by ``toolName``."""

    tool_name: ShortStr = ""


class DataPart(_Part):
    """``data-<name>``: application data (``id`` lets a later chunk replace it)."""

    data: Any
    id: ShortStr | None = None


PART_TYPES: Final[dict[str, type[_Part]]] = {
    "text": TextPart,
    "reasoning": ReasoningPart,
    "step-start": StepStartPart,
    "file": FilePart,
    "source-url": SourceUrlPart,
    "source-document": SourceDocumentPart,
    "dynamic-tool": DynamicToolPart,
}
"""The part types with a fixed name; ``tool-<name>`` and ``data-<name>`` come besides."""

TEXT_TYPES: Final = frozenset({"text", "reasoning"})  # parts whose ``text`` is their content
_REQUIRED_BY_STATE: Final = {
    "input-available": "input",
    "output-available": "output",
    "output-error": "errorText",
}


class PartError(ValueError):
    """A part that does not fit its schema; ``path`` names where (``parts[1].state``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def schema_of(part_type: str) -> type[_Part] | None:
    """The Struct that validates a part of type ``part_type``, None for an unknown type."""
    schema = PART_TYPES.get(part_type)
    if schema is not None:
        return schema
    family, _, name = part_type.partition("-")
    if family in ("tool", "data") and _NAME.match(name):
        return ToolPart if family == "tool" else DataPart
    return None


def check_part(part: Any, path: str) -> None:
    """Validate one decoded part (a map); raises ``PartError`` naming the offending key."""
    if not isinstance(part, dict):
        raise PartError(path, f"a part is an object with a type, not {type(part).__name__}")
    part_type = part.get("type")
    if not isinstance(part_type, str):
        raise PartError(f"{path}.type", "missing, or not a string")
    schema = schema_of(part_type)
    if schema is None:
        raise PartError(
            f"{path}.type",
            f"unknown part type {part_type[:64]!r} (known: {', '.join(PART_TYPES)}, "
            "tool-<name>, data-<name>)",
        )
    try:
        msgspec.convert(part, schema)
    except msgspec.ValidationError as e:
        text = str(e)
        where, _, rest = text.rpartition(" - at `$")
        if where:
            path, text = f"{path}{rest.rstrip('`')}", where
        field = _FIELD_IN_MESSAGE.search(text)
        if field is not None:  # "missing required field `x`", "unknown field `x`"
            path = f"{path}.{field.group(1)}"
        raise PartError(path, text) from None
    if schema is ToolPart or schema is DynamicToolPart:
        if schema is DynamicToolPart and not part.get("toolName"):
            raise PartError(f"{path}.toolName", "a dynamic-tool part names its tool")
        needed = _REQUIRED_BY_STATE.get(part["state"])
        if needed is not None and needed not in part:
            raise PartError(f"{path}.{needed}", f"required in state {part['state']!r}")


def check_parts(parts: list[Any], path: str = "parts") -> None:
    """Validate a message's parts (at most ``PARTS_MAX``); raises ``PartError``."""
    if len(parts) > PARTS_MAX:
        raise PartError(path, f"{len(parts)} parts, at most {PARTS_MAX}")
    for i, part in enumerate(parts):
        check_part(part, f"{path}[{i}]")


def part_text(part: dict[str, Any]) -> str | None:
    """The text of a text or reasoning part, None for other parts."""
    return part["text"] if part["type"] in TEXT_TYPES else None


def matches(part_type: str, prefixes: list[str]) -> bool:
    """Whether ``part_type`` starts with one of ``prefixes`` (``tool-`` matches every tool)."""
    return any(part_type.startswith(p) for p in prefixes)


__all__ = [
    "PARTS_MAX",
    "PART_NAME_PATTERN",
    "PART_TYPES",
    "TEXT_TYPES",
    "DataPart",
    "DynamicToolPart",
    "FilePart",
    "PartError",
    "ReasoningPart",
    "Role",
    "SourceDocumentPart",
    "SourceUrlPart",
    "StepStartPart",
    "TextPart",
    "ToolApproval",
    "ToolPart",
    "check_part",
    "check_parts",
    "matches",
    "part_text",
    "schema_of",
]
