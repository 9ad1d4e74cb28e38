"""The ctxstore command (also python -m ctxstore): serve, cluster up, client.

    ctxstore serve [--config FILE] [--node-id N] [--data-dir DIR] [--listen H:P] ...
    ctxstore cluster up [--nodes 3] [--base-port P] [--data-dir DIR] [-- flags for every node]
    ctxstore client --target H:P[,H:P...] [--token T] [--timeout S] COMMAND ...

``serve`` prints JSON events on stdout (``listening`` once the client port is open, ``ready``
once every group has a known leader, ``stopped``) and logs JSON lines on stderr (``logs.py``).
Client commands print one JSON object per line; their errors print one line
``{"error": code, "message": ...}`` on stderr.  Every failure ends with one line, never a
traceback, and an exit status by its class (``EXIT_*`` below, listed by ``ctxstore --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from msgspec import inspect as schema

from .collector import tune_collector
from .config import FIELDS, HELP, ConfigError, Settings, load, parse_address, unknown_env
from .logs import configure as configure_logs

if TYPE_CHECKING:  # imported when serving only: the client commands start faster without them
    from wire.aio import Server
    from wire.client import Client

    from .launcher import LocalCluster
    from .node import Node
    from .ops import OpsServer
    from .server import Service

T = TypeVar("T")

EXIT_USAGE = 2  # bad arguments, flags, configuration or input file (argparse's status too)
EXIT_CONNECT = 3  # no target answered, or it does not speak the ctxstore protocol
EXIT_ANSWER = 4  # the server answered an error (its code is in the line on stderr)
EXIT_START = 5  # a node could not start: a port in use, a data directory locked or unusable
EXIT_FATAL = 70  # a running node failed (WAL, archive) or overran its shutdown timeout
EXIT_INTERRUPTED = 130  # Ctrl-C (how tail and inbox stop)

EXIT_STATUSES = f"""exit status:
  0    done
  {EXIT_USAGE}    bad arguments, flags, configuration or input file
  {EXIT_CONNECT}    cannot connect: no target answered, or it is not a ctxstore node
  {EXIT_ANSWER}    the server answered an error (its code is on stderr)
  {EXIT_START}    a node could not start: a port in use, a data directory locked or unusable
  {EXIT_FATAL}   a running node failed (WAL or archive error) or overran its shutdown timeout
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""


class _HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped as usual; the exit statuses' table kept as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit status:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(Exception):
    """A bad argument found after parsing (an unreadable --text-file): exit status 2."""


class StartupError(Exception):
    """A node cannot start for a reason its operator must fix: exit status 5."""


def _emit(obj: Any, stream: Any = None) -> None:
    """One JSON object per line (Structs as objects with their field names; text as it is,
    non-ASCII characters included)."""
    if isinstance(obj, msgspec.Struct):
        obj = msgspec.structs.asdict(obj)
    stream = stream or sys.stdout
    stream.write(json.dumps(msgspec.to_builtins(obj), ensure_ascii=False) + "\n")
    stream.flush()


# -- argument types: a bad value is a usage error naming its flag ---------------------------------
def _int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"{minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _targets(text: str) -> str:
    from wire.client import parse_targets

    try:
        targets = parse_targets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (expected HOST:PORT[,HOST:PORT...])") from None
    for host, port in targets:
        if not 0 < port <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} of {host} is not in 1..65535")
    return text


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _port_base(text: str) -> int:
    value = _int_in(0)(text)
    if value + 200 + 6 > 65535:  # the ops ports of up to 7 nodes
        raise argparse.ArgumentTypeError(f"must be at most {65535 - 206}, got {value}")
    return value


# -- serve ----------------------------------------------------------------------------------------
SERVE_METAVARS = {
    "data_dir": "DIR",
    "listen": "HOST:PORT",
    "peer_listen": "HOST:PORT",
    "http": "HOST:PORT",
    "peers": "ID=HOST:PORT,...",
    "cluster_id": "NAME",
    "secret": "SECRET",
    "log_level": "LEVEL",
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
        formatter_class=_HelpFormatter,
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
    node, service, server, ops = await _start(settings)
    event = {
        "event": "listening",
        "node": settings.node_id,
        "listen": "{}:{}".format(*server.address),
    }
    if ops is not None:
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


async def _start(settings: Settings) -> tuple[Node, Service, Server, OpsServer | None]:
    """Open the data directory, start Raft and open the ports; an operator's problem (a port in
    use, a data directory locked by another node or unusable) is a ``StartupError`` naming
    its key, after what was started is stopped."""
    from wire.aio import serve as wire_serve

    from .server import Service

    node = _open_node(settings)
    server: Server | None = None
    try:
        await _opening("peer_listen", settings, node.start())
        tune_collector(settings.gc_young_threshold)
        service = Service(node)
        host, port = parse_address(settings.listen, "listen")
        server = await _opening("listen", settings, wire_serve(service, host, port))
        bound = server.address
        node.advertise(f"{bound[0]}:{bound[1]}")
        ops = None
        if settings.http is not None:
            from .ops import serve_ops

            address = parse_address(settings.http, "http")
            ops = await _opening(
                "http", settings, serve_ops(node, service, *address, clients=server)
            )
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
        raise StartupError(f"{where}: {_os_error(e)}") from None
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
        raise StartupError(f"data_dir {settings.data_dir}: {_os_error(e)}") from None


def _os_error(e: OSError) -> str:
    text = e.strerror or str(e)
    return f"{text}: {e.filename}" if e.filename else text


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
        formatter_class=_HelpFormatter,
    )
    up.add_argument(
        "--nodes",
        type=_int_in(1, 7),
        default=3,
        metavar="N",
        help="how many nodes, 1 to 7 (default: 3)",
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
        _emit({"error": "start_failed", "message": f"data dir {data_dir}: {_os_error(e)}"},
              sys.stderr)  # fmt: skip
        return EXIT_START
    extra = [a for a in args.extra if a != "--"]
    cluster = LocalCluster(args.nodes, data_dir, args.base_port, extra)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))  # type: ignore[func-returns-value]
    try:
        await cluster.start()
    except (NodeExited, TimeoutError) as e:
        failed: dict[str, Any] = {"error": "start_failed", "message": str(e)}
        if isinstance(e, NodeExited):
            failed.update(node=e.node, log=e.log_path, log_tail=cluster.log_tail(e.node))
        _emit(failed, sys.stderr)
        await cluster.stop()
        return EXIT_START
    _emit({
        "nodes": [{"id": c.id, "pid": c.process.pid if c.process else None,
                   "client": c.target, "ops": c.ops_target,
                   "data_dir": c.data_dir, "log": c.log_path}
                  for c in cluster.children.values()],
        "targets": ",".join(cluster.targets),
    })  # fmt: skip
    everyone_exited = await _watch(cluster, stop)
    codes = await cluster.stop()
    _emit({"event": "stopped", "data_dir": cluster.data_dir,
           "nodes": [{"id": i, "exit_code": code} for i, code in codes.items()]})  # fmt: skip
    return EXIT_FATAL if everyone_exited else 0


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
                _emit(exited, sys.stderr)
    finally:
        for task in exits:
            task.cancel()
    return not exits


# -- client ---------------------------------------------------------------------------------------
def _add_client(sub: Any) -> None:
    p = sub.add_parser(
        "client",
        help="talk to a cluster: one command, JSON lines out",
        description="Send one command to a ctxstore cluster. Results are JSON lines on stdout "
        "(text as it is, non-ASCII included); an error is one JSON line "
        '{"error": code, "message": ...} on stderr.',
        epilog=EXIT_STATUSES,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--target",
        required=True,
        type=_targets,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the nodes' client addresses, tried in this order; the client fails "
        "over between them (required)",
    )
    p.add_argument(
        "--token", default=None, help="the client token, when the nodes require one (default: none)"
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="each request's deadline in seconds, > 0 (default: 10)",
    )
    c = p.add_subparsers(dest="client_command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        description = text[0].upper() + text[1:] + "."
        parser: argparse.ArgumentParser = c.add_parser(
            name, help=text, description=description, epilog=EXIT_STATUSES,
            formatter_class=_HelpFormatter,
        )  # fmt: skip
        return parser

    cs = command("create-session", "create a session of a user with an agent; print it")
    cs.add_argument("--user", required=True, help="the user's id (required)")
    cs.add_argument("--agent", required=True, help="the agent's id (required)")
    cs.add_argument(
        "--id",
        default=None,
        help="the session's id; if it exists with the same "
        "user, agent and metadata it is printed, with other metadata it is an error "
        "(default: a new id)",
    )
    cs.add_argument(
        "--metadata",
        type=_json_object,
        default={},
        metavar="JSON",
        help="a JSON object stored with the session (default: {})",
    )
    gs = command("get-session", "print a session")
    gs.add_argument("session", help="the session's id")
    ls = command("list-sessions", "print a user's sessions, one per line")
    ls.add_argument("--user", required=True, help="the user's id (required)")
    ls.add_argument(
        "--limit",
        type=_int_in(1, 1000),
        default=100,
        metavar="N",
        help="sessions asked per request, 1 to 1000; all are printed (default: 100)",
    )
    ap = command("append", "append a message to a session; print its seq")
    ap.add_argument("session", help="the session's id")
    text = ap.add_mutually_exclusive_group(required=True)
    text.add_argument(
        "--text",
        help="the message's text; - reads it from stdin "
        "(one of --text and --text-file is required)",
    )
    text.add_argument(
        "--text-file",
        metavar="FILE",
        help="read the message's text from FILE (UTF-8), as it is (one of --text and "
        "--text-file is required)",
    )
    ap.add_argument(
        "--sender",
        choices=("user", "agent", "system"),
        default="user",
        help="who wrote it (default: user)",
    )
    ap.add_argument("--sender-id", default="", help="the writer's id (default: empty)")
    ap.add_argument("--kind", default="text", help="the message's kind (default: text)")
    ap.add_argument(
        "--client-msg-id",
        default=None,
        help="an id that makes the append idempotent: sent again, it returns the "
        "first seq with deduped true (default: a new id per call)",
    )
    ap.add_argument(
        "--expected-seq",
        type=_int_in(0),
        default=None,
        metavar="N",
        help="append only if the session's last seq is N, else conflict (default: no check)",
    )
    rd = command("read", "print a session's messages, one per line")
    rd.add_argument("session", help="the session's id")
    rd.add_argument(
        "--after-seq",
        type=_int_in(0),
        default=0,
        metavar="N",
        help="print the messages after this seq, >= 0 (default: 0)",
    )
    rd.add_argument(
        "--limit",
        type=_int_in(1),
        default=100,
        metavar="N",
        help="print at most this many messages, >= 1 (default: 100)",
    )
    tl = command("tail", "follow a session: its messages, then live ones, until Ctrl-C")
    tl.add_argument("session", help="the session's id")
    tl.add_argument(
        "--after-seq",
        type=_int_in(0),
        default=0,
        metavar="N",
        help="start after this seq, >= 0 (default: 0)",
    )
    tl.add_argument(
        "--count",
        type=_int_in(1),
        default=None,
        metavar="N",
        help="stop after this many messages (default: run until Ctrl-C)",
    )
    ib = command("inbox", "follow a user's inbox: a snapshot, then deltas, until Ctrl-C")
    ib.add_argument("user", help="the user's id")
    ib.add_argument(
        "--count",
        type=_int_in(1),
        default=None,
        metavar="N",
        help="stop after this many deltas (default: run until Ctrl-C)",
    )
    mr = command("mark-read", "set a user's read cursor in a session")
    mr.add_argument("session", help="the session's id")
    mr.add_argument("--user", required=True, help="the user's id (required)")
    mr.add_argument(
        "--seq",
        type=_int_in(0),
        required=True,
        metavar="N",
        help="the last seq the user read, >= 0 (required)",
    )
    command("ping", "check that a node answers")


def _message_text(args: argparse.Namespace) -> str:
    """An append's text: --text, stdin for --text -, or the file of --text-file."""
    if args.text_file is None:
        return sys.stdin.read() if args.text == "-" else str(args.text)
    try:
        with open(args.text_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"argument --text-file: cannot read it: {_os_error(e)}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"argument --text-file: not UTF-8 text: {e}") from None


async def _client(args: argparse.Namespace) -> int:
    from wire.client import NON_RETRYABLE_REFUSALS, ClientError, connect

    text = _message_text(args) if args.client_command == "append" else ""
    try:
        client = await connect(args.target, token=args.token, timeout_s=args.timeout)
    except ClientError as e:
        _emit({"error": e.code, "message": e.message}, sys.stderr)
        return EXIT_ANSWER if e.code in NON_RETRYABLE_REFUSALS else EXIT_CONNECT
    try:
        return await _command(client, args, text)
    except ClientError as e:
        _emit({"error": e.code, "message": e.message, "details": e.details}, sys.stderr)
        return EXIT_CONNECT if client.target is None else EXIT_ANSWER  # None: connection lost
    finally:
        await client.close()


async def _command(client: Client, args: argparse.Namespace, text: str) -> int:
    match args.client_command:
        case "create-session":
            info = await client.create_session(args.user, args.agent, args.metadata, args.id)
            if info.session.metadata != args.metadata:  # the id exists: created before
                existing = msgspec.structs.asdict(info.session)
                message = f"session {info.session.id} exists with other metadata"
                _emit({"error": "conflict", "message": message, "details": existing}, sys.stderr)
                return EXIT_ANSWER
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
                args.session, text, args.sender, args.sender_id, args.kind,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxstore",
        description="ctxstore: a replicated store for conversations between users and agents.",
        epilog=EXIT_STATUSES,
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_cluster(sub)
    _add_client(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    import uvloop

    try:
        if args.command == "cluster":
            return uvloop.run(_cluster_up(args))
        return uvloop.run(_client(args))
    except UsageError as e:
        command = " ".join(
            ["ctxstore", args.command, *([args.client_command] if args.command == "client" else [])]
        )
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C ends a tail or an inbox: that is how they stop
        return EXIT_INTERRUPTED
