"""``ctxstore client``: one command to a cluster, JSON lines out (cli.py has the rest)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from .cli_agents import add_agent, run_agent
from .cli_common import (
    EXIT_ANSWER,
    EXIT_CONNECT,
    EXIT_STATUSES,
    HelpFormatter,
    UsageError,
    emit,
    int_in,
    json_array,
    json_object,
    os_error,
    seconds,
    targets,
)

if TYPE_CHECKING:
    from wire.client import Client


def add_client(sub: Any) -> None:
    p = sub.add_parser(
        "client",
        help="talk to a cluster: one command, JSON lines out",
        description="Send one command to a ctxstore cluster. Results are JSON lines on stdout "
        "(text as it is, non-ASCII included); an error is one JSON line "
        '{"error": code, "message": ...} on stderr.',
        epilog=EXIT_STATUSES,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--target",
        required=True,
        type=targets,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the nodes' client addresses, tried in this order; the client fails "
        "over between them (required)",
    )
    p.add_argument(
        "--token", default=None, help="the client token, when the nodes require one (default: none)"
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="each request's deadline in seconds, > 0 (default: 10)",
    )
    c = p.add_subparsers(dest="client_command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        description = text[0].upper() + text[1:] + "."
        parser: argparse.ArgumentParser = c.add_parser(
            name,
            help=text,
            description=description,
            epilog=EXIT_STATUSES,
            formatter_class=HelpFormatter,
        )
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
        type=json_object,
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
        type=int_in(1, 1000),
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
        "(one of --text, --text-file and --parts is required)",
    )
    text.add_argument(
        "--text-file",
        metavar="FILE",
        help="read the message's text from FILE (UTF-8), as it is (one of --text, "
        "--text-file and --parts is required)",
    )
    text.add_argument(
        "--parts",
        type=json_array,
        metavar="JSON",
        help="a structured message: a JSON array of AI SDK UI-message parts, e.g. "
        '\'[{"type": "text", "text": "hi"}]\' (one of --text, --text-file and --parts is required)',
    )
    ap.add_argument(
        "--role",
        choices=("user", "assistant", "system", "tool"),
        default=None,
        help="the message's role (default: the sender's: user, assistant for an agent, system)",
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
        type=int_in(0),
        default=None,
        metavar="N",
        help="append only if the session's last seq is N, else conflict (default: no check)",
    )
    rd = command("read", "print a session's messages, one per line")
    rd.add_argument("session", help="the session's id")
    rd.add_argument(
        "--after-seq",
        type=int_in(0),
        default=0,
        metavar="N",
        help="print the messages after this seq, >= 0 (default: 0)",
    )
    rd.add_argument(
        "--limit",
        type=int_in(1),
        default=100,
        metavar="N",
        help="print at most this many messages, >= 1 (default: 100)",
    )
    tl = command("tail", "follow a session: its messages, then live ones, until Ctrl-C")
    tl.add_argument("session", help="the session's id")
    tl.add_argument(
        "--after-seq",
        type=int_in(0),
        default=0,
        metavar="N",
        help="start after this seq, >= 0 (default: 0)",
    )
    tl.add_argument(
        "--count",
        type=int_in(1),
        default=None,
        metavar="N",
        help="stop after this many messages (default: run until Ctrl-C)",
    )
    ib = command("inbox", "follow a user's inbox: a snapshot, then deltas, until Ctrl-C")
    ib.add_argument("user", help="the user's id")
    ib.add_argument(
        "--count",
        type=int_in(1),
        default=None,
        metavar="N",
        help="stop after this many deltas (default: run until Ctrl-C)",
    )
    mr = command("mark-read", "set a user's read cursor in a session")
    mr.add_argument("session", help="the session's id")
    mr.add_argument("--user", required=True, help="the user's id (required)")
    mr.add_argument(
        "--seq",
        type=int_in(0),
        required=True,
        metavar="N",
        help="the last seq the user read, >= 0 (required)",
    )
    cx = command("context", "print a session's context window as one JSON object")
    cx.add_argument("session", help="the session's id")
    cc = command("configure-context", "set a session's context window configuration")
    cc.add_argument("session", help="the session's id")
    cc.add_argument(
        "--budget",
        type=int_in(1),
        required=True,
        metavar="TOKENS",
        help="the window's token budget, >= 1 (required)",
    )
    cc.add_argument(
        "--ratio",
        type=ratio,
        default=0.7,
        metavar="R",
        help="compaction is needed over budget x R, 0 < R <= 1 (default: 0.7)",
    )
    cc.add_argument(
        "--policy",
        choices=("last_n", "skip_parts", "token_budget", "manual"),
        default="manual",
        help="last_n: the newest --limit messages; skip_parts: leave out parts whose type "
        "starts with one of --skip (and keep at most --limit messages if given); "
        "token_budget: drop the oldest messages to fit budget x ratio; manual: compact "
        "yourself (default: manual)",
    )
    cc.add_argument(
        "--limit",
        type=int_in(1, 100_000),
        default=None,
        metavar="N",
        help="messages kept by last_n (required with it) or skip_parts (default: no limit)",
    )
    cc.add_argument(
        "--skip",
        default=None,
        metavar="PREFIX[,PREFIX...]",
        help="part type prefixes skip_parts leaves out, e.g. tool-,reasoning (required with it)",
    )
    cc.add_argument(
        "--tokenizer",
        choices=("o200k_base", "cl100k_base"),
        default=None,
        help="count this session's tokens with it (default: the node's)",
    )
    cp = command("compact", "replace a range of a session's context window; print the window")
    cp.add_argument("session", help="the session's id")
    cp.add_argument(
        "--from-seq",
        type=int_in(1),
        required=True,
        metavar="N",
        help="the first seq of the range (required)",
    )
    cp.add_argument(
        "--to-seq",
        type=int_in(1),
        required=True,
        metavar="N",
        help="the last seq of the range (required)",
    )
    cp.add_argument(
        "--replacement",
        type=json_array,
        required=True,
        metavar="JSON",
        help='the messages that replace it, a JSON array of {"role", "content" or "parts", '
        '"kind" (default summary), "metadata", "token_count"}, e.g. '
        '\'[{"role": "system", "content": "the story so far"}]\' (required)',
    )
    cp.add_argument(
        "--if-version",
        type=int_in(0),
        default=None,
        metavar="V",
        help="only if the window is at version V, else conflict (default: no check)",
    )
    command("ping", "check that a node answers")
    add_agent(command)


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 1, not {value}")
    return value


def _policy(args: argparse.Namespace) -> Any:
    from wire.protocol import LastN, Manual, SkipParts, TokenBudget

    if args.policy == "last_n":
        if args.limit is None:
            raise UsageError("argument --limit: required with --policy last_n")
        return LastN(args.limit)
    if args.policy == "skip_parts":
        if not args.skip:
            raise UsageError("argument --skip: required with --policy skip_parts")
        return SkipParts([p for p in args.skip.split(",") if p], args.limit)
    if args.limit is not None or args.skip is not None:
        raise UsageError(f"arguments --limit and --skip do not apply to --policy {args.policy}")
    return TokenBudget() if args.policy == "token_budget" else Manual()


def _replacement(items: list[Any]) -> list[Any]:
    from wire.protocol import NewMessage

    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"argument --replacement: item {i} is not a JSON object")
        full = {
            "kind": "summary",
            "content": "",
            "parts": None,
            "metadata": {},
            "token_count": None,
            **item,
        }
        try:
            out.append(msgspec.convert(full, NewMessage))
        except msgspec.ValidationError as e:
            raise UsageError(f"argument --replacement: item {i}: {e}") from None
    return out


def _message_text(args: argparse.Namespace) -> str:
    """An append's text: --text, stdin for --text -, or the file of --text-file."""
    if args.text_file is None:
        return sys.stdin.read() if args.text == "-" else str(args.text)
    try:
        with open(args.text_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"argument --text-file: cannot read it: {os_error(e)}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"argument --text-file: not UTF-8 text: {e}") from None


async def run_client(args: argparse.Namespace) -> int:
    from wire.client import NON_RETRYABLE_REFUSALS, ClientError, connect

    text = ""
    if args.client_command == "append" and args.parts is None:
        text = _message_text(args)
    if args.client_command == "configure-context":
        args.policy = _policy(args)
    if args.client_command == "compact":
        args.replacement = _replacement(args.replacement)
    try:
        client = await connect(args.target, token=args.token, timeout_s=args.timeout)
    except ClientError as e:
        emit({"error": e.code, "message": e.message}, sys.stderr)
        return EXIT_ANSWER if e.code in NON_RETRYABLE_REFUSALS else EXIT_CONNECT
    try:
        return await _command(client, args, text)
    except ClientError as e:
        emit({"error": e.code, "message": e.message, "details": e.details}, sys.stderr)
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
                emit({"error": "conflict", "message": message, "details": existing}, sys.stderr)
                return EXIT_ANSWER
            emit(info.session)
        case "get-session":
            emit((await client.get_session(args.session)).session)
        case "list-sessions":
            cursor = None
            while True:
                page = await client.list_sessions(args.user, cursor, args.limit)
                for s in page.sessions:
                    emit(s)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        case "append":
            ack = await client.append_with_retry(
                args.session,
                text,
                args.sender,
                args.sender_id,
                args.kind,
                client_msg_id=args.client_msg_id,
                expected_seq=args.expected_seq,
                role=args.role,
                parts=args.parts,
            )
            emit({"seq": ack.seq, "inserted_at": ack.inserted_at, "deduped": ack.deduped})
        case "read":
            after, left = args.after_seq, args.limit
            while left > 0:
                got = await client.read(args.session, after, min(left, 1000))
                for m in got.messages:
                    emit(m)
                if not got.messages:
                    break
                after = got.messages[-1].seq
                left -= len(got.messages)
        case "mark-read":
            marked = await client.mark_read(args.session, args.user, args.seq)
            emit({"session_id": marked.session_id, "user_id": marked.user_id, "seq": marked.seq})
        case "ping":
            await client.ping()
            emit({"pong": True})
        case "context":
            emit(_answer(await client.get_context(args.session)))
        case "configure-context":
            await client.set_context_config(
                args.session, args.budget, args.policy, args.ratio, args.tokenizer
            )
            emit(_answer(await client.get_context(args.session)))
        case "compact":
            await client.compact(
                args.session, args.from_seq, args.to_seq, args.replacement, args.if_version
            )
            emit(_answer(await client.get_context(args.session)))
        case "tail":
            await _tail(client, args.session, args.after_seq, args.count)
        case "inbox":
            await _inbox(client, args.user, args.count)
        case "agent":
            await run_agent(client, args)
    return 0


def _answer(response: Any) -> Any:
    """A response as the HTTP API writes it (JSON objects, no rid)."""
    from .web_http import answer_twin

    return msgspec.convert(response, answer_twin(type(response)), from_attributes=True)


async def _tail(client: Any, session_id: str, after_seq: int, count: int | None) -> None:
    """One JSON line per message; a gap is a line {"gap": {"from_seq", "to_seq", "reason"}}."""
    from wire.protocol import ContextEvent, GapEvent

    seen = 0
    async with client.subscribe(session_id, after_seq) as sub:
        async for item in sub:
            if isinstance(item, GapEvent):
                emit(
                    {
                        "gap": {
                            "from_seq": item.from_seq,
                            "to_seq": item.to_seq,
                            "reason": item.reason,
                        }
                    }
                )
                continue
            if isinstance(item, ContextEvent):
                emit({"context": msgspec.structs.asdict(item)})
                continue
            emit(item)
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
                emit({"snapshot": entries, "truncated": item.truncated})
                continue
            emit({"delta": [msgspec.structs.asdict(e) for e in item.entries]})
            deltas += 1
            if count is not None and deltas >= count:
                return
