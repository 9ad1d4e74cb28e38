"""ctxstore.cluster_admin: the signed operator POSTs are checked before anything is proposed."""

from __future__ import annotations

import json
import time
import urllib.parse
from types import SimpleNamespace
from typing import Any

import pytest

from ctxstore.cluster_admin import SKEW_S, _signed, sign, signed_target

SECRET, CLUSTER = "a-cluster-secret", "c1"


def node() -> Any:
    return SimpleNamespace(settings=SimpleNamespace(secret=SECRET, cluster_id=CLUSTER))


def call(target: str) -> tuple[int, Any, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []

    def action(n: Any, params: dict[str, str]) -> tuple[int, str, bytes]:
        seen.append(params)
        return 202, "application/json", b"{}"

    status, _, body = _signed(node(), target.encode(), action)
    return status, json.loads(body), seen


def test_a_signed_request_reaches_its_action_with_its_parameters() -> None:
    status, _, seen = call(signed_target(SECRET, CLUSTER, "/admin/nodes/drain", {"node": "4"}))
    assert status == 202 and seen == [{"node": "4"}]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: {**p, "mac": "0" * 64},  # not the secret's
        lambda p: {**p, "node": "5"},  # a parameter changed after signing
        lambda p: {k: v for k, v in p.items() if k != "mac"},
    ],
)
def test_a_request_not_signed_by_the_cluster_is_refused(mutate: Any) -> None:
    target = signed_target(SECRET, CLUSTER, "/admin/nodes/remove", {"node": "4"})
    path, _, query = target.partition("?")
    params = mutate(dict(urllib.parse.parse_qsl(query)))
    status, body, seen = call(path + "?" + urllib.parse.urlencode(params))
    assert (status, body["error"], seen) == (401, "unauthorized", [])


def test_another_cluster_path_or_an_old_ts_is_refused() -> None:
    other = signed_target(SECRET, "c2", "/admin/nodes/remove", {"node": "4"})
    assert call(other)[0] == 401
    moved = signed_target(SECRET, CLUSTER, "/admin/nodes/drain", {"node": "4"})
    assert call(moved.replace("/drain", "/remove"))[0] == 401
    params = {"node": "4", "ts": str(int(time.time() - SKEW_S - 5))}
    old = "/admin/nodes/drain?" + urllib.parse.urlencode(
        {**params, "mac": sign(SECRET, CLUSTER, "/admin/nodes/drain", params)}
    )
    status, body, seen = call(old)
    assert (status, seen) == (401, []) and "clock" in body["message"]


def test_malformed_queries_are_bad_requests() -> None:
    base = signed_target(SECRET, CLUSTER, "/admin/nodes/drain", {"node": "4"})
    assert call(base + "&node=4")[0] == 400  # a parameter twice
    assert call("/admin/nodes/drain?a&&b=")[0] == 400
    params = {"node": "4", "ts": "yesterday"}
    target = "/admin/nodes/drain?" + urllib.parse.urlencode(
        {**params, "mac": sign(SECRET, CLUSTER, "/admin/nodes/drain", params)}
    )
    assert call(target)[0] == 400


@pytest.mark.parametrize("value", ["", "x", "0", "65536", "-1"])
def test_a_node_id_out_of_range_is_a_bad_request(value: str) -> None:
    from ctxstore.cluster_admin import _drain, _join, _remove

    for action, key in ((_drain, "node"), (_remove, "node"), (_join, "id")):
        status, _, body = action(node(), {key: value})
        assert (status, json.loads(body)["error"]) == (400, "bad_request")
