"""The delay of subscription messages through WebSocket or WebTransport (docs/web.md §8):
``python -m bench.subdelay --node H:P --http H:P --via ws|wt``.

One subscriber connection (``/v1/ws``, msgpack; or a WebTransport session, msgpack) follows
``--sessions`` sessions; a native client appends to them in turn at ``--rate`` per second for
``--duration`` seconds; each message's delay is the time from its commit (``inserted_at``, the
node's clock: same machine) to its arrival at the subscriber.  Prints one JSON line: the count,
p50, p99, max in ms.  Run it where packets are lost (``bench/subdelay_netns.sh``: 5 % on a
private loopback) to see what a loss costs each transport: on one TCP connection every
subscription's messages wait behind a lost segment; on QUIC only the stream it carried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import msgspec
import wsproto
import wsproto.events as ws_events

from wire.client import connect
from wire.protocol import (
    PROTOCOL_VERSION,
    Hello,
    MessageEvent,
    Push,
    Response,
    Subscribe,
)

from .webclients import CLIENT_NAME, host_port
from .wtclient import WtClient, _WtConnection

_decoder = msgspec.msgpack.Decoder(Response | Push)


class Delays:
    def __init__(self) -> None:
        self.ms: list[float] = []
        self.measuring = False

    def push(self, message: Any) -> None:
        if isinstance(message, MessageEvent) and self.measuring:
            now = time.time() * 1000
            self.ms.extend(now - m.inserted_at for m in message.messages)

    def summary(self) -> dict[str, Any]:
        ms = sorted(self.ms)
        if not ms:
            return {"count": 0}

        def q(p: float) -> float:
            return round(ms[min(len(ms) - 1, int(p * len(ms)))], 1)

        return {"count": len(ms), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(ms[-1], 1)}


async def ws_subscriber(http: str, sessions: list[str], delays: Delays) -> Any:
    host, port = host_port(http)
    reader, writer = await asyncio.open_connection(host, port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    writer.write(ws.send(ws_events.Request(host=http, target="/v1/ws",
                                           subprotocols=["ctxstore.v1.msgpack"])))  # fmt: skip
    answered: dict[int, asyncio.Future[Any]] = {}
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[None] = loop.create_future()

    def send(message: Any) -> asyncio.Future[Any]:
        future = answered[message.rid] = loop.create_future()
        writer.write(ws.send(ws_events.BytesMessage(data=msgspec.msgpack.encode(message))))
        return future

    async def read() -> None:
        while data := await reader.read(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, ws_events.BytesMessage):
                    message = _decoder.decode(event.data)
                    rid = getattr(message, "rid", None)
                    if rid is None:
                        delays.push(message)
                    elif rid in answered:
                        answered.pop(rid).set_result(message)
                elif isinstance(event, ws_events.AcceptConnection):
                    accepted.set_result(None)
                elif isinstance(event, ws_events.Ping):
                    writer.write(ws.send(event.response()))

    task = asyncio.ensure_future(read())
    await accepted
    await send(Hello(1, PROTOCOL_VERSION, CLIENT_NAME, None))
    for i, sid in enumerate(sessions):
        await send(Subscribe(10 + i, sid, 0, False))
    return task, writer


async def wt_subscriber(http: str, sessions: list[str], delays: Delays) -> Any:
    client = WtClient(http, None, 10.0)
    conn = await client.connection()
    assert isinstance(conn, _WtConnection)
    conn.on_push = delays.push
    for sid in sessions:
        await conn.request(Subscribe(client.next_rid(), sid, 0, False))
    return client


async def main(args: argparse.Namespace) -> None:
    writer = await connect(args.node, timeout_s=30.0)
    sessions = [f"d{time.time_ns()}-{i}" for i in range(args.sessions)]
    for sid in sessions:
        await writer.create_session("u", "a", {}, session_id=sid)
    delays = Delays()
    if args.via == "ws":
        sub = await ws_subscriber(args.http, sessions, delays)
    else:
        sub = await wt_subscriber(args.http, sessions, delays)
    delays.measuring = True
    interval = 1 / args.rate
    start = time.monotonic()
    n = 0
    tasks = []
    while time.monotonic() - start < args.duration:
        append = writer.append_with_retry(
            sessions[n % len(sessions)], "x" * 200, sender_id="u", client_msg_id=f"m{n}"
        )
        tasks.append(asyncio.ensure_future(append))
        n += 1
        await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(3)  # the last ones arrive
    print(json.dumps({"via": args.via, "sent": n, **delays.summary()}))
    if args.via == "ws":
        sub[0].cancel()
        sub[1].close()
    else:
        await sub.close()
    await writer.close()


def cli() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.subdelay", description=__doc__)
    p.add_argument("--node", required=True, help="the node's client port H:P (the writer)")
    p.add_argument("--http", required=True, help="its HTTP port H:P (HTTP/3 on the same number)")
    p.add_argument("--via", choices=("ws", "wt"), required=True)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--rate", type=float, default=100.0, help="appends per second")
    p.add_argument("--duration", type=float, default=20.0)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
