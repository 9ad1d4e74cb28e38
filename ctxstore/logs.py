"""A node's logs: one JSON object per line on stderr (``ctxstore serve``), in the format of
``raft.logs.JsonFormatter`` (shared with ``python -m bench.raft_testnode``).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from raft.logs import JsonFormatter


def configure(level: str, stream: TextIO | None = None) -> None:
    """Send every logger's records at ``level`` and above to ``stream`` (stderr) as JSON lines,
    replacing any handler the root logger had."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


__all__ = ["JsonFormatter", "configure"]
