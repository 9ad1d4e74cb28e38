"""A scripted test agent served by a real HTTP server: hypercorn (HTTP/1.1 on h11, HTTP/2 on
h2, cleartext with prior knowledge or TLS with ALPN and a trustme certificate), running an
ASGI app on the test's loop.

Each path has a plan: a list of behaviours taken in turn (the last one repeats):
``sse`` / ``jsonl`` (a reply echoing the newest user text, a few deltas apart), ``slow``
(an SSE reply of ``SLOW_DELTAS`` deltas, ``SLOW_GAP_S`` apart), ``cut`` (a start, then the
connection is dropped), ``stall`` (a start, then nothing), ``nofinish`` (a stream that ends
without finish), ``malformed`` (a line that is not JSON), ``error`` (an error chunk),
``error-batch`` (three valid chunks and an error chunk, in one write),
``abort``, ``big`` (``BIG_DELTAS`` deltas of 4000 characters), ``held`` (reasoning, a
``weather`` tool call with its output, then text deltas ``HELD_GAP_S`` apart; the rest waits
for ``ScriptedAgent.release``), ``429``/``503`` (with ``Retry-After: 0``), ``404``, ``500``."""

from __future__ import annotations

import asyncio
import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

from ctxstore.launcher import free_port

SLOW_DELTAS = 20
SLOW_GAP_S = 0.1
BIG_DELTAS = 100  # about 400 KB: past HTTP/2's initial flow-control windows
HELD_GAP_S = 0.05
HELD_REASONING = "The user asks about the weather: call the tool."
HELD_INPUT = {"city": "Paris"}
HELD_OUTPUT = {"celsius": 21}


@dataclass
class Call:
    path: str
    http_version: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class ScriptedAgent:
    plans: dict[str, list[str]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends ``held`` streams

    def next(self, path: str) -> str:
        plan = self.plans.get(path) or [path.strip("/").split("/")[0]]
        n = self.served.get(path, 0)
        self.served[path] = n + 1
        return plan[min(n, len(plan) - 1)]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.calls.append(Call(scope["path"], scope["http_version"], request, headers))
        await self._answer(self.next(scope["path"]), request, send)

    async def _answer(self, behaviour: str, request: dict[str, Any], send: Any) -> None:
        if behaviour.isdigit():
            headers = [(b"retry-after", b"0"), (b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": int(behaviour),
                        "headers": headers})  # fmt: skip
            await send({"type": "http.response.body", "body": b"no"})
            return
        jsonl = behaviour == "jsonl"
        kind = b"application/x-ndjson" if jsonl else b"text/event-stream"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind)]})  # fmt: skip

        async def chunk(obj: dict[str, Any] | str, gap_s: float = 0.0) -> None:
            text = obj if isinstance(obj, str) else json.dumps(obj)
            line = f"{text}\n" if jsonl else f"data: {text}\n\n"
            await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
            if gap_s:
                await asyncio.sleep(gap_s)

        user = [m for m in request["messages"] if m["role"] == "user"]
        said = user[-1]["parts"][0].get("text", "") if user else ""
        await chunk({"type": "start", "messageMetadata": {"model": "echo"}})
        if behaviour == "cut":
            await chunk({"type": "text-start", "id": "t"})
            await chunk({"type": "text-delta", "id": "t", "delta": "half"})
            raise RuntimeError("cut mid-stream")  # hypercorn drops the stream
        if behaviour == "stall":
            await asyncio.sleep(3600)
        if behaviour == "malformed":
            await chunk("{not json")
        if behaviour == "error":
            await chunk({"type": "error", "errorText": "model overloaded"})
        if behaviour == "error-batch":  # valid chunks, then an error chunk, in one body write
            events = [{"type": "start-step"}, {"type": "text-start", "id": "t"},
                      {"type": "text-delta", "id": "t", "delta": "half"},
                      {"type": "error", "errorText": "model overloaded"}]  # fmt: skip
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
            await send({"type": "http.response.body", "body": body.encode(), "more_body": True})
        if behaviour == "held":
            await self._held(said, chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        deltas = SLOW_DELTAS if behaviour == "slow" else BIG_DELTAS if behaviour == "big" else 3
        gap = SLOW_GAP_S if behaviour == "slow" else 0.0
        await chunk({"type": "start-step"})
        await chunk({"type": "text-start", "id": "t"})
        words = [f"echo: {said}"] + [f" {i}" for i in range(1, deltas)]
        if behaviour == "big":
            words = [f"echo: {said}"] + [" " + "x" * 4000 for _ in range(1, deltas)]
        for w in words:
            await chunk({"type": "text-delta", "id": "t", "delta": w}, gap)
        await chunk({"type": "text-end", "id": "t"})
        await chunk({"type": "finish-step"})
        if behaviour == "abort":
            await chunk({"type": "abort"})
        elif behaviour != "nofinish":
            await chunk({"type": "finish", "messageMetadata": {"tokens": deltas}})
        if not jsonl and behaviour != "nofinish":
            await chunk("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _held(self, said: str, chunk: Any) -> None:
        await chunk({"type": "start-step"})
        await chunk({"type": "reasoning-start", "id": "r"})
        await chunk({"type": "reasoning-delta", "id": "r", "delta": HELD_REASONING})
        await chunk({"type": "reasoning-end", "id": "r"})
        call = {"toolCallId": "c1", "toolName": "weather"}
        await chunk({"type": "tool-input-start", **call})
        await chunk({"type": "tool-input-delta", "toolCallId": "c1",
                     "inputTextDelta": json.dumps(HELD_INPUT)})  # fmt: skip
        await chunk({"type": "tool-input-available", **call, "input": HELD_INPUT})
        await chunk({"type": "tool-output-available", "toolCallId": "c1", "output": HELD_OUTPUT})
        await chunk({"type": "text-start", "id": "t"})
        for word in held_words(said)[:-1]:
            await chunk({"type": "text-delta", "id": "t", "delta": word}, HELD_GAP_S)
        await self.release.wait()
        await chunk({"type": "text-delta", "id": "t", "delta": held_words(said)[-1]})
        await chunk({"type": "text-end", "id": "t"})
        await chunk({"type": "finish-step"})
        await chunk({"type": "finish", "messageMetadata": {"model": "held"}})
        await chunk("[DONE]")


def held_words(said: str) -> list[str]:
    """The text deltas of a ``held`` reply: all but the last before the hold."""
    return [f"It is 21 degrees in Paris ({said}).", " Anything", " else?"]


def reply_text(deltas: int, said: str) -> str:
    return f"echo: {said}" + "".join(f" {i}" for i in range(1, deltas))


@dataclass
class Served:
    agent: ScriptedAgent
    port: int
    ca: trustme.CA | None

    def url(self, path: str) -> str:
        scheme = "https" if self.ca else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def client_context(self) -> ssl.SSLContext:
        assert self.ca is not None
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@asynccontextmanager
async def agent_server(tls: bool = False, port: int | None = None) -> AsyncIterator[Served]:
    agent = ScriptedAgent()
    config = Config()
    port = port or free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    ca = None
    with tempfile.TemporaryDirectory() as tmp:
        if tls:
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            cert_path, key_path = f"{tmp}/cert.pem", f"{tmp}/key.pem"
            cert.cert_chain_pems[0].write_to_path(cert_path)
            cert.private_key_pem.write_to_path(key_path)
            config.certfile, config.keyfile = cert_path, key_path
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            serve(agent, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        )
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        try:
            yield Served(agent, port, ca)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
