"""The ``ctxstore`` command (also ``python -m ctxstore``).

    ctxstore serve [--config FILE] [--node-id N] [--data-dir DIR] [--listen H:P]
                   [--peer-listen H:P] [--peers ID=H:P,...] [...]
    ctxstore cluster up --nodes 3 [--base-port P] [--data-dir DIR]
    ctxstore client --target H:P[,H:P...] [--token T] COMMAND ...

``serve`` prints JSON events on stdout: ``listening`` once the client port is open, ``ready``
once every group has a known leader.  Client commands print one JSON object per line; errors
print ``{"error": code, "message": ...}`` on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .collector import tune_collector
from .config import ConfigError, Settings, load, parse_address

if TYPE_CHECKING:  # imported when serving only: the client commands start faster without them
    from wire.aio import Server

    from .node import Node
    from .ops import OpsServer
    from .server import Service

EXIT_FATAL = 70


def _emit(obj: Any, stream: Any = None) -> None:
    """One JSON object per line (Structs as objects with their field names)."""
    if isinstance(obj, msgspec.Struct):
        obj = msgspec.structs.asdict(obj)
    stream = stream or sys.stdout
    stream.write(json.dumps(msgspec.to_builtins(obj)) + "\n")
    stream.flush()


# -- serve ----------------------------------------------------------------------------------------
SERVE_FLAGS = {
    "--node-id": int,
    "--data-dir": str,
    "--listen": str,
    "--peer-listen": str,
    "--http": str,
    "--peers": str,
    "--cluster-id": str,
    "--secret": str,
    "--groups": int,
    "--tick-ms": int,
    "--election-ticks": int,
    "--heartbeat-ticks": int,
    "--snapshot-entries": int,
    "--tail-messages-max": int,
    "--group-tail-bytes-max": int,
    "--request-timeout-s": float,
    "--retention-max-messages": int,
    "--retention-max-age-s": float,
    "--shutdown-timeout-s": float,
    "--gc-young-threshold": int,
    "--wal-writer": str,
    "--log-level": str,
}


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run one node (with no peers: a single-node cluster)")
    p.add_argument("--config", help="TOML file (keys as the flags, with underscores)")
    for flag, kind in SERVE_FLAGS.items():
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--token", action="append", dest="tokens", default=None,
                   help="a static client token (repeatable); none: no token needed")  # fmt: skip


async def _serve(settings: Settings) -> int:
    from wire.aio import serve as wire_serve

    from .node import Node
    from .server import Service

    node = Node(settings)
    await node.start()
    tune_collector(settings.gc_young_threshold)
    host, port = parse_address(settings.listen, "listen")
    service = Service(node)
    server = await wire_serve(service, host, port)
    bound = server.address
    node.advertise(f"{bound[0]}:{bound[1]}")
    event = {"event": "listening", "node": settings.node_id, "listen": f"{bound[0]}:{bound[1]}"}
    ops = None
    if settings.http is not None:
        from .ops import serve_ops

        ops = await serve_ops(node, service, *parse_address(settings.http, "http"), clients=server)
        event["http"] = "{}:{}".format(*ops.address)
    _emit(event)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async def announce_ready() -> None:
        while not await node.wait_leaders(3600):
            pass
        _emit({"event": "ready", "node": settings.node_id})

    ready = loop.create_task(announce_ready())
    assert node.failed is not None
    waits: set[asyncio.Future[Any]] = {stop, node.failed}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if node.failed.done():
        server.close()
        logging.getLogger("ctxstore").critical("fatal: %r", node.failed.result())
        return EXIT_FATAL
    try:
        await asyncio.wait_for(_shut_down(node, service, server, ops), settings.shutdown_timeout_s)
    except TimeoutError:
        logging.getLogger("ctxstore").error(
            "shutdown took longer than %g s; exiting anyway", settings.shutdown_timeout_s
        )
        return EXIT_FATAL
    _emit({"event": "stopped", "node": settings.node_id})
    return 0


async def _shut_down(node: Node, service: Service, server: Server, ops: OpsServer | None) -> None:
    """SIGTERM: stop accepting connections, hand leaderships to peers (in-flight requests finish
    meanwhile), tell subscribers and clients, flush the archive, stop."""
    server.stop_listening()
    still_led = await node.hand_off(node.settings.shutdown_timeout_s / 2)
    if still_led and node.settings.peer_map:  # a single node has no one to hand over to
        logging.getLogger("ctxstore").warning("shutting down still leading %d groups", still_led)
    service.close_subscriptions("the node is shutting down")
    server.close("unavailable", "the node is shutting down")
    await server.wait_closed()
    await node.stop()
    if ops is not None:
        ops.close()
        await ops.wait_closed()


def serve_main(args: argparse.Namespace) -> int:
    flags = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag in SERVE_FLAGS
    }
    flags["tokens"] = args.tokens
    try:
        settings = load(args.config, flags)
    except ConfigError as e:
        print(f"ctxstore: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format='{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}',
    )
    if settings.peers and settings.secret == "ctxstore-dev-secret":
        logging.getLogger("ctxstore").warning("using the development cluster secret")
    try:
        import uvloop

        return uvloop.run(_serve(settings))
    except ConfigError as e:
        print(f"ctxstore: {e}", file=sys.stderr)
        return 2


# -- cluster up -----------------------------------------------------------------------------------
def _add_cluster(sub: Any) -> None:
    p = sub.add_parser("cluster", help="a local cluster of child processes")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser(
        "up", help="start it, print the client and ops addresses, run until SIGINT"
    )
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--base-port", type=int, default=7400)
    up.add_argument("--data-dir", default=None, help="default: a temporary directory")
    up.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for every node")


async def _cluster_up(args: argparse.Namespace) -> int:
    from .launcher import LocalCluster

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="ctxstore-cluster-")
    extra = [a for a in args.extra if a != "--"]
    cluster = LocalCluster(args.nodes, data_dir, args.base_port, extra)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))  # type: ignore[func-returns-value]
    try:
        await cluster.start()
    except (RuntimeError, TimeoutError) as e:
        print(f"ctxstore: {e}", file=sys.stderr)
        await cluster.stop()
        return 1
    _emit({
        "nodes": [{"id": c.id, "client": c.target, "ops": c.ops_target,
                   "data_dir": c.data_dir}
                  for c in cluster.children.values()],
        "targets": ",".join(cluster.targets),
    })  # fmt: skip
    await stop
    await cluster.stop()
    return 0


# -- client ---------------------------------------------------------------------------------------
def _add_client(sub: Any) -> None:
    p = sub.add_parser("client", help="talk to a cluster")
    p.add_argument("--target", required=True, help="H:P[,H:P...]")
    p.add_argument("--token", default=None)
    p.add_argument("--timeout", type=float, default=10.0)
    c = p.add_subparsers(dest="client_command", required=True)
    cs = c.add_parser("create-session")
    cs.add_argument("--user", required=True)
    cs.add_argument("--agent", required=True)
    cs.add_argument("--id", default=None)
    cs.add_argument("--metadata", default="{}", help="a JSON object")
    gs = c.add_parser("get-session")
    gs.add_argument("session")
    ls = c.add_parser("list-sessions")
    ls.add_argument("--user", required=True)
    ls.add_argument("--limit", type=int, default=100)
    ap = c.add_parser("append")
    ap.add_argument("session")
    ap.add_argument("--text", required=True)
    ap.add_argument("--sender", choices=("user", "agent", "system"), default="user")
    ap.add_argument("--sender-id", default="")
    ap.add_argument("--kind", default="text")
    ap.add_argument("--client-msg-id", default=None)
    ap.add_argument("--expected-seq", type=int, default=None)
    rd = c.add_parser("read")
    rd.add_argument("session")
    rd.add_argument("--after-seq", type=int, default=0)
    rd.add_argument("--limit", type=int, default=100)
    tl = c.add_parser("tail", help="follow a session: its messages, then live ones (JSON lines)")
    tl.add_argument("session")
    tl.add_argument("--after-seq", type=int, default=0)
    tl.add_argument("--count", type=int, default=None, help="stop after this many messages")
    ib = c.add_parser("inbox", help="follow a user's inbox: a snapshot, then deltas")
    ib.add_argument("user")
    ib.add_argument("--count", type=int, default=None, help="stop after this many deltas")
    mr = c.add_parser("mark-read")
    mr.add_argument("session")
    mr.add_argument("--user", required=True)
    mr.add_argument("--seq", type=int, required=True)
    c.add_parser("ping")


async def _client(args: argparse.Namespace) -> int:
    from wire.client import ClientError, connect

    try:
        client = await connect(args.target, token=args.token, timeout_s=args.timeout)
    except ClientError as e:
        _emit({"error": e.code, "message": e.message}, sys.stderr)
        return 1
    try:
        match args.client_command:
            case "create-session":
                metadata = json.loads(args.metadata)
                if not isinstance(metadata, dict):
                    raise ValueError("--metadata must be a JSON object")
                info = await client.create_session(args.user, args.agent, metadata, args.id)
                _emit(info.session)
            case "get-session":
                _emit((await client.get_session(args.session)).session)
            case "list-sessions":
                cursor = None
                while True:
                    page = await client.list_sessions(args.user, cursor, args.limit)
                    for s in page.sessions:
                        _emit(s)
                    if page.next_cursor is None:
                        break
                    cursor = page.next_cursor
            case "append":
                ack = await client.append_with_retry(
                    args.session, args.text, args.sender, args.sender_id, args.kind,
                    client_msg_id=args.client_msg_id, expected_seq=args.expected_seq,
                )  # fmt: skip
                _emit({"seq": ack.seq, "inserted_at": ack.inserted_at, "deduped": ack.deduped})
            case "read":
                after, left = args.after_seq, args.limit
                while left > 0:
                    got = await client.read(args.session, after, min(left, 1000))
                    for m in got.messages:
                        _emit(m)
                    if not got.messages:
                        break
                    after = got.messages[-1].seq
                    left -= len(got.messages)
            case "mark-read":
                marked = await client.mark_read(args.session, args.user, args.seq)
                _emit({"session_id": marked.session_id, "user_id": marked.user_id,
                       "seq": marked.seq})  # fmt: skip
            case "ping":
                await client.ping()
                _emit({"pong": True})
            case "tail":
                await _tail(client, args.session, args.after_seq, args.count)
            case "inbox":
                await _inbox(client, args.user, args.count)
    except ClientError as e:
        _emit({"error": e.code, "message": e.message, "details": e.details}, sys.stderr)
        return 1
    except ValueError as e:
        _emit({"error": "bad_request", "message": str(e)}, sys.stderr)
        return 1
    finally:
        await client.close()
    return 0


async def _tail(client: Any, session_id: str, after_seq: int, count: int | None) -> None:
    """One JSON line per message; a gap is a line {"gap": {"from_seq", "to_seq", "reason"}}."""
    from wire.protocol import GapEvent

    seen = 0
    async with client.subscribe(session_id, after_seq) as sub:
        async for item in sub:
            if isinstance(item, GapEvent):
                _emit({"gap": {"from_seq": item.from_seq, "to_seq": item.to_seq,
                               "reason": item.reason}})  # fmt: skip
                continue
            _emit(item)
            seen += 1
            if count is not None and seen >= count:
                return


async def _inbox(client: Any, user_id: str, count: int | None) -> None:
    """A line {"snapshot": [...], "truncated": b}, then one line {"delta": [...]} per delta."""
    from wire.protocol import InboxSnapshot

    deltas = 0
    async with client.subscribe_inbox(user_id) as sub:
        async for item in sub:
            if isinstance(item, InboxSnapshot):
                entries = [msgspec.structs.asdict(e) for e in item.entries]
                _emit({"snapshot": entries, "truncated": item.truncated})
                continue
            _emit({"delta": [msgspec.structs.asdict(e) for e in item.entries]})
            deltas += 1
            if count is not None and deltas >= count:
                return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctxstore", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_cluster(sub)
    _add_client(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    import uvloop

    if args.command == "cluster":
        return uvloop.run(_cluster_up(args))
    try:
        return uvloop.run(_client(args))
    except KeyboardInterrupt:  # Ctrl-C ends a tail or an inbox: that is how they stop
        return 130
