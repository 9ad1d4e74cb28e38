"""Configuration: TOML file < CTXSTORE_* environment < flags; bad values name their key."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from ctxstore.collector import tune_collector
from ctxstore.config import ConfigError, load
from ctxstore.node import serve_clients
from wire.aio import BaseHandler


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ctxstore.toml"
    path.write_text(text)
    return str(path)


def test_defaults_make_a_single_node_cluster() -> None:
    s = load(environ={})
    assert s.node_id == 1 and s.peer_map == {} and s.groups == 256 and s.tokens == []
    assert s.wal_writer == "thread"
    assert load(environ={"CTXSTORE_WAL_WRITER": "inline"}).wal_writer == "inline"
    assert s.client_requests_per_pass == 0  # no bound unless asked for
    assert load(environ={"CTXSTORE_CLIENT_REQUESTS_PER_PASS": "8"}).client_requests_per_pass == 8


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    f = write(tmp_path, 'tick_ms = 20\nelection_ticks = 12\ndata_dir = "/from/file"\n')
    env = {"CTXSTORE_ELECTION_TICKS": "15", "CTXSTORE_DATA_DIR": "/from/env"}
    s = load(f, {"data_dir": "/from/flag", "tick_ms": None}, env)
    assert (s.tick_ms, s.election_ticks, s.data_dir) == (20, 15, "/from/flag")


def test_peers_and_tokens_parse(tmp_path: Path) -> None:
    env = {"CTXSTORE_TOKENS": "a,b", "CTXSTORE_PEERS": "2=127.0.0.1:7501,3=10.0.0.3:7500",
           "CTXSTORE_SECRET": "our-own-secret"}  # fmt: skip
    s = load(environ=env)
    assert s.tokens == ["a", "b"] and s.auth_mode == "static"
    assert s.peer_map == {2: ("127.0.0.1", 7501), 3: ("10.0.0.3", 7500)}


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        ({"tick_ms": "soon"}, "tick_ms"),
        ({"tick_ms": 0}, "tick_ms"),
        ({"node_id": 0}, "node_id"),
        ({"listen": "no-port"}, "listen"),
        ({"peers": "2=nowhere"}, "peers"),
        ({"peers": "x=1.2.3.4:5"}, "peers"),
        ({"peers": "1=127.0.0.1:7500"}, "peers"),  # this node itself
        ({"secret": "short"}, "secret"),
        ({"log_level": "chatty"}, "log_level"),
        ({"heartbeat_ticks": 10}, "heartbeat_ticks"),
        ({"gc_young_threshold": 10}, "gc_young_threshold"),
        ({"wal_writer": "async"}, "wal_writer"),
        ({"client_requests_per_pass": -1}, "client_requests_per_pass"),
    ],
)
def test_invalid_values_stop_start_up_naming_the_key(flags: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config: {key}:"):
        load(flags=flags, environ={})


def test_unknown_or_malformed_file_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config: tick: unknown key"):
        load(write(tmp_path, "tick = 3\n"), environ={})
    with pytest.raises(ConfigError, match=r"ctxstore\.toml"):
        load(write(tmp_path, "tick_ms = = 3\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"), environ={})


def test_invalid_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^config: groups:"):
        load(environ={"CTXSTORE_GROUPS": "many"})


def test_the_garbage_collector_is_tuned_for_a_server() -> None:
    """``gc_young_threshold`` (default 10 000) sets the young generation's threshold, and what
    start-up built is frozen out of collections."""
    assert load(environ={}).gc_young_threshold == 10_000
    env = {"CTXSTORE_GC_YOUNG_THRESHOLD": "50000"}
    assert load(environ=env).gc_young_threshold == 50_000
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_collector(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


SECRET = "s" * 32


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"auth": "static", "secret": "our-own-secret"}, "tokens: auth static needs"),
        ({"tokens": ["t"]}, "secret: auth is static"),  # the default cluster secret
        ({"auth": "jwt", "auth_jwt_secret": [SECRET]}, "secret: auth is jwt"),
        ({"auth": "jwt", "secret": "our-own-secret"}, "auth_jwt_secret: auth jwt needs"),
        ({"auth_jwt_leeway_s": -1}, "auth_jwt_leeway_s"),
    ],
)
def test_auth_settings_are_checked(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(flags=given, environ={})


def test_auth_keys_come_from_the_environment_as_lists() -> None:
    env = {"CTXSTORE_AUTH": "jwt", "CTXSTORE_SECRET": "our-own-secret",
           "CTXSTORE_AUTH_JWT_SECRET": f"k1={SECRET},k2={SECRET}"}  # fmt: skip
    s = load(environ=env)
    assert s.auth_mode == "jwt" and s.auth_jwt_secret == [f"k1={SECRET}", f"k2={SECRET}"]
    assert load(environ={}).auth_mode == "off"


def test_the_client_port_gets_the_per_pass_bound() -> None:
    async def main() -> None:
        settings = load(flags={"client_requests_per_pass": 4}, environ={})
        server = await serve_clients(BaseHandler(1, "c"), settings, "127.0.0.1", 0)
        try:
            assert server.requests_per_pass == 4
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
