"""The transport a native connection (``wire.aio.Connection``) of the web port writes into.

A WebSocket, an API request or an event stream (``web``, ``web_http``, ``web_sse``) is served
by a native connection that has no socket of its own: it writes its frames into a ``Pipe``,
which gives them to its owner (which sends them as WebSocket messages, an HTTP answer or
events); the owner's socket (if it has one: ``flow``) is what the write-buffer and
flow-control questions are about.  Without ``flow`` the pipe has no buffer (an answer is
written at once).  The native connection's close and abort, and its wish to stop or resume
reading, go to the owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol


class PipeOwner(Protocol):
    def write_frames(self, data: bytes | bytearray | memoryview) -> None: ...

    def pipe_closed(self) -> None: ...

    def pipe_aborted(self) -> None: ...

    def set_reading(self, reading: bool) -> None: ...

    @property
    def pipe_closing(self) -> bool: ...


class Pipe(asyncio.Transport):
    def __init__(
        self,
        owner: PipeOwner,
        flow: asyncio.Transport | None,
        extra_info: Callable[[str], Any],
    ) -> None:
        super().__init__()
        self.owner = owner
        self.flow = flow
        self.extra_info = extra_info
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.owner.write_frames(data)

    def close(self) -> None:
        self.owner.pipe_closed()

    def abort(self) -> None:
        self.owner.pipe_aborted()

    def is_closing(self) -> bool:
        return self.owner.pipe_closing

    def get_write_buffer_size(self) -> int:
        return 0 if self.flow is None else self.flow.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.flow is not None:
            self.flow.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        value = self.extra_info(name)
        return default if value is None else value

    def pause_reading(self) -> None:
        self.reading = False
        self.owner.set_reading(False)

    def resume_reading(self) -> None:
        self.reading = True
        self.owner.set_reading(True)

    def is_reading(self) -> bool:
        return self.reading


__all__ = ["Pipe", "PipeOwner"]
