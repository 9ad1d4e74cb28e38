"""``ctxstore serve --join HOST:PORT``: a new node's way into a running cluster (design §5.6).

Before the node opens its data directory (which must hold no ``node.json`` yet), ``admit``
asks the node at ``join`` (its HTTP port, ``cluster_admin``) to add it: a signed
``POST /admin/nodes/join`` with this node's id, peer address (``peer_listen``: the address the
others dial, so not 0.0.0.0) and client address (``listen``).  The meta leader proposes
``Join`` (the node is ``joining``); ``admit`` polls ``GET /admin/nodes`` until the view shows
it, then writes its ``node.json`` with the cluster's first view (from the answer) and no
founders.  Then the node starts as any other: the others dial it once they applied the join,
the meta leader adds it to the meta group as a learner and activates it, and the leaders of
the groups the view now places on it add it to them (ctxstore/mover.py).

A refusal is final and says why (``JoinRefused``: a retired id, an address or id in use, a
wrong secret, another group count); a node that already has its ``node.json`` just starts
(a restart: ``join`` is then ignored).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import h11

from .cli_db import http_call
from .cluster_admin import signed_target
from .config import ConfigError, Settings, parse_address
from .node import IDENTITY_FILE, write_identity

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 10.0
ADMIT_TIMEOUT_S = 60.0
REASK_S = 3.0  # the join is asked again while the view does not show it


class JoinRefused(ConfigError):
    """The cluster will not take this node (the message says why)."""


async def admit(settings: Settings, timeout_s: float = ADMIT_TIMEOUT_S) -> bool:
    """Have the cluster at ``settings.join`` add this node; False if the data directory was
    admitted before (nothing asked).  Raises ``JoinRefused``, or ``ConfigError`` when the
    cluster cannot be reached in ``timeout_s``."""
    assert settings.join is not None
    if os.path.exists(os.path.join(settings.data_dir, IDENTITY_FILE)):
        return False
    address = parse_address(settings.join, "join")
    params = {
        "id": str(settings.node_id),
        "peer": settings.peer_listen,
        "client": settings.listen,
    }
    path = "/admin/nodes/join"
    deadline = time.monotonic() + timeout_s
    body: Any = None
    asked = -1.0
    while True:
        if time.monotonic() - asked >= REASK_S:  # (a proposal lost to a leader change)
            asked = time.monotonic()
            status, body = await _call(address, "POST", lambda: signed_target(
                settings.secret, settings.cluster_id, path, params), deadline)  # fmt: skip
            if status != 202:
                code = body.get("error", "refused") if isinstance(body, dict) else "refused"
                message = body.get("message", body) if isinstance(body, dict) else body
                raise JoinRefused(f"join: {settings.join} refused node {settings.node_id}: "
                                  f"{code}: {message}")  # fmt: skip
            if body.get("groups") != settings.groups:
                raise JoinRefused(
                    f"join: the cluster has {body.get('groups')} groups; this node is "
                    f"configured with {settings.groups} (config: groups)"
                )
        status, view = await _call(address, "GET", lambda: "/admin/nodes", deadline)
        nodes = view.get("nodes", ()) if status == 200 and isinstance(view, dict) else ()
        mine = next((n for n in nodes if n["id"] == settings.node_id), None)
        if mine is not None:
            if mine["state"] == "removed":
                raise JoinRefused(f"join: node id {settings.node_id} was removed: retired")
            if mine["peer_address"] != settings.peer_listen:
                raise JoinRefused(
                    f"join: node {settings.node_id} is known at {mine['peer_address']}"
                )
            break
        if time.monotonic() > deadline:
            raise ConfigError(f"join: {settings.join} did not add node {settings.node_id} "
                              f"within {timeout_s:g} s")  # fmt: skip
        await asyncio.sleep(0.2)
    os.makedirs(settings.data_dir, exist_ok=True)
    write_identity(
        settings.data_dir,
        {
            "node_id": settings.node_id,
            "cluster_id": settings.cluster_id,
            "voters": [],
            "groups": settings.groups,
            "joined": True,
            "initial_view": body["initial_view"],
        },
    )
    log.warning("joined the cluster of %s as node %d", settings.join, settings.node_id)
    return True


async def _call(
    address: tuple[str, int], method: str, target: Any, deadline: float
) -> tuple[int, Any]:
    """One call, retried (a node starting, a connection refused) until ``deadline``."""
    while True:
        try:
            return await asyncio.wait_for(http_call(address, method, target()), CALL_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError, h11.ProtocolError) as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"join: cannot reach {address[0]}:{address[1]}: {e}") from None
            await asyncio.sleep(0.5)


__all__ = ["JoinRefused", "admit"]
