"""Node configuration: one frozen value, read from the environment and validated once at start.

Every variable is parsed independently and *all* problems are collected, so an operator who got three
variables wrong sees three lines at once instead of fixing them one restart at a time. Relations between
fields (a probe must time out before the next one is due, a peer must be able to fail its threshold well
before it is dropped) are checked in :meth:`Config.validate`, which names every field involved.

Units live in field names (``_s`` seconds, ``_bytes`` bytes). Environment variables keep the documented
names (``DISCOVERY_INTERVAL`` is in seconds).
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# The documented example uses JWT_SECRET=secret_key. HS256 keys shorter than the hash output (32 bytes) are
# weak (RFC 7518 §3.2); the node still starts with one so the documented commands keep working, but warns.
MIN_STRONG_SECRET_BYTES = 32
MAX_WRITE_GATHER_S = 0.1  # WRITE_GATHER: longer would add that much to a write's latency under load


class ConfigError(Exception):
    """Raised with every problem found in the environment, one human-readable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Config:
    # --- identity and discovery -------------------------------------------------------------------------
    # DNS name every node of the cluster answers to (Docker --network-alias, a headless Service, tasks.<svc>).
    service_name: str = "backend-service"
    # TCP port of the HTTP API; peers are assumed to listen on the same port (as in every documented set-up).
    port: int = 3000
    # Bind address of the HTTP server.
    host: str = "0.0.0.0"
    # IPv4 this node tells its peers and derives its ID from. None: found at start (the local address used to
    # reach the addresses SERVICE_NAME resolves to; inside Docker, the container's address).
    advertise_address: str | None = None
    # DNS servers as "ip" or "ip:port". Empty: the system resolver's (Docker's 127.0.0.11 in a container).
    dns_servers: tuple[str, ...] = ()
    # Seconds between discovery rounds (DNS lookup + election round). The documented cluster uses 10 s.
    discovery_interval_s: float = 10.0
    # Seconds a single DNS lookup may take before the round counts as a failed lookup.
    dns_timeout_s: float = 2.0

    # --- failure detection --------------------------------------------------------------------------------
    # Seconds without any sign of life after which a peer is dropped from the view (documented: 30 s).
    node_timeout_s: float = 30.0
    # Seconds between health probes of each peer. Far below the discovery interval so a dead leader is
    # replaced in about a second rather than at the next 10 s round.
    probe_interval_s: float = 0.25
    # Seconds one probe may take. A peer that answers slower than this counts as a miss.
    probe_timeout_s: float = 0.5
    # Consecutive missed probes after which a peer is unhealthy (and so cannot lead). With the defaults a
    # peer that refuses connections is unhealthy after ~0.5-0.75 s; one whose packets vanish after ~1.5 s.
    failure_threshold: int = 3

    # --- process ------------------------------------------------------------------------------------------
    # Seconds the node gives itself to say goodbye and stop after SIGTERM (docker stop waits 10 s).
    shutdown_grace_s: float = 1.5
    # Directory for the node's durable state (the SQLite database).
    data_dir: Path = field(default_factory=lambda: Path("data"))
    log_level: str = "info"
    # "on" (the default): a node that fails after its start-up completed (an error none of its parts handles,
    # such as a log record found damaged while it is read) is built again in the same process after a
    # backoff (1 s doubling to 30 s), and its start-up checks quarantine what is damaged; the documented
    # `docker run` has no restart policy, so an exit would leave the node down for good. "off": exit 1 at
    # the first such failure, for a supervisor (systemd, Kubernetes, --restart) that prefers to restart it.
    restart_on_crash: bool = True

    # --- data API -----------------------------------------------------------------------------------------
    # Largest request body /db/execute, /db/query and /db/request accept; larger answers 413.
    db_max_body_bytes: int = 4 << 20
    # Largest body /db/load accepts (an SQLite file or an SQL dump); larger answers 413.
    db_max_load_bytes: int = 256 << 20
    # Most statements one request may carry; more answers 413 before anything runs.
    db_max_statements: int = 1000
    # Seconds one READ request (/db/query, all its statements together) may run before SQLite interrupts it
    # (an error in the results). DB_STATEMENT_TIMEOUT keeps its name from when it bounded each statement.
    # Writes are bounded by DB_WRITE_STEP_BUDGET instead: a clock would make replicas disagree.
    db_statement_timeout_s: float = 5.0
    # SQLite VM steps one WRITE request (all its statements) may use; past it the statement fails and a
    # transaction rolls back. Deterministic: every replica reaches the same outcome. 20 million steps are
    # about 1.5-4 s of work (5-14 million steps/s measured on a loaded 2-core machine).
    db_write_step_budget: int = 20_000_000
    # Read-only connections, each on its own thread: reads run in parallel and never queue behind writes.
    db_readers: int = 4
    # Readers one client (one credential) may hold at once; 0 means half of DB_READERS (at least one).
    db_readers_per_client: int = 0
    # Most rows one statement may return; past it the statement's result is an error.
    db_max_result_rows: int = 10_000
    # Bytes (approximately, as sent) all results of one request may hold; also the largest single value.
    db_max_result_bytes: int = 16 << 20
    # Writes that may wait for the write thread, and reads that may wait for a reader (each its own queue,
    # one client at most half of the read queue); past it the node answers 503 (busy).
    db_queue_size: int = 256
    # Seconds a client may take to send a request body; a slower one gets 408.
    body_read_timeout_s: float = 10.0
    # Free bytes the log keeps in reserve on DATA_DIR's filesystem: a write that would leave less is refused
    # with 507 before anything of it is stored, so the disk never fills mid-entry and the node can still
    # start, replay and answer. 64 MiB also covers SQLite applying what the log accepted.
    log_reserve_bytes: int = 64 << 20

    # --- HTTP connections ---------------------------------------------------------------------------------
    # Seconds a client may take to send complete request headers, counted from the moment the connection
    # opens and, on a kept-alive connection, from the end of the previous response. Past it the connection
    # is closed (with a 408 JSON if part of a request had arrived). So it also bounds idle keep-alive.
    header_read_timeout_s: float = 10.0
    # Client connections served at once. None: derived from the process's open-file limit (RLIMIT_NOFILE
    # soft limit minus a reserve for the database, logs and peers, at most 4096). Loopback and peers get a
    # further slice on top that other clients cannot take. A connection over the cap is closed at once.
    max_client_connections: int | None = None
    # Seconds a response may make no progress (the client reads nothing) before the connection is dropped
    # and its buffers freed.
    response_write_timeout_s: float = 30.0
    # Bytes of large serialized responses the node holds at once (all clients together); a response that
    # does not fit answers 503 busy with Retry-After.
    max_buffered_response_bytes: int = 64 << 20

    # --- auth ---------------------------------------------------------------------------------------------
    # HMAC secret for bearer tokens (HS256). Required; shorter than 32 bytes starts with a loud warning.
    jwt_secret: str = field(default="", repr=False)

    # --- replication (node/replication) -----------------------------------------------------------------
    # "on" (the default): one replicated database for the whole cluster (majority commit, epochs; see
    # node/core/replication), so a client may send any request to any node. "off": an explicit opt-out in
    # which every node serves its own database (no forwarding, no quorum).
    replication: str = "on"
    # "uvloop" (the default; asyncio's own loop if uvloop is not installed) or "asyncio".
    event_loop: str = "uvloop"
    # "on" (the default): a whole, plain ``POST /db/execute`` this node answers itself is read and answered
    # without aiohttp's request machinery (node/http/fastpath.py); "off": every request goes through aiohttp.
    http_fast_path: bool = True
    # Seconds an empty node with REPLICATION=on looks for peers before it forms a cluster or joins one. 0
    # for a node known to be alone (a laptop's `python -m node` then accepts writes at once). Longer than
    # DNS needs to list every replica started together.
    formation_window_s: float = 5.0
    # Group commit (node/core/replication/gather.py): seconds a leader holds a submitted write, while at
    # least 4 others are under way, so that the writes arriving meanwhile share its round of replication
    # (one log append, Append, fsync and ack per node). 0 turns it off; at most 0.1.
    write_gather_s: float = 0.003

    # --- snapshot transfer (node/replication/snapshot_transfer.py) ----------------------------------------
    # Bytes per second all snapshot transfers of this node together (sends to peers and its own download)
    # may move: one token bucket, so a 1 GiB transfer never takes the disk, the network and the event loop
    # from heartbeats. 0 means unlimited; otherwise at least 1 MiB/s (one 1 MiB chunk per second: slower,
    # a chunk's wait would trip the 30 s stall timeouts). The default (256 MiB/s) sends 1 GiB in about 4 s.
    # The bucket holds 100 ms of the rate (at least 1 MiB), so a transfer woken late makes the time up.
    snapshot_rate_bytes_s: int = 256 << 20
    # Snapshot downloads this node serves at once; a further peer is answered 503 with Retry-After.
    snapshot_max_sends: int = 2
    # --- snapshots and log compaction (node/core/replication: snapshot_due, compaction_point) -------------
    # A node takes a snapshot of its database when this many entries (0: never), or this many bytes of
    # entry payloads, were applied since its newest one; its log then keeps SNAPSHOT_TRAILING entries below
    # the snapshot (a member only that far behind gets the log tail, not a whole snapshot). The log drops
    # whole segments of LOG_SEGMENT_BYTES, so the disk is given back in steps of that size.
    snapshot_entries: int = 50_000
    snapshot_bytes: int = 256 << 20
    snapshot_trailing: int = 10_000
    log_segment_bytes: int = 64 << 20

    @property
    def weak_secret(self) -> bool:
        return len(self.jwt_secret.encode()) < MIN_STRONG_SECRET_BYTES

    def validate(self) -> list[str]:
        """Relations between fields; each message names every field it involves."""
        problems: list[str] = []
        if self.probe_timeout_s > self.probe_interval_s * self.failure_threshold:
            problems.append(
                "PROBE_TIMEOUT must not exceed PROBE_INTERVAL * FAILURE_THRESHOLD "
                f"({self.probe_timeout_s} > {self.probe_interval_s} * {self.failure_threshold})"
            )
        detect_s = max(self.probe_interval_s, self.probe_timeout_s) * self.failure_threshold
        if detect_s >= self.node_timeout_s:
            problems.append(
                "NODE_TIMEOUT must exceed the failure detection time "
                f"max(PROBE_INTERVAL, PROBE_TIMEOUT) * FAILURE_THRESHOLD = {detect_s:g} s "
                f"(NODE_TIMEOUT is {self.node_timeout_s:g} s)"
            )
        if self.probe_interval_s >= self.discovery_interval_s:
            problems.append(
                "PROBE_INTERVAL must be shorter than DISCOVERY_INTERVAL "
                f"({self.probe_interval_s:g} >= {self.discovery_interval_s:g})"
            )
        return problems

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build a Config from environment variables; raise ConfigError listing every bad value."""
        env = os.environ if env is None else env
        problems: list[str] = []
        values: dict[str, Any] = {}
        for name, (var, parse) in _VARIABLES.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = parse(raw.strip())
            except ValueError as exc:
                problems.append(f"{var}={raw!r}: {exc}")
        if not env.get("JWT_SECRET"):
            problems.append(
                "JWT_SECRET is not set: set it to the same secret on every node "
                "(at least 32 random bytes, e.g. `openssl rand -hex 32`)"
            )
        elif not _encodes_as_utf8(env["JWT_SECRET"]):
            # Bytes that are not UTF-8 reach os.environ as lone surrogates; every key derivation would fail.
            # The message never repeats the value: it is the secret.
            problems.append("JWT_SECRET is not valid UTF-8 text: use printable characters, e.g. `openssl rand -hex 32`")
        else:
            values["jwt_secret"] = env["JWT_SECRET"]
        if problems:
            raise ConfigError(problems)
        config = cls(**values)
        problems = config.validate()
        if problems:
            raise ConfigError(problems)
        return config


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- parsers: each raises ValueError with a message that says what is expected ------------------------------


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds, e.g. 10 or 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive, finite number of seconds")
    return value


def _port(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
        raise ValueError("expected a TCP port number from 1 to 65535")
    return int(raw)


def _positive_int(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError("expected a whole number of at least 1")
    return int(raw)


def _non_negative_int(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError("expected a whole number of at least 0")
    return int(raw)


def _ipv4(raw: str) -> str:
    try:
        return str(ipaddress.IPv4Address(raw))
    except ValueError:
        raise ValueError(
            "expected an IPv4 address (the node ID is derived from its last two octets)"
        ) from None


def _bind_host(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError("expected an IP address to bind to, e.g. 0.0.0.0 or 127.0.0.2") from None


def _dns_servers(raw: str) -> tuple[str, ...]:
    servers = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        if not sep:
            host = item
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{item!r} is not 'ip' or 'ip:port' (IPv4)") from None
        if sep and (not port.isdigit() or not 1 <= int(port) <= 65535):
            raise ValueError(f"{item!r} has an invalid port")
        servers.append(item)
    if not servers:
        raise ValueError("expected one or more 'ip' or 'ip:port', comma-separated")
    return tuple(servers)


def _service_name(raw: str) -> str:
    labels = raw.rstrip(".").split(".")
    if len(raw) > 253 or not all(
        0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum() for label in labels
    ):
        raise ValueError("expected a DNS name, e.g. backend-service")
    return raw.rstrip(".")


def _log_level(raw: str) -> str:
    level = raw.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level


def _path(raw: str) -> Path:
    return Path(raw)


_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "service_name": ("SERVICE_NAME", _service_name),
    "port": ("PORT", _port),
    "host": ("HOST", _bind_host),
    "advertise_address": ("ADVERTISE_ADDRESS", _ipv4),
    "dns_servers": ("DNS_SERVERS", _dns_servers),
    "discovery_interval_s": ("DISCOVERY_INTERVAL", _positive_seconds),
    "dns_timeout_s": ("DNS_TIMEOUT", _positive_seconds),
    "node_timeout_s": ("NODE_TIMEOUT", _positive_seconds),
    "probe_interval_s": ("PROBE_INTERVAL", _positive_seconds),
    "probe_timeout_s": ("PROBE_TIMEOUT", _positive_seconds),
    "failure_threshold": ("FAILURE_THRESHOLD", _positive_int),
    "shutdown_grace_s": ("SHUTDOWN_GRACE", _positive_seconds),
    "data_dir": ("DATA_DIR", _path),
    "log_level": ("LOG_LEVEL", _log_level),
    "restart_on_crash": ("RESTART_ON_CRASH", lambda raw: _on_off(raw)),
    "db_max_body_bytes": ("DB_MAX_BODY_BYTES", _positive_int),
    "db_max_load_bytes": ("DB_MAX_LOAD_BYTES", _positive_int),
    "db_max_statements": ("DB_MAX_STATEMENTS", _positive_int),
    "db_statement_timeout_s": ("DB_STATEMENT_TIMEOUT", _positive_seconds),
    "db_max_result_rows": ("DB_MAX_RESULT_ROWS", _positive_int),
    "db_max_result_bytes": ("DB_MAX_RESULT_BYTES", _positive_int),
    "db_queue_size": ("DB_QUEUE_SIZE", _positive_int),
    "db_write_step_budget": ("DB_WRITE_STEP_BUDGET", _positive_int),
    "db_readers": ("DB_READERS", _positive_int),
    "db_readers_per_client": ("DB_READERS_PER_CLIENT", _non_negative_int),
    "body_read_timeout_s": ("BODY_READ_TIMEOUT", _positive_seconds),
    "log_reserve_bytes": ("LOG_RESERVE_BYTES", _non_negative_int),
    "header_read_timeout_s": ("HEADER_READ_TIMEOUT", _positive_seconds),
    "max_client_connections": ("MAX_CLIENT_CONNECTIONS", _positive_int),
    "response_write_timeout_s": ("RESPONSE_WRITE_TIMEOUT", _positive_seconds),
    "max_buffered_response_bytes": ("MAX_BUFFERED_RESPONSE_BYTES", _positive_int),
    # replication
    "replication": ("REPLICATION", lambda raw: _replication(raw)),
    "formation_window_s": ("FORMATION_WINDOW", lambda raw: _non_negative_seconds(raw)),
    "write_gather_s": ("WRITE_GATHER", lambda raw: _write_gather(raw)),
    "event_loop": ("EVENT_LOOP", lambda raw: _event_loop(raw)),
    "http_fast_path": ("HTTP_FAST_PATH", lambda raw: _on_off(raw)),
    "snapshot_rate_bytes_s": ("SNAPSHOT_RATE_BYTES_S", lambda raw: _snapshot_rate(raw)),
    "snapshot_max_sends": ("SNAPSHOT_MAX_SENDS", _positive_int),
    "snapshot_entries": ("SNAPSHOT_ENTRIES", _non_negative_int),
    "snapshot_bytes": ("SNAPSHOT_BYTES", _positive_int),
    "snapshot_trailing": ("SNAPSHOT_TRAILING", _positive_int),
    "log_segment_bytes": ("LOG_SEGMENT_BYTES", lambda raw: _log_segment_bytes(raw)),
}

# Every field but the secret must be settable from the environment: keep the table and the dataclass in step.
assert {f.name for f in fields(Config)} - {"jwt_secret"} == set(_VARIABLES), "config table out of step"


# --- replication parsers ------------------------------------------------------------------------------------


def _replication(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("off", "on"):
        raise ValueError(f"must be 'off' or 'on', not {raw!r}")
    return value


def _on_off(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("off", "on"):
        raise ValueError(f"must be 'on' or 'off', not {raw!r}")
    return value == "on"


def _event_loop(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("uvloop", "asyncio"):
        raise ValueError(f"must be 'uvloop' or 'asyncio', not {raw!r}")
    return value


def _non_negative_seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a number of seconds >= 0, not {raw!r}")
    return value


def _write_gather(raw: str) -> float:
    value = _non_negative_seconds(raw)
    if value > MAX_WRITE_GATHER_S:
        raise ValueError(f"must be at most {MAX_WRITE_GATHER_S:g} seconds (a write may wait that long), not {raw!r}")
    return value


def _log_segment_bytes(raw: str) -> int:
    value = _positive_int(raw)
    if value < 4096:
        raise ValueError("must be at least 4096 (bytes per log segment)")
    return value


def _snapshot_rate(raw: str) -> int:
    value = _non_negative_int(raw)
    if 0 < value < 1 << 20:
        raise ValueError("expected 0 (unlimited) or at least 1048576 bytes per second")
    return value
