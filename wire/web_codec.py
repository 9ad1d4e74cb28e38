"""The two encodings of the WebSocket protocol (docs/web.md): native frames in, messages out.

A WebSocket connection (served by ``ctxstore.web``) is a native connection (``wire.aio.Connection``)
whose bytes travel in WebSocket messages: one message is one native frame's body.  This module
converts between the two, for each subprotocol:

- ``ctxstore.v1.msgpack``: binary messages holding the native msgpack body unchanged.
- ``ctxstore.v1.json``: text messages holding a JSON object: the message's fields by name,
  plus ``"type"``, its tag (``{"type": "ping", "rid": 1}``).  The objects' shapes are derived
  from the native Structs (``wire.protocol``) by ``json_twin``: the same fields, types, limits
  and tags, as objects instead of arrays; nothing is written down twice.

Rules of this file:
- Requests are validated once, by the native core (``wire.framing``): a JSON request is turned
  into the native array (its fields in schema order, a field left out that has a default (the
  fields a protocol version appended) given its default, cut at the first other missing one)
  and fed to the core, which answers a bad one exactly as on the native port (``bad_request``
  naming the field, the connection kept when the ``rid`` is readable; otherwise the goodbye,
  then close).
  Only JSON that is not an object (or no JSON at all) is refused here, as an undecodable frame.
- What the core writes is a run of whole native frames; each becomes one WebSocket message.
"""

from __future__ import annotations

import base64
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import msgspec
import msgspec.json
import msgspec.msgpack

from .framing import HEADER, REQUEST_TYPES
from .protocol import (
    ContextConfig,
    Error,
    InboxEntry,
    Message,
    Push,
    Request,
    Response,
    Segment,
    Session,
)

JSON: Final = "ctxstore.v1.json"
MSGPACK: Final = "ctxstore.v1.msgpack"
SUBPROTOCOLS: Final = (JSON, MSGPACK)
Subprotocol = Literal["ctxstore.v1.json", "ctxstore.v1.msgpack"]

# array-like Structs nested in messages
_DATA_TYPES: Final = (Session, Message, InboxEntry, ContextConfig, Segment)
_GOODBYE_HEAD: Final = b"\x96\xa5error\x00"  # msgpack of an Error's array, tag and rid 0


class Undecodable(Exception):
    """A WebSocket message that is not a request at all (the connection must close)."""


# -- the JSON twins ----------------------------------------------------------------------------
_twins: dict[type[Any], type[msgspec.Struct]] = {}


def json_twin(cls: type[Any]) -> type[msgspec.Struct]:
    """The JSON-object Struct of the array-like Struct ``cls``: the same fields in the same
    order with the same types and limits (nested data Structs replaced by their twins), the
    same tag in a ``"type"`` field, unknown fields refused as ``cls`` refuses them."""
    twin = _twins.get(cls)
    if twin is not None:
        return twin
    config = cls.__struct_config__
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [(name, _twin_type(hints[name])) for name in cls.__struct_fields__]
    tag = config.tag if isinstance(config.tag, str) else None
    twin = msgspec.defstruct(
        cls.__name__,
        fields,
        tag=tag,
        tag_field="type" if tag is not None else None,
        forbid_unknown_fields=config.forbid_unknown_fields,
        module=__name__,
    )
    _twins[cls] = twin
    return twin


def _twin_type(tp: Any) -> Any:
    if tp in _DATA_TYPES:
        return json_twin(tp)
    origin = get_origin(tp)
    if origin is None or origin is Literal:
        return tp
    args = get_args(tp)
    if origin is Annotated:
        return Annotated[(_twin_type(args[0]), *tp.__metadata__)]
    if origin is Union or origin is types.UnionType:
        return Union[tuple(_twin_type(a) for a in args)]  # noqa: UP007
    return origin[tuple(_twin_type(a) for a in args)]


def twin_type(tp: Any) -> Any:
    """The JSON type of a native field's type (data Structs replaced by their twins)."""
    return _twin_type(tp)


def _union(members: tuple[type[Any], ...]) -> Any:
    return Union[tuple(json_twin(t) for t in members)]  # noqa: UP007


REQUEST_TWINS: Final[Any] = _union(REQUEST_TYPES)
"""The JSON requests, a tagged union (for clients and tests; the server decodes natively)."""
SERVER_MESSAGE_TWINS: Final[Any] = _union(get_args(Response) + get_args(Push))
"""The JSON responses and pushes, one tagged union (what a JSON client decodes)."""

_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    t.__struct_config__.tag: t.__struct_fields__ for t in REQUEST_TYPES
}


def _defaults(t: Any) -> dict[str, Any]:
    fields, defaults = t.__struct_fields__, t.__struct_defaults__
    return dict(zip(fields[len(fields) - len(defaults) :], defaults, strict=True))


_DEFAULTS: Final[dict[str, dict[str, Any]]] = {
    t.__struct_config__.tag: _defaults(t) for t in REQUEST_TYPES
}
"""The request fields a JSON object may leave out (the later versions' fields): a client of
an earlier version leaves them all out, a later one may give some (``parts``) and not others
(``role``), which must not cut its request short."""
_json_decoder: Final = msgspec.json.Decoder()


def json_stand_in(obj: Any) -> Any:
    """The JSON form of a value msgpack holds and JSON has not: a msgpack extension (an
    ``enc_hook``).  Servers refuse such values in what clients store (wire/framing.py
    ``value_fault``); a message stored before they did, or a native client's own data, still
    reads."""
    if isinstance(obj, msgspec.msgpack.Ext):
        return {"msgpack_ext": obj.code, "data": base64.b64encode(obj.data).decode()}
    raise TypeError(f"{type(obj).__name__} has no JSON form")  # (msgspec passes it on)


_json_encoder: Final = msgspec.json.Encoder(enc_hook=json_stand_in)
_msgpack_encoder: Final = msgspec.msgpack.Encoder()
_server_message_decoder: Final = msgspec.msgpack.Decoder(Response | Push)


def to_json_object(message: Request | Response | Push) -> msgspec.Struct:
    """The JSON twin of a native message (nested data included)."""
    twin = json_twin(type(message))
    return msgspec.convert(message, twin, from_attributes=True)


def from_json_object(obj: msgspec.Struct) -> Request | Response | Push:
    """The native message of a JSON twin (for clients and tests)."""
    native = next(n for n, t in _twins.items() if t is type(obj))
    return msgspec.convert(obj, native, from_attributes=True)  # type: ignore[no-any-return]


# -- requests in -------------------------------------------------------------------------------
def frame_of_json(text: bytes | bytearray) -> bytearray:
    """The native frame of a JSON request (for the core to validate); ``Undecodable`` if the
    text is not a JSON object."""
    try:
        obj = _json_decoder.decode(text)
    except msgspec.DecodeError as e:
        raise Undecodable(f"undecodable JSON: {e}") from None
    except RecursionError:  # nested deeper than the decoder goes (metadata: 32 levels)
        raise Undecodable("undecodable JSON: nested too deeply") from None
    if type(obj) is not dict:
        raise Undecodable(f"a request is a JSON object, not {type(obj).__name__}")
    tag = obj.get("type")
    if not isinstance(tag, str):
        tag = ""  # the core's "unknown request type" (bad_request for a readable rid)
    fields = _FIELDS.get(tag)
    items: list[Any] = [tag]
    if fields is None:  # the core names the unknown type (for the rid, if readable)
        if "rid" in obj:
            items.append(obj["rid"])
    else:
        defaults = _DEFAULTS[tag]
        for name in fields:
            if name in obj:
                items.append(obj[name])
            elif name in defaults:
                items.append(defaults[name])
            else:
                break  # the core names the first missing field
        unknown = [v for k, v in obj.items() if k != "type" and k not in fields]
        items.extend(unknown)  # a field the schema does not have: the core refuses it
    return frame_of_items(items)


def frame_of_items(items: list[Any]) -> bytearray:
    buf = bytearray(HEADER.size)
    try:
        _msgpack_encoder.encode_into(items, buf, HEADER.size)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:  # an integer too big
        raise Undecodable(f"a value msgpack cannot hold: {e}") from None
    HEADER.pack_into(buf, 0, len(buf) - HEADER.size)
    return buf


def frame_of_body(body: bytes | bytearray) -> bytearray:
    """The native frame of a msgpack request body."""
    buf = bytearray(HEADER.pack(len(body)))
    buf += body
    return buf


# -- messages out ------------------------------------------------------------------------------
def bodies(frames: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """The bodies of a run of whole native frames (what the core writes)."""
    view = memoryview(frames)
    pos, end = 0, len(view)
    while pos < end:
        (length,) = HEADER.unpack_from(view, pos)
        start = pos + HEADER.size
        pos = start + length
        assert pos <= end, "the core writes whole frames"
        yield view[start:pos]


def goodbye_of(body: memoryview) -> tuple[str, str] | None:
    """``(code, message)`` of ``Error{rid: 0}`` (the core's last word) if ``body`` is one."""
    if bytes(body[: len(_GOODBYE_HEAD)]) != _GOODBYE_HEAD:
        return None
    message = _server_message_decoder.decode(body)
    return (message.code, message.message) if type(message) is Error else None


def json_text(body: memoryview) -> str:
    """The JSON text of a native response or push body."""
    message = _server_message_decoder.decode(body)
    return _json_encoder.encode(to_json_object(message)).decode()


def encode_json(obj: Any) -> bytes:
    """JSON of a twin (or any value), metadata's msgpack-only values as their stand-ins."""
    return _json_encoder.encode(obj)


def json_request(request: Request) -> bytes:
    """The JSON text of a request (for clients and tests)."""
    return _json_encoder.encode(to_json_object(request))


__all__ = [
    "JSON",
    "MSGPACK",
    "REQUEST_TWINS",
    "SERVER_MESSAGE_TWINS",
    "SUBPROTOCOLS",
    "Subprotocol",
    "Undecodable",
    "bodies",
    "encode_json",
    "frame_of_body",
    "frame_of_json",
    "from_json_object",
    "goodbye_of",
    "json_request",
    "json_text",
    "json_twin",
    "to_json_object",
    "twin_type",
]
