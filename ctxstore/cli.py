"""The ctxstore command (also python -m ctxstore): serve, cluster up, client, db, token.

    ctxstore serve [--config FILE] [--node-id N] [--data-dir DIR] [--listen H:P] ...
    ctxstore cluster up [--nodes 3] [--base-port P] [--data-dir DIR] [-- flags for every node]
    ctxstore client --target H:P[,H:P...] [--token T] [--timeout S] COMMAND ...
    ctxstore db migrate|status [--postgres-dsn DSN]
    ctxstore token issue --sub ID --role user|agent|service [--ttl 1h] [--sessions ID,...]

``serve`` prints JSON events on stdout (``listening`` once the client port is open, ``ready``
once every group has a known leader, ``stopped``) and logs JSON lines on stderr (``logs.py``).
Client commands print one JSON object per line; their errors print one line
``{"error": code, "message": ...}`` on stderr.  Every failure ends with one line, never a
traceback, and an exit status by its class (``cli_common.EXIT_*``, listed by ``--help``).
The client commands are in ``cli_client.py``, the ``db`` commands in ``cli_db.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from msgspec import inspect as schema

from .cli_admin import add_admin, run_admin
from .cli_client import add_client, run_client
from .cli_common import (
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_START,
    EXIT_STATUSES,
    EXIT_USAGE,
    HelpFormatter,
    UsageError,
    emit,
    int_in,
    os_error,
)
from .cli_db import add_db, run_db
from .cli_token import add_token, run_token
from .collector import tune_collector
from .config import (
    FIELDS,
    HELP,
    LISTED,
    ConfigError,
    Settings,
    load,
    parse_address,
    unknown_env,
)
from .logs import configure as configure_logs

if TYPE_CHECKING:  # imported when serving only: the client commands start faster without them
    from wire.aio import Server

    from .launcher import LocalCluster
    from .node import Node
    from .ops import OpsServer
    from .server import Service

T = TypeVar("T")


class StartupError(Exception):
    """A node cannot start for a reason its operator must fix: exit status 5."""


# -- serve ----------------------------------------------------------------------------------------
SERVE_METAVARS = {
    "data_dir": "DIR",
    "listen": "HOST:PORT",
    "peer_listen": "HOST:PORT",
    "http": "HOST:PORT",
    "h3": "HOST:PORT",
    "tls_cert": "FILE",
    "tls_key": "FILE",
    "peers": "ID=HOST:PORT,...",
    "cluster_id": "NAME",
    "secret": "SECRET",
    "log_level": "LEVEL",
    "postgres_dsn": "DSN",
    "postgres_serve_history": "true|false",
    "h3_retry": "true|false",
    "web_cors_origin": "ORIGIN",
    "auth_jwt_secret": "[KID=]SECRET",
    "auth_jwt_public_key": "[KID=]FILE",
    "auth_jwt_audience": "AUD",
    "auth_jwt_issuer": "ISS",
}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _allowed(kind: schema.Type) -> str:
    """A key's allowed values, as its schema in config.py says."""
    if isinstance(kind, (schema.IntType, schema.FloatType)):
        low = None if kind.ge is None else f">= {kind.ge}"
        low = low if kind.gt is None else f"> {kind.gt}"
        high = None if kind.le is None else f"<= {kind.le}"
        high = high if kind.lt is None else f"< {kind.lt}"
        if kind.ge is not None and kind.le is not None:
            return f"{kind.ge} to {kind.le}"
        return " and ".join(b for b in (low, high) if b)
    if isinstance(kind, schema.LiteralType):
        return " or ".join(str(v) for v in kind.values)
    if isinstance(kind, schema.StrType) and kind.max_length is not None:
        return f"{kind.min_length or 0} to {kind.max_length} characters"
    if isinstance(kind, schema.StrType) and (kind.min_length or 0) > 1:
        return f"at least {kind.min_length} characters"
    return ""


def _default(field: schema.Field) -> str:
    value = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    if value is None or value == []:
        return "none"
    if value == "":
        return "empty"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _setting_help(field: schema.Field, kind: schema.Type) -> str:
    allowed = _allowed(kind)
    text = HELP.get(field.name, field.name.replace("_", " "))
    env = "CTXSTORE_" + field.name.upper()
    return f"{text} ({allowed + '; ' if allowed else ''}default: {_default(field)}; env {env})"


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run one node (with no --peers: a single-node cluster)",
        description="Run one ctxstore node. Settings come from a TOML file (--config) < "
        "CTXSTORE_* environment variables < these flags; an invalid value stops start-up "
        "with a message naming its key.",
        epilog=EXIT_STATUSES,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of settings, keys as the flags with underscores (tick_ms = 20) "
        "(default: none)",
    )
    settings_type = schema.type_info(Settings)
    assert isinstance(settings_type, schema.StructType)
    for field in settings_type.fields:
        kind = field.type
        if isinstance(kind, schema.UnionType):  # X | None: the flag gives an X
            kind = next(t for t in kind.types if not isinstance(t, schema.NoneType))
        help_text = _setting_help(field, kind).replace("%", "%%")
        if field.name == "tokens":  # repeatable, as --token
            p.add_argument("--token", action="append", dest="tokens", default=None,
                           metavar="TOKEN", help=help_text)  # fmt: skip
            continue
        if field.name in LISTED:  # repeatable
            p.add_argument(_flag(field.name), action="append", dest=field.name, default=None,
                           metavar=SERVE_METAVARS.get(field.name, "TEXT"),
                           help=help_text)  # fmt: skip
            continue
        spec: dict[str, Any] = {"default": None, "help": help_text}
        if isinstance(kind, schema.LiteralType):
            spec["choices"] = kind.values
        elif isinstance(kind, schema.IntType):
            spec.update(type=int, metavar="N")
        elif isinstance(kind, schema.FloatType):
            spec.update(type=float, metavar="SECONDS" if field.name.endswith("_s") else "X")
        else:
            spec["metavar"] = SERVE_METAVARS.get(field.name, "TEXT")
        p.add_argument(_flag(field.name), **spec)


async def _serve(settings: Settings) -> int:
    if settings.join is not None:
        from .join import admit

        await admit(settings)  # (a restarted node that joined before: nothing asked)
    node, service, server, ops = await _start(settings)
    event = {
        "event": "listening",
        "node": settings.node_id,
        "listen": "{}:{}".format(*server.address),
    }
    if ops is not None:
        event["http"] = "{}:{}".format(*ops.address)
        if ops.h3 is not None:
            event["h3"] = "{}:{}".format(*ops.h3.address)
    emit(event)
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
        emit({"event": "ready", "node": settings.node_id})

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
    emit({"event": "stopped", "node": settings.node_id})
    return 0


async def _start(settings: Settings) -> tuple[Node, Service, Server, OpsServer | None]:
    """Open the data directory, start Raft and open the ports; an operator's problem (a port in
    use, a data directory locked by another node or unusable) is a ``StartupError`` naming
    its key, after what was started is stopped."""
    from .node import serve_clients
    from .server import Service

    node = _open_node(settings)
    server: Server | None = None
    try:
        await _opening("peer_listen", settings, node.start())
        tune_collector(settings.gc_young_threshold)
        service = Service(node)
        host, port = parse_address(settings.listen, "listen")
        server = await _opening("listen", settings, serve_clients(service, settings, host, port))
        bound = server.address
        node.advertise(f"{bound[0]}:{bound[1]}")
        ops = None
        if settings.http is not None:
            from .ops import OpsLimits, serve_ops
            from .web import WebLimits

            address = parse_address(settings.http, "http")
            web = WebLimits(settings.web_ping_interval_s, settings.web_idle_timeout_s)
            ops = await _opening(
                "http",
                settings,
                serve_ops(
                    node,
                    service,
                    *address,
                    clients=server,
                    limits=OpsLimits(connections_max=settings.http_connections_max),
                    web_limits=web,
                    cors_origins=settings.web_cors_origin,
                ),
            )
            if settings.h3 is not None:
                from .web_h3 import H3Limits, attach_h3

                limits = H3Limits(
                    connections_max=settings.h3_connections_max,
                    streams_max=settings.h3_streams_max,
                    idle_timeout_s=settings.h3_idle_timeout_s,
                    retry=settings.h3_retry,
                )
                assert settings.tls_cert is not None and settings.tls_key is not None
                try:
                    await _opening(
                        "h3", settings,
                        attach_h3(ops, server, *parse_address(settings.h3, "h3"),
                                  settings.tls_cert, settings.tls_key, limits),
                    )  # fmt: skip
                except ValueError as e:  # the certificate or key (named)
                    ops.close()
                    raise StartupError(str(e)) from None
    except BaseException:
        if server is not None:
            server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(node.stop(), 5)
        raise
    return node, service, server, ops


def _open_node(settings: Settings) -> Node:
    from sqlite3 import Error as SQLiteError

    from .node import Node

    where = f"data_dir {settings.data_dir}"
    try:
        return Node(settings)
    except BlockingIOError:  # the WAL's lock
        raise StartupError(f"{where}: locked by another process (a node running on it?)") from None
    except OSError as e:
        raise StartupError(f"{where}: {os_error(e)}") from None
    except SQLiteError as e:
        raise StartupError(f"{where}: the archive: {e}") from None


async def _opening(key: str, settings: Settings, opening: Awaitable[T]) -> T:
    """``opening`` (binding the port of ``key``); its OSError as a ``StartupError``."""
    try:
        return await opening
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            reason = {
                errno.EADDRINUSE: "address already in use (another process listens there)",
                errno.EADDRNOTAVAIL: "not an address of this machine",
                errno.EACCES: "permission denied (ports below 1024 need privileges)",
            }[e.errno]
            raise StartupError(f"{key} {getattr(settings, key)}: {reason}") from None
        raise StartupError(f"data_dir {settings.data_dir}: {os_error(e)}") from None


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
    """Every line on stderr is JSON (logs.py), start-up failures included."""
    configure_logs("WARNING")
    log = logging.getLogger("ctxstore")
    flags = {key: getattr(args, key) for key in FIELDS}
    try:
        settings = load(args.config, flags)
        from .auth import verifier_of

        verifier_of(settings)  # its keys' files readable and usable
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_USAGE
    configure_logs(settings.log_level)
    for name in unknown_env():
        log.warning("ignoring %s: no setting has that name (ctxstore serve --help)", name)
    if settings.peers and settings.secret == "ctxstore-dev-secret":
        log.warning("using the development cluster secret")
    import uvloop

    try:
        return uvloop.run(_serve(settings))
    except ConfigError as e:  # the data directory belongs to another node or cluster
        log.error("%s", e)
        return EXIT_USAGE
    except StartupError as e:
        log.error("cannot start: %s", e)
        return EXIT_START
    except KeyboardInterrupt:  # before the signal handlers are installed
        return EXIT_INTERRUPTED
    except Exception:
        log.critical("unexpected error", exc_info=True)
        return EXIT_FATAL


# -- cluster up -----------------------------------------------------------------------------------
def _port_base(text: str) -> int:
    value = int_in(0)(text)
    if value + 200 + 6 > 65535:  # the ops ports of up to 7 nodes
        raise argparse.ArgumentTypeError(f"must be at most {65535 - 206}, got {value}")
    return value


def _add_cluster(sub: Any) -> None:
    p = sub.add_parser(
        "cluster",
        help="a local cluster of child processes, to try ctxstore out",
        description="A local cluster of ctxstore serve processes on this machine.",
    )
    csub = p.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    up = csub.add_parser(
        "up",
        help="start it, print its addresses, run until Ctrl-C",
        description="Start a local cluster, print its nodes' addresses, data directories and "
        "logs as one JSON line, report any node that exits by itself (on stderr, with its "
        "status and the last lines of its log), and on Ctrl-C stop the nodes and print what "
        "was stopped.",
        epilog=EXIT_STATUSES,
        formatter_class=HelpFormatter,
    )
    up.add_argument(
        "--nodes",
        type=int_in(1, 32),
        default=3,
        metavar="N",
        help="how many nodes, 1 to 32; each group has min(3, N) replicas (default: 3)",
    )
    up.add_argument(
        "--base-port",
        type=_port_base,
        default=7400,
        metavar="P",
        help="node i listens for clients on P+i-1, for peers on P+100+i-1 and "
        "serves its ops port on P+200+i-1; 0: free ports (default: 7400)",
    )
    up.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="node i keeps its data in DIR/node<i> and logs to DIR/node<i>.log "
        "(default: a new temporary directory, kept after the cluster stops)",
    )
    up.add_argument(
        "--h3",
        action="store_true",
        help="serve HTTP/3 and WebTransport too (UDP, on each HTTP port's number) with a new "
        "self-signed certificate in DIR/tls, whose SHA-256 (for a page's "
        "serverCertificateHashes) is printed (default: off)",
    )
    up.add_argument(
        "extra",
        nargs=argparse.REMAINDER,
        metavar="-- FLAGS",
        help="flags for every node's ctxstore serve (default: none)",
    )


async def _cluster_up(args: argparse.Namespace) -> int:
    from .launcher import LocalCluster, NodeExited

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="ctxstore-cluster-")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        emit({"error": "start_failed", "message": f"data dir {data_dir}: {os_error(e)}"},
              sys.stderr)  # fmt: skip
        return EXIT_START
    extra = [a for a in args.extra if a != "--"]
    cluster = LocalCluster(args.nodes, data_dir, args.base_port, extra, h3=args.h3)
    cert = cluster.cert
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))  # type: ignore[func-returns-value]
    starting = asyncio.ensure_future(cluster.start())
    await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
    failure = None if not starting.done() else starting.exception()
    if failure is not None and not stop.done():
        await asyncio.wait({stop}, timeout=0.5)  # a Ctrl-C reaches the nodes too: is it ours?
    if stop.done():  # Ctrl-C while starting
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await _stop(cluster)
        return EXIT_INTERRUPTED
    if failure is not None:
        if not isinstance(failure, NodeExited | TimeoutError):
            raise failure
        failed: dict[str, Any] = {"error": "start_failed", "message": str(failure)}
        if isinstance(failure, NodeExited):
            node = failure.node
            failed.update(node=node, log=failure.log_path, log_tail=cluster.log_tail(node))
        emit(failed, sys.stderr)
        await cluster.stop()
        return EXIT_START
    nodes: list[dict[str, Any]] = [{"id": c.id, "pid": c.process.pid if c.process else None,
              "client": c.target, "ops": c.ops_target, "ws": f"ws://{c.ops_target}/v1/ws",
              "data_dir": c.data_dir, "log": c.log_path}
             for c in cluster.children.values()]  # fmt: skip
    started: dict[str, Any] = {"nodes": nodes, "targets": ",".join(cluster.targets)}
    if cert is not None:
        for entry, child in zip(nodes, cluster.children.values(), strict=True):
            entry["wt"] = f"https://{child.ops_target}/v1/wt"
        started["cert_sha256"] = cert.sha256
        started["cert"] = cert.cert_path
    emit(started)
    everyone_exited = await _watch(cluster, stop)
    await _stop(cluster)
    return EXIT_FATAL if everyone_exited else 0


async def _stop(cluster: LocalCluster) -> None:
    """Stop every node; print what was stopped, with each node's exit status."""
    codes = await cluster.stop()
    emit({"event": "stopped", "data_dir": cluster.data_dir,
          "nodes": [{"id": i, "exit_code": code} for i, code in codes.items()]})  # fmt: skip


async def _watch(cluster: LocalCluster, stop: asyncio.Future[None]) -> bool:
    """Until ``stop``, report on stderr each node that exits by itself: its status and the last
    lines of its log.  True if every node exited."""
    exits: dict[asyncio.Future[Any], int] = {
        asyncio.ensure_future(c.process.wait()): c.id
        for c in cluster.children.values()
        if c.process is not None
    }
    try:
        while exits and not stop.done():
            waits: set[asyncio.Future[Any]] = {stop, *exits}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done & exits.keys():
                i = exits.pop(task)
                if not stop.done():  # a Ctrl-C reaches the nodes too: is it ours?
                    await asyncio.wait({stop}, timeout=0.5)
                if stop.done():
                    return False
                code = task.result()
                exited: dict[str, Any] = {"event": "node_exited", "node": i, "exit_code": code}
                if code < 0:
                    exited["signal"] = signal.Signals(-code).name
                log = cluster.children[i].log_path
                exited.update(log=log, log_tail=cluster.log_tail(i))
                emit(exited, sys.stderr)
    finally:
        for task in exits:
            task.cancel()
    return not exits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxstore",
        description="ctxstore: a replicated store for conversations between users and agents.",
        epilog=EXIT_STATUSES,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_cluster(sub)
    add_client(sub)
    add_db(sub)
    add_admin(sub)
    add_token(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    if args.command == "token":
        return run_token(args)
    import uvloop

    try:
        if args.command == "cluster":
            return uvloop.run(_cluster_up(args))
        if args.command == "db":
            return uvloop.run(run_db(args))
        if args.command == "admin":
            return uvloop.run(run_admin(args))
        return uvloop.run(run_client(args))
    except UsageError as e:
        command = " ".join(
            ["ctxstore", args.command, *([args.client_command] if args.command == "client" else [])]
        )
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C ends a tail or an inbox: that is how they stop
        return EXIT_INTERRUPTED
