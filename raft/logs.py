"""Log lines as JSON, one object per line: what ``ctxstore serve`` and
``python -m bench.raft_testnode`` write on stderr.

Each line is ``{"t": "2026-01-31T12:00:00.123Z", "level": "WARNING", "logger": "ctxstore.node",
"msg": "..."}``, plus ``"exc"`` (the formatted traceback) when the record carries an exception
and ``"stack"`` when it carries a stack.  ``msg`` is the formatted message as text: a line
always parses as JSON, whatever the message holds (quotes, newlines, non-ASCII characters,
which are written as they are).
"""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "t": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """UTC, ISO 8601, to the millisecond."""
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"


__all__ = ["JsonFormatter"]
