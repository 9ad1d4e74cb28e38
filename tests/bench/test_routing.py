"""bench/routing.py: where a client process sends a group's requests (no network: the clients
connect on their first call)."""

from __future__ import annotations

import asyncio

from bench.routing import NODES_MAX, Router


def router() -> Router:
    nodes = {1: "127.0.0.1:1", 2: "127.0.0.1:2", 3: "127.0.0.1:3"}
    return Router(nodes, [1, 0, 4], "leader", token=None, timeout_s=1.0)


def test_the_leader_else_a_replica_of_the_group_else_any_node() -> None:
    r = router()
    assert r.pick(0) == 1
    r.replicas = [[1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert all(r.pick(1) in (2, 3) for _ in range(6))  # no leader known: a replica
    assert r.pick(2) == 3  # its leader (4) is not connected: the replica that is
    r.down_until[3] = float("inf")
    assert r.pick(2) in (1, 2)  # none usable: any node (it relays)


def test_nodes_named_by_the_routes_get_a_connection() -> None:
    async def main() -> None:
        r = router()
        r._learn({1: "127.0.0.1:1", 4: "127.0.0.1:4", 5: ""})
        assert sorted(r.clients) == r.ids == [1, 2, 3, 4] and r.nodes[4] == "127.0.0.1:4"
        r.replicas = [[1, 2, 3], [2, 3, 4], [3, 4, 5]]
        assert r.pick(2) == 4  # its leader now
        r._learn({n: f"127.0.0.1:{n}" for n in range(5, 200)})
        assert len(r.clients) == NODES_MAX
        await r.close()

    asyncio.run(main())
