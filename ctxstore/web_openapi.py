"""The OpenAPI 3.1 document of the HTTP API (``GET /v1/openapi.json``), generated from the routes
(``web_http.Route``) and the JSON shapes derived from the native schemas: the schemas are
msgspec's (``msgspec.json.schema_components``) of the very types that decode the requests and
encode the answers, so the document cannot drift from what is served.  One exception: a
message's ``parts`` are plain maps to the codec (``wire.parts.check_parts`` validates them, as
their types are prefix families no tag expresses), so their schema (``Part``) is generated from
``wire.parts``' Structs and put in place of the maps' ``{"type": "object"}``."""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.json

from wire.parts import PART_NAME_PATTERN, PART_TYPES, PARTS_MAX, DataPart, ToolPart
from wire.protocol import ContextEvent, Error, GapEvent, InboxDelta, Message, SubscriptionClosed
from wire.web_codec import json_twin, twin_type

from .web_transports import Transports

if TYPE_CHECKING:
    from .web_http import Route

REF = "#/components/schemas/{name}"
ERROR_STATUSES = ("400", "401", "403", "404", "409", "413", "429", "500", "503", "504")
SSE_EVENTS = """Server-Sent Events (text/event-stream), each `data:` one JSON object:
`subscribed` / `snapshot` first (schema: the 200 answer's), then
`message` (default event type; `id:` the message's seq; data: Message),
`gap` (`id:` its to_seq; data: GapEventAnswer), `delta` (data: InboxDeltaAnswer),
`context` (with `?context_events=true`; data: ContextEventAnswer),
`closed` (data: SubscriptionClosedAnswer; the stream ends), `error` (data: Error; the node
goes away, the stream ends); comments `: keepalive`."""
PART_DESCRIPTION = """A part of a structured message, in the AI SDK UI-message shape
(camelCase keys, unknown keys refused): `text`, `reasoning`, `step-start`, `file`, `source-url`,
`source-document`, `dynamic-tool`, `tool-<name>`, `data-<name>`.  A tool part's `state`
decides what it must hold: `input-available` an `input`, `output-available` an `output`,
`output-error` an `errorText`.  A bad part is a 400 whose `details.field` is its path
(`parts[1].toolCallId`)."""


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    from .web_http import answer_twin

    error_twin = answer_twin(Error)
    types_: list[Any] = [error_twin, json_twin(Message), Transports]
    types_ += [answer_twin(t) for t in (GapEvent, InboxDelta, SubscriptionClosed, ContextEvent)]
    for r in routes:
        types_.append(answer_twin(r.answer))
        types_ += [t for t in (r.body, r.query) if t is not None]
    _, components = msgspec.json.schema_components(types_, ref_template=REF)
    _describe_parts(components)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(r.pattern, {})[r.method.decode().lower()] = _operation(r, components)
    paths["/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1",
                                  "content": {"application/json": {"schema": {}}}}},
        }
    }  # fmt: skip
    paths["/v1/transports"] = {
        "get": {
            "operationId": "transports",
            "summary": "How a browser reaches this node: its WebSocket and, with an HTTP/3 "
                       "listener, its WebTransport endpoint (port, path, certificate hash); "
                       "no token, any origin",
            "security": [{}],
            "responses": {"200": {"description": "OK",
                                  "content": {"application/json": {"schema": _ref(Transports)}}}},
        }
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ctxstore HTTP API",
            "version": "1",
            "description": "docs/web.md; the operations are those of docs/protocol.md",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def _describe_parts(components: dict[str, Any]) -> None:
    """Add the ``Part`` schema and make every ``parts`` array's items refer to it."""
    name = PART_NAME_PATTERN.removeprefix("^")
    kinds: list[tuple[type[Any], dict[str, Any]]] = [
        (schema, {"enum": [part_type]}) for part_type, schema in PART_TYPES.items()
    ]
    kinds += [
        (ToolPart, {"type": "string", "pattern": f"^tool-{name}"}),
        (DataPart, {"type": "string", "pattern": f"^data-{name}"}),
    ]
    _, parts = msgspec.json.schema_components([k for k, _ in kinds], ref_template=REF)
    for k, type_schema in kinds:
        parts[k.__name__]["properties"]["type"] = type_schema
    parts["DynamicToolPart"]["required"].append("toolName")  # (checked by check_part)
    assert not set(parts) & set(components), "a part schema's name is taken"
    components.update(parts)
    components["Part"] = {
        "title": "Part",
        "description": PART_DESCRIPTION,
        "anyOf": [{"$ref": REF.format(name=k.__name__)} for k, _ in kinds],
    }
    for schema in components.values():
        part_list = schema.get("properties", {}).get("parts")
        if part_list is None:
            continue
        for option in part_list.get("anyOf", [part_list]):
            if option.get("type") == "array":
                option["items"] = {"$ref": REF.format(name="Part")}
                option["maxItems"] = PARTS_MAX


def _ref(t: type[Any]) -> dict[str, str]:
    return {"$ref": REF.format(name=t.__name__)}


def _operation(r: Route, components: dict[str, Any]) -> dict[str, Any]:
    from .web_http import answer_twin

    hints = typing.get_type_hints(r.request, include_extras=True)
    params: list[dict[str, Any]] = [
        {"name": n, "in": "path", "required": True,
         "schema": msgspec.json.schema(twin_type(hints[n]))}
        for n in r.params
    ]  # fmt: skip
    if r.query is not None:
        props = components[r.query.__name__]["properties"]
        params += [{"name": n, "in": "query", "required": False, "schema": props[n]}
                   for n in r.query.__struct_fields__]  # fmt: skip
    if r.stream and "after_seq" in (r.query.__struct_fields__ if r.query else ()):
        params.append({"name": "Last-Event-ID", "in": "header", "required": False,
                       "description": "a seq: resume after it (overrides after_seq)",
                       "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}})  # fmt: skip
    answer = _ref(answer_twin(r.answer))
    if r.stream:
        ok = {"description": SSE_EVENTS,
              "content": {"text/event-stream": {"schema": {"type": "string"}},
                          "application/json": {"schema": answer}}}  # fmt: skip
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": answer}}}
    error = {"content": {"application/json": {"schema": _ref(answer_twin(Error))}}}
    responses: dict[str, Any] = {"200": ok}
    for status in ERROR_STATUSES:
        responses[status] = {"description": "error (code: see docs/web.md)", **error}
    op: dict[str, Any] = {
        "operationId": r.request.__struct_config__.tag,
        "summary": r.summary,
        "parameters": params,
        "responses": responses,
    }
    if r.body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(r.body)}}}  # fmt: skip
    return op


__all__ = ["openapi_document"]
