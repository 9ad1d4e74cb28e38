"""Node configuration: a TOML file < ``CTXSTORE_*`` environment variables < command-line flags.

Every key has one name in all three places (``tick_ms`` in TOML, ``CTXSTORE_TICK_MS`` in the
environment, ``--tick-ms`` as a flag).  The merged values are validated at once; an invalid or
unknown key stops start-up with a message that names it (``ConfigError``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .collector import YOUNG_THRESHOLD

Port = Annotated[int, Meta(ge=0, le=65535)]
DEV_SECRET = "ctxstore-dev-secret"


class ConfigError(Exception):
    pass


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    node_id: Annotated[int, Meta(ge=1, le=65535)] = 1
    data_dir: Annotated[str, Meta(min_length=1)] = "./data"
    listen: str = "127.0.0.1:7400"  # the client protocol
    peer_listen: str = "127.0.0.1:7500"  # Raft and forwarding between nodes
    http: str | None = None  # the ops HTTP port (health, metrics); None: off
    peers: str = ""  # "ID=HOST:PORT,..." of the other nodes; empty: a single-node cluster
    cluster_id: Annotated[str, Meta(min_length=1, max_length=64)] = "ctxstore"
    secret: Annotated[str, Meta(min_length=8)] = DEV_SECRET
    tokens: list[str] = []  # static client tokens; empty: no token needed
    # Client authentication (ctxstore/auth.py, docs/auth.md): None: static when tokens are
    # given, off otherwise.  jwt: signed tokens by these keys ([KID=]SECRET, [KID=]FILE).
    auth: Literal["off", "static", "jwt"] | None = None
    auth_jwt_secret: list[str] = []
    auth_jwt_public_key: list[str] = []
    auth_jwt_audience: Annotated[str, Meta(min_length=1)] | None = None
    auth_jwt_issuer: Annotated[str, Meta(min_length=1)] | None = None
    auth_jwt_leeway_s: Annotated[float, Meta(ge=0, le=300)] = 5.0
    groups: Annotated[int, Meta(ge=1, le=4096)] = 256
    tick_ms: Annotated[int, Meta(ge=1, le=10_000)] = 50
    election_ticks: Annotated[int, Meta(ge=3, le=1000)] = 10
    heartbeat_ticks: Annotated[int, Meta(ge=1, le=100)] = 2
    snapshot_entries: Annotated[int, Meta(ge=10)] = 100_000
    tail_messages_max: Annotated[int, Meta(ge=1)] = 10_000  # per session in RAM
    group_tail_bytes_max: Annotated[int, Meta(ge=4096)] = 4 * 1024 * 1024  # per group in RAM
    request_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 5.0
    batch_appends_max: Annotated[int, Meta(ge=1, le=4096)] = 1024  # per entry (1: no batches)
    retention_max_messages: Annotated[int, Meta(ge=1)] | None = None  # per session; None: keep all
    retention_max_age_s: Annotated[float, Meta(gt=0)] | None = None  # per session; None: keep all
    shutdown_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0  # SIGTERM: exit within
    gc_young_threshold: Annotated[int, Meta(ge=100, le=10_000_000)] = YOUNG_THRESHOLD
    # The client port's bounds (wire/aio.py, docs/ctxstore.md "Limits"): connections per node
    # (lowered at start to what the open-file limit leaves, node.client_connections_cap) and
    # per source address, the idle timeout, and the bytes a connection / all connections may
    # hold for requests in flight and answers not yet written; the requests one connection
    # hands on in one loop iteration (0: all it has read).
    client_connections_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    client_connections_per_source_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    client_idle_timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 300.0
    client_write_stall_timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 60.0
    connection_pending_bytes_max: Annotated[int, Meta(ge=16 * 1024 * 1024)] = 64 * 1024 * 1024
    node_pending_bytes_max: Annotated[int, Meta(ge=16 * 1024 * 1024)] = 256 * 1024 * 1024
    client_requests_per_pass: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    # The WebSockets at /v1/ws on the HTTP port (ctxstore/web.py, docs/web.md): a ping every
    # web_ping_interval_s; a peer silent (no message, no pong) for web_idle_timeout_s is closed.
    web_ping_interval_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    web_idle_timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 90.0
    # Connections the HTTP port (--http: health, metrics, /v1) holds at once; at the cap a new
    # one closes the quietest (ctxstore/ops.py).  Its descriptors are kept out of the clients'.
    http_connections_max: Annotated[int, Meta(ge=8, le=100_000)] = 256
    # The origins whose pages may call the HTTP API under /v1 (CORS, ctxstore/web_http.py):
    # "scheme://host[:port]" each, or "*" for any; empty: no CORS headers.
    web_cors_origin: list[str] = []
    # The HTTP/3 listener (UDP; ctxstore/web_h3.py, docs/web.md §8): the HTTP API and
    # WebTransport at /v1/wt over QUIC, with its TLS certificate and key (PEM files); needs
    # the HTTP port (which advertises it with Alt-Svc).  Its bounds: QUIC connections per node,
    # streams a peer may have open per connection (each direction), QUIC's idle timeout.
    h3: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    h3_connections_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    h3_streams_max: Annotated[int, Meta(ge=4, le=100_000)] = 128
    h3_idle_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    h3_retry: bool = False  # QUIC Retry: address validation before a connection is kept
    # Where the WAL's group commits are written and fsync'd: on a writer thread ("thread": the
    # loop works on while the disk syncs, at the price of the hand-offs between the threads) or
    # on the event loop's thread ("inline": less CPU, the loop waits for the disk): raft/wal.py,
    # docs/ctxstore.md.
    wal_writer: Literal["thread", "inline"] = "thread"
    # The tokenizer that counts a message's tokens (ctxstore/tokens.py) unless its session's
    # context configuration names another.
    tokenizer: Literal["o200k_base", "cl100k_base"] = "o200k_base"
    # Bytes of context windows' messages kept in RAM once out of their hot tails, so that
    # get_context seldom reads the archive (ctxstore/context.py WindowCache; a node's cache).
    context_cache_bytes: Annotated[int, Meta(ge=0, le=2**40)] = 64 * 1024 * 1024
    log_level: str = "WARNING"
    # The PostgreSQL write-behind (ctxstore/pg/, docs/postgres.md): off without a DSN.
    postgres_dsn: str | None = None
    postgres_flush_interval_ms: Annotated[int, Meta(ge=10, le=3_600_000)] = 5000
    postgres_flush_rows: Annotated[int, Meta(ge=1, le=50_000)] = 5000
    postgres_pool_size: Annotated[int, Meta(ge=1, le=16)] = 2
    postgres_serve_history: bool = False
    # Scale-out (design §5.6, docs/ctxstore.md "Placement"): a new node's way in (the HTTP
    # port of a running node), and the pace of the groups' moves and leader balancing.
    join: str | None = None
    mover_interval_ms: Annotated[int, Meta(ge=10, le=60_000)] = 200
    moves_max: Annotated[int, Meta(ge=1, le=256)] = 4
    snapshot_send_bytes_per_s: Annotated[int, Meta(ge=64 * 1024)] = 32 * 1024 * 1024
    balance_interval_s: Annotated[float, Meta(ge=0, le=3600)] = 1.0
    leader_transfers_max: Annotated[int, Meta(ge=1, le=256)] = 16

    def __post_init__(self) -> None:
        for key in ("listen", "peer_listen"):
            parse_address(getattr(self, key), key)
        if self.http is not None:
            parse_address(self.http, "http")
        if self.h3 is not None:
            parse_address(self.h3, "h3")
            if self.http is None:
                raise ConfigError("config: h3: needs http (the HTTP port advertises it)")
            if self.tls_cert is None or self.tls_key is None:
                raise ConfigError("config: h3: needs tls_cert and tls_key (PEM files)")
        peer_map = parse_peers(self.peers)
        if self.join is not None:
            parse_address(self.join, "join")
            if peer_map:
                raise ConfigError(
                    "config: join: a joining node learns its peers from the cluster: no peers"
                )
        if self.node_id in peer_map:
            raise ConfigError(f"config: peers: must not include this node ({self.node_id})")
        if self.heartbeat_ticks >= self.election_ticks:
            raise ConfigError("config: heartbeat_ticks: must be less than election_ticks")
        if self.node_pending_bytes_max < self.connection_pending_bytes_max:
            raise ConfigError(
                "config: node_pending_bytes_max: must be at least connection_pending_bytes_max"
            )
        if self.web_idle_timeout_s <= self.web_ping_interval_s:
            raise ConfigError("config: web_idle_timeout_s: must exceed web_ping_interval_s")
        for origin in self.web_cors_origin:
            if origin != "*" and re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", origin) is None:
                raise ConfigError(
                    f"config: web_cors_origin: expected * or scheme://host[:port], got {origin!r}"
                )
        if self.postgres_dsn is not None and not re.match(r"postgres(ql)?://", self.postgres_dsn):
            raise ConfigError(
                "config: postgres_dsn: expected postgresql://[user[:password]@]host[:port]/db..."
            )
        if self.postgres_serve_history and self.postgres_dsn is None:
            raise ConfigError("config: postgres_serve_history: needs postgres_dsn")
        self._check_auth()
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"config: log_level: unknown level {self.log_level!r}")

    @property
    def auth_mode(self) -> Literal["off", "static", "jwt"]:
        if self.auth is not None:
            return self.auth
        return "static" if self.tokens else "off"

    def _check_auth(self) -> None:
        mode = self.auth_mode
        if mode == "off":
            return
        if self.secret == DEV_SECRET:
            raise ConfigError(
                f"config: secret: auth is {mode}, so the peer port needs a secret of your own "
                "(the default is a development secret everybody knows)"
            )
        if mode == "static" and not self.tokens:
            raise ConfigError("config: tokens: auth static needs at least one token")
        if mode == "jwt" and not (self.auth_jwt_secret or self.auth_jwt_public_key):
            raise ConfigError(
                "config: auth_jwt_secret: auth jwt needs a secret or a public key "
                "(auth_jwt_public_key)"
            )

    @property
    def peer_map(self) -> dict[int, tuple[str, int]]:
        return parse_peers(self.peers)


FIELDS = Settings.__struct_fields__

# What each key means, for ``ctxstore serve --help`` (which adds the allowed values and the
# default from the Settings above): every key has an entry (tests/ctxstore/test_cli.py checks).
HELP: dict[str, str] = {
    "node_id": "this node's id, fixed for its data directory",
    "data_dir": "the node's WAL, snapshots, archive and identity (node.json)",
    "listen": "HOST:PORT of the client protocol",
    "peer_listen": "HOST:PORT for Raft and forwarding between nodes",
    "http": "HOST:PORT of the HTTP port (/health/live, /health/ready, /metrics, and the "
    "WebSocket protocol at /v1/ws); none: no HTTP port",
    "peers": "ID=HOST:PORT,... of the other nodes' peer ports; empty: a single-node cluster",
    "cluster_id": "the cluster's name, checked by the peer handshake",
    "secret": "the cluster's shared secret for the peer handshake; set your own for a real "
    "cluster (the default is a development secret)",
    "tokens": "static client tokens (the flag is repeatable; CTXSTORE_TOKENS is "
    "comma-separated); none: clients need no token",
    "auth": "client authentication: off, static (one of the tokens) or jwt (signed tokens, "
    "docs/auth.md); none: static when tokens are given, off otherwise",
    "auth_jwt_secret": "an HS256 secret of at least 32 bytes, KID=SECRET to name it (the flag "
    "is repeatable for rotation; CTXSTORE_AUTH_JWT_SECRET is comma-separated)",
    "auth_jwt_public_key": "a PEM file of an Ed25519 (EdDSA) or P-256 (ES256) public key, "
    "KID=FILE to name it (repeatable; CTXSTORE_AUTH_JWT_PUBLIC_KEY is comma-separated)",
    "auth_jwt_audience": "the aud a token must name; none: aud is not checked",
    "auth_jwt_issuer": "the iss a token must name; none: iss is not checked",
    "auth_jwt_leeway_s": "seconds of clock skew allowed on a token's exp and nbf",
    "groups": "Raft groups (fixed for a data directory)",
    "tick_ms": "the Raft clock's tick in milliseconds",
    "election_ticks": "ticks without a leader before an election (randomised up to twice)",
    "heartbeat_ticks": "ticks between a leader's heartbeats (less than election_ticks)",
    "snapshot_entries": "applied entries per group between snapshots",
    "tail_messages_max": "messages per session kept in RAM (older ones are read from the archive)",
    "group_tail_bytes_max": "bytes of all hot tails of one group kept in RAM",
    "request_timeout_s": "every request's deadline in seconds (then the client gets timeout)",
    "batch_appends_max": "appends of one group a leader proposes in one Raft entry (those it "
    "took in one loop pass; 1: one entry per append)",
    "retention_max_messages": "keep the newest N messages of each session; none: keep all",
    "retention_max_age_s": "delete messages older than this many seconds; none: keep all",
    "shutdown_timeout_s": "on SIGTERM, exit within this many seconds (past it: status 70)",
    "gc_young_threshold": "allocations between collections of the garbage collector's young "
    "generation",
    "wal_writer": "where the WAL is written and fsync'd: thread (a writer thread) or inline "
    "(the event loop's thread; for nodes sharing a machine's cores)",
    "tokenizer": "the tokenizer that counts messages' tokens (o200k_base or cl100k_base) "
    "for sessions whose context configuration names none",
    "context_cache_bytes": "bytes of context windows' messages this node keeps in RAM once "
    "they left the hot tail, so get_context seldom reads the archive; 0: none",
    "client_connections_max": "client connections at once (more are refused with "
    "unavailable); lowered at start to what the open-file limit leaves",
    "client_connections_per_source_max": "client connections at once from one address",
    "client_idle_timeout_s": "close a client connection with nothing in flight, no "
    "subscription and nothing received for this many seconds",
    "client_write_stall_timeout_s": "abort a client connection that reads nothing of what it "
    "is sent (its unwritten answers over the write buffer's high-water mark) for this many "
    "seconds, giving back its share of node_pending_bytes_max",
    "connection_pending_bytes_max": "bytes a client connection may hold for requests in "
    "flight (each with a reserve for its answer) and answers it has not read; over it the node "
    "stops reading the connection",
    "node_pending_bytes_max": "the same, for all client connections together",
    "client_requests_per_pass": "requests one client connection hands on in one event-loop "
    "iteration at most (the rest in the next ones, reading paused meanwhile), so that other "
    "connections' requests do not wait behind a burst; 0: no bound",
    "web_ping_interval_s": "seconds between the pings a WebSocket at /v1/ws is sent",
    "web_idle_timeout_s": "close a WebSocket from which nothing (a message, a pong) arrived "
    "for this many seconds, with 1001 (more than web_ping_interval_s)",
    "http_connections_max": "connections the HTTP port (health, metrics, the /v1 API and "
    "WebSockets before their upgrade) holds at once; at the cap a new one closes the quietest",
    "web_cors_origin": "an origin (scheme://host[:port], or * for any) whose pages may call "
    "the HTTP API under /v1 (CORS; the flag is repeatable, CTXSTORE_WEB_CORS_ORIGIN is "
    "comma-separated); none: no cross-origin calls",
    "h3": "HOST:PORT (UDP) of the HTTP/3 listener: the HTTP API and WebTransport at /v1/wt "
    "over QUIC (needs http, tls_cert and tls_key); none: no HTTP/3",
    "tls_cert": "the HTTP/3 listener's TLS certificate chain (a PEM file)",
    "tls_key": "the HTTP/3 listener's TLS private key (a PEM file)",
    "h3_connections_max": "QUIC connections the HTTP/3 listener holds at once (more are refused)",
    "h3_streams_max": "streams a QUIC peer may have open at once per connection, each direction",
    "h3_idle_timeout_s": "close a QUIC connection from which nothing arrived for this many seconds",
    "h3_retry": "true: answer a new QUIC connection with a Retry first, so that no state is kept "
    "for a client that cannot receive at its address (one more round trip)",
    "log_level": "DEBUG, INFO, WARNING, ERROR or CRITICAL (JSON lines on stderr)",
    "postgres_dsn": "postgresql://... of a database the leaders of the groups copy every "
    "committed message, session and read cursor into (docs/postgres.md); none: no Postgres",
    "postgres_flush_interval_ms": "milliseconds between a leader's flushes to Postgres (sooner "
    "when postgres_flush_rows rows wait)",
    "postgres_flush_rows": "rows (messages, sessions, cursors) of one flush transaction",
    "postgres_pool_size": "connections a node keeps to Postgres",
    "join": "HOST:PORT of a running node's HTTP port: a node with an empty data directory "
    "asks it to join that cluster (authenticated by the cluster's secret); none: the cluster "
    "is the one of peers",
    "mover_interval_ms": "milliseconds between two rounds of a node's mover (the groups it "
    "leads brought toward their target replicas, one membership change each at a time)",
    "moves_max": "groups a node's mover moves at once (each streams a snapshot to a new replica)",
    "snapshot_send_bytes_per_s": "bytes per second of snapshots a node sends its peers, all "
    "together (a new replica's catch-up must not starve the appends of other groups)",
    "balance_interval_s": "seconds between two rounds of leader balancing (transfers so that "
    "each node leads about as many groups as the others); 0: only on admin rebalance",
    "leader_transfers_max": "leadership transfers a node starts per balancing round",
    "postgres_serve_history": "true: page history a node lacks locally (a new replica, a "
    "pruned archive) from Postgres, not from a peer (needs postgres_dsn)",
}

ENV_PREFIX = "CTXSTORE_"
LISTED = frozenset({"tokens", "web_cors_origin", "auth_jwt_secret", "auth_jwt_public_key"})
"""The list keys (comma-separated in the environment, repeatable flags)."""
ENV_OTHERS = frozenset({"CTXSTORE_PURE_PYTHON"})  # read by setup.py at install, not by a node


def parse_address(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"config: {key}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_peers(text: str) -> dict[int, tuple[str, int]]:
    out: dict[int, tuple[str, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ident, sep, addr = part.partition("=")
        if not sep or not ident.isdigit() or int(ident) < 1:
            raise ConfigError(f"config: peers: expected ID=HOST:PORT, got {part!r}")
        if int(ident) in out:
            raise ConfigError(f"config: peers: node {ident} listed twice")
        out[int(ident)] = parse_address(addr, "peers")
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in FIELDS:
        value = environ.get(ENV_PREFIX + key.upper())
        if value is None:
            continue
        listed = key in LISTED
        out[key] = [t for t in value.split(",") if t] if listed else value
    return out


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``CTXSTORE_*`` variables that name no key (a typo a node would otherwise ignore)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + key.upper() for key in FIELDS} | ENV_OTHERS
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def load(
    file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge file < environment < flags (flags whose value is None are not given)."""
    merged: dict[str, Any] = {}
    if file is not None:
        try:
            with open(file, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config: cannot read {file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {file}: {e}") from None
        for key in data:
            if key not in FIELDS:
                raise ConfigError(f"config: {key}: unknown key in {file}")
        merged.update(data)
    merged.update(_from_env(os.environ if environ is None else environ))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config: {_key_of(str(e))}: {e}") from None


def _key_of(text: str) -> str:
    """The key a msgspec validation message is about."""
    if "$." in text:
        return text.rsplit("$.", 1)[-1].split("[")[0].strip("`")
    if "unknown field `" in text:
        return text.split("unknown field `", 1)[1].split("`")[0]
    return "?"
