"""What the wire schema cannot check about an agent (``wire.protocol.Agent``): its URL's host
and port, and the request headers ctxstore sets itself."""

from __future__ import annotations

from urllib.parse import urlsplit

from wire.protocol import Agent

from ..records import AgentRecord

RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "upgrade",
     "te", "keep-alive", "proxy-connection", "accept"}
)  # fmt: skip
"""Set by the webhook client (HTTP/2 forbids the connection-specific ones)."""


def check_agent(agent: Agent) -> tuple[str, str] | None:
    """(field, message) of the first thing wrong with ``agent``, None if nothing is."""
    try:
        url = urlsplit(agent.url)
        port = url.port
    except ValueError as e:
        return "agent.url", f"not a URL ({e})"
    if url.scheme not in ("http", "https") or not url.hostname:
        return "agent.url", "an http:// or https:// URL with a host"
    if port == 0:
        return "agent.url", "port 0"
    if url.fragment:
        return "agent.url", "a webhook URL has no fragment"
    for name in agent.headers:
        if name.lower() in RESERVED_HEADERS:
            return f"agent.headers.{name}", "set by ctxstore itself"
    if agent.idle_timeout_ms > agent.timeout_ms:
        return "agent.idle_timeout_ms", "at most timeout_ms"
    return None


def origin_of(agent: Agent | AgentRecord) -> tuple[str, str, int]:
    """(scheme, host, port) of the agent's webhook."""
    url = urlsplit(agent.url)
    assert url.hostname is not None
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.hostname, port


def target_of(agent: Agent | AgentRecord) -> str:
    """The request target: the URL's path and query."""
    url = urlsplit(agent.url)
    path = url.path or "/"
    return f"{path}?{url.query}" if url.query else path


__all__ = ["RESERVED_HEADERS", "check_agent", "origin_of", "target_of"]
