"""What the ``ctxstore`` command's parts share: exit statuses by class, the help's layout, JSON
output, and argument types whose errors name their flag (argparse's status 2)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import msgspec

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


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped as usual; the exit statuses' table kept as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit status:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(Exception):
    """A bad argument found after parsing (an unreadable --text-file): exit status 2."""


def emit(obj: Any, stream: Any = None) -> None:
    """One JSON object per line (Structs as objects with their field names; text as it is,
    non-ASCII characters included)."""
    if isinstance(obj, msgspec.Struct):
        obj = msgspec.structs.asdict(obj)
    stream = stream or sys.stdout
    stream.write(json.dumps(msgspec.to_builtins(obj), ensure_ascii=False) + "\n")
    stream.flush()


# -- argument types: a bad value is a usage error naming its flag ---------------------------------
def int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
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


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def targets(text: str) -> str:
    from wire.client import parse_targets

    try:
        addresses = parse_targets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (expected HOST:PORT[,HOST:PORT...])") from None
    for host, port in addresses:
        if not 0 < port <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} of {host} is not in 1..65535")
    return text


def _json(text: str, kind: type[Any], name: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, kind):
        raise argparse.ArgumentTypeError(f"expected a JSON {name}, got {text[:64]!r}")
    return value


def json_object(text: str) -> dict[str, Any]:
    value: dict[str, Any] = _json(text, dict, "object")
    return value


def json_array(text: str) -> list[Any]:
    value: list[Any] = _json(text, list, "array")
    return value


def os_error(e: OSError) -> str:
    """An OSError's reason and the file it is about, for a one-line message."""
    text = e.strerror or str(e)
    return f"{text}: {e.filename}" if e.filename else text
