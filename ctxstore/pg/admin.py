"""The write-behind's operator endpoints on the ops port (installed with postgres_dsn):

    GET  /admin/postgres            200 the flusher's state and, for every group hosted here,
                                    its epoch and what waits (from this node's applied,
                                    replicated state); ``groups``: the cluster's data groups
    POST /admin/postgres/backfill   202 proposes ``PostgresFlushed(reset=True)`` to every group
                                    hosted here (forwarded to its leader): everything is copied
                                    again

With more than three nodes a node hosts only some groups (design §5.6): ``ctxstore db backfill``
asks the nodes it is given which groups they host, refuses (resetting nothing) unless they host
every group together, posts the reset to as few of them as cover every group, then polls their
status until every group's epoch moved past the one it saw and ``backfill_rows`` is 0.  A reset
is idempotent in effect (rows Postgres holds are skipped); the ops port, like /metrics, is for
operators only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec

from ..commands import PostgresFlushed, encode_command

if TYPE_CHECKING:
    from ..node import Node
    from ..ops import Answer, OpsServer

log = logging.getLogger(__name__)
JSON = "application/json"


def install(server: OpsServer, node: Node) -> None:
    server.routes[b"/admin/postgres"] = lambda: status(node)
    server.posts[b"/admin/postgres/backfill"] = lambda: backfill(node)


def status(node: Node) -> Answer:
    state, flusher = node.state, node.postgres
    assert flusher is not None
    groups = node.data_groups()
    body: dict[str, Any] = {
        "node": node.settings.node_id,
        "groups": node.settings.groups,
        "hosted": sorted(groups),
        "connected": flusher.stats.connected,
        "last_error": flusher.stats.last_error,
        "led_backlog_rows": flusher.backlog_rows(),
        "backlog_rows": sum(state.postgres_backlog(g) for g in groups),
        "backfill_rows": sum(state.postgres_backfill_rows(g) for g in groups),
        "pending_sessions": sum(len(state.postgres_pending(g)) for g in groups),
        "epochs": {str(g): state.postgres_epoch(g) for g in groups},
    }
    return 200, JSON, msgspec.json.encode(body)


def backfill(node: Node) -> Answer:
    groups = node.data_groups()
    command = encode_command(PostgresFlushed([], reset=True))

    def done(result: object, error: BaseException | None) -> None:
        if error is not None:
            log.warning("postgres backfill: a group's reset failed: %s", error)

    epochs = {str(g): node.state.postgres_epoch(g) for g in groups}
    for g in groups:
        node.router.submit_then(g, command, done)
    log.warning("postgres backfill: every group copies its history again (%d groups)", len(groups))
    body = {
        "node": node.settings.node_id,
        "groups": len(groups),
        "hosted": sorted(groups),
        "epochs": epochs,
    }
    return 202, JSON, msgspec.json.encode(body)


__all__ = ["backfill", "install", "status"]
