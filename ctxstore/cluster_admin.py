"""The cluster's operator endpoints on the ops port (design §5.6, docs/ctxstore.md "Placement"):

    GET  /admin/nodes                 200 the view as this node has applied it: every node (id,
                                      addresses, state, groups the view places on it, groups it
                                      leads as far as this node knows), each group's replicas,
                                      this node's hosted and led groups and moves in progress
    POST /admin/nodes/join?id=&peer=&client=   a new node asks to join (``serve --join``)
    POST /admin/nodes/drain?node=     its groups move away (``leaving``)
    POST /admin/nodes/remove?node=    a dead (or drained) node is removed: its id is retired
    POST /admin/nodes/rebalance       a leader-balancing round on this node now

Every POST is authenticated by the cluster's secret (the peer port's): its query carries
``ts`` (Unix seconds, within ``SKEW_S`` of the node's clock) and ``mac``, the hex HMAC-SHA256
of ``admin\\n<cluster_id>\\n<path>\\n<the other parameters, sorted>`` (``sign``).  A request
without a valid mac is answered 401 (``unauthorized``); a bad parameter 400 (``bad_request``).
A view change is checked against this node's view first (``retired``, ``conflict``,
``not_found``: 409/404 with that code) and then proposed to the meta group's leader (here or
forwarded): 202 ``{"proposed": ...}``; the caller polls GET /admin/nodes for its effect.  The
join's answer carries the cluster's first view (``initial_view``), which the new node keeps
in its node.json: the meta log it will replay begins after it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import msgspec

from raft import NONE

from .membership import (
    Join,
    MetaCommand,
    MetaRejected,
    NodeState,
    SetState,
)

if TYPE_CHECKING:
    from .node import Node
    from .ops import Answer, OpsServer

log = logging.getLogger(__name__)
JSON = "application/json"
SKEW_S = 300.0  # a signed request's ts may differ this much from the node's clock
PATHS = ("/admin/nodes/join", "/admin/nodes/drain", "/admin/nodes/remove", "/admin/nodes/rebalance")
_STATUS = {"retired": 409, "conflict": 409, "not_found": 404, "bad_request": 400}


def sign(secret: str, cluster_id: str, path: str, params: dict[str, str]) -> str:
    """The ``mac`` of a POST to ``path`` with ``params`` (``ts`` included, ``mac`` not)."""
    body = "&".join(f"{k}={params[k]}" for k in sorted(params))
    text = f"admin\n{cluster_id}\n{path}\n{body}".encode()
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()


def signed_target(secret: str, cluster_id: str, path: str, params: dict[str, str]) -> str:
    """``path?params&ts=..&mac=..`` for a POST now."""
    params = {**params, "ts": str(int(time.time()))}
    mac = sign(secret, cluster_id, path, params)
    return path + "?" + urllib.parse.urlencode({**params, "mac": mac})


def install(server: OpsServer, node: Node) -> None:
    server.routes[b"/admin/nodes"] = lambda: nodes(node)
    server.actions[b"/admin/nodes/join"] = lambda target: _signed(node, target, _join)
    server.actions[b"/admin/nodes/drain"] = lambda target: _signed(node, target, _drain)
    server.actions[b"/admin/nodes/remove"] = lambda target: _signed(node, target, _remove)
    server.actions[b"/admin/nodes/rebalance"] = lambda target: _signed(node, target, _rebalance)


def _answer(status: int, body: dict[str, Any]) -> Answer:
    return status, JSON, msgspec.json.encode(body)


def _error(status: int, code: str, message: str) -> Answer:
    return _answer(status, {"error": code, "message": message})


def _signed(node: Node, target: bytes, action: Any) -> Answer:
    path, _, query = target.decode("ascii", "replace").partition("?")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        return _error(400, "bad_request", "a malformed query")
    params = dict(pairs)
    if len(params) != len(pairs) or len(params) > 8:
        return _error(400, "bad_request", "a parameter given twice, or too many")
    mac = params.pop("mac", "")
    s = node.settings
    want = sign(s.secret, s.cluster_id, path, params)
    if not hmac.compare_digest(mac, want):
        return _error(401, "unauthorized", "no valid mac (signed with the cluster's secret)")
    try:
        ts = float(params.pop("ts"))
    except (KeyError, ValueError):
        return _error(400, "bad_request", "ts: Unix seconds expected")
    if abs(time.time() - ts) > SKEW_S:
        return _error(401, "unauthorized", f"ts is more than {SKEW_S:g} s from the node's clock")
    result: Answer = action(node, params)
    return result


def _int(params: dict[str, str], key: str) -> int | None:
    text = params.get(key, "")
    return int(text) if text.isdigit() and 0 < int(text) < 1 << 16 else None


def _propose(node: Node, cmd: MetaCommand, extra: dict[str, Any] | None = None) -> Answer:
    check = node.meta_result(cmd)
    if isinstance(check, MetaRejected):
        return _error(_STATUS.get(check.code, 409), check.code, check.message)
    node.propose_meta(cmd)
    fields = {f: msgspec.to_builtins(getattr(cmd, f)) for f in cmd.__struct_fields__}
    proposed = {"command": type(cmd).__name__, **fields}
    body = {"proposed": proposed, "version": node.view.version, **(extra or {})}
    log.warning("admin: proposed %r", cmd)
    return _answer(202, body)


def _join(node: Node, params: dict[str, str]) -> Answer:
    node_id = _int(params, "id")
    if node_id is None:
        return _error(400, "bad_request", "id: a node id in 1..65535 expected")
    cmd = Join(node_id, params.get("peer", ""), params.get("client", ""))
    initial = json.loads(msgspec.json.encode(node.meta.initial))
    return _propose(node, cmd, {"initial_view": initial, "groups": node.settings.groups})


def _set_state(node: Node, params: dict[str, str], state: NodeState) -> Answer:
    node_id = _int(params, "node")
    if node_id is None:
        return _error(400, "bad_request", "node: a node id in 1..65535 expected")
    return _propose(node, SetState(node_id, state))


def _drain(node: Node, params: dict[str, str]) -> Answer:
    return _set_state(node, params, NodeState.LEAVING)


def _remove(node: Node, params: dict[str, str]) -> Answer:
    return _set_state(node, params, NodeState.REMOVED)


def _rebalance(node: Node, params: dict[str, str]) -> Answer:
    steps = node.mover.balance(time.monotonic())
    return _answer(202, {"transfers": [[s.group, s.node] for s in steps]})


def nodes(node: Node) -> Answer:
    """GET /admin/nodes."""
    view, me, host = node.view, node.settings.node_id, node.host
    targets = view.targets()
    placed: dict[int, int] = {}
    for t in targets.values():
        for n in t:
            placed[n] = placed.get(n, 0) + 1
    leads: dict[int, int] = {}
    hosted = node.data_groups()
    for g in hosted:
        lead = host.leader(g)
        if lead != NONE:
            leads[lead] = leads.get(lead, 0) + 1
    body = {
        "node": me,
        "version": view.version,
        "meta_leader": node.group_leader(node.meta_group),
        "nodes": [
            {
                "id": n.id,
                "peer_address": n.peer_address,
                "client_address": n.client_address,
                "state": n.state.value,
                "groups": placed.get(n.id, 0),
                "leads": leads.get(n.id, 0),
                "connected": n.id == me or n.id in node._live(),
            }
            for n in sorted(view.nodes.values(), key=lambda n: n.id)
        ],
        "replicas": {str(g): list(t) for g, t in targets.items()},
        "local": {
            "hosted": hosted,
            "led": [g for g in hosted if host.leader(g) == me],
            "members": {
                str(g): sorted({*host.node(g).raft.voters, *host.node(g).raft.learners})
                for g in hosted
            },
            "moving": node.mover.stats.moving,
        },
    }
    return _answer(200, body)


__all__ = ["PATHS", "SKEW_S", "install", "nodes", "sign", "signed_target"]
