"""Real node processes on loopback addresses, and a cluster of them behind a test DNS server.

Each node runs ``python -m node`` with its own HOST and ADVERTISE_ADDRESS (127.0.S.x, one /24 per cluster),
the same PORT, and DNS_SERVERS pointing at a :class:`~tests.support.dns.TestDnsServer` that answers
SERVICE_NAME with the addresses of the nodes that are running, as Docker's embedded DNS does.

stdout and stderr of every node go to files (a pipe nobody reads could block the node), which tests read to
check log events. Every process started here is killed by :meth:`Cluster.close` (or :meth:`NodeProcess.kill`);
all waits are bounded.

Used by ``tests/integration`` and ``bench/failover.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.support.dns import TestDnsServer
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]

# Every variable the node reads: a value inherited from the caller's environment must not leak into a test.
NODE_VARIABLES = (
    "SERVICE_NAME",
    "PORT",
    "HOST",
    "ADVERTISE_ADDRESS",
    "DNS_SERVERS",
    "DISCOVERY_INTERVAL",
    "DNS_TIMEOUT",
    "NODE_TIMEOUT",
    "PROBE_INTERVAL",
    "PROBE_TIMEOUT",
    "FAILURE_THRESHOLD",
    "SHUTDOWN_GRACE",
    "DATA_DIR",
    "LOG_LEVEL",
    "RESTART_ON_CRASH",
    "JWT_SECRET",
    "DB_MAX_BODY_BYTES",
    "DB_MAX_LOAD_BYTES",
    "DB_MAX_STATEMENTS",
    "DB_STATEMENT_TIMEOUT",
    "DB_MAX_RESULT_ROWS",
    "DB_MAX_RESULT_BYTES",
    "DB_QUEUE_SIZE",
    "DB_WRITE_STEP_BUDGET",
    "DB_READERS",
    "DB_READERS_PER_CLIENT",
    "BODY_READ_TIMEOUT",
    "LOG_RESERVE_BYTES",
    "HEADER_READ_TIMEOUT",
    "MAX_CLIENT_CONNECTIONS",
    "RESPONSE_WRITE_TIMEOUT",
    "MAX_BUFFERED_RESPONSE_BYTES",
    "REPLICATION",
    "FORMATION_WINDOW",
    "WRITE_GATHER",
    "EVENT_LOOP",
    "HTTP_FAST_PATH",
    "SNAPSHOT_RATE_BYTES_S",
    "SNAPSHOT_MAX_SENDS",
    "SNAPSHOT_ENTRIES",
    "SNAPSHOT_BYTES",
    "SNAPSHOT_TRAILING",
    "LOG_SEGMENT_BYTES",
)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without any node variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in NODE_VARIABLES}
    env.update(extra or {})
    return env


def node_id(ip: str) -> int:
    """The documented rule: last two octets of the IPv4 address."""
    a = [int(x) for x in ip.split(".")]
    return a[2] * 256 + a[3]


def pick_subnet() -> int:
    """A third octet for 127.0.S.x; random so concurrent test runs on this machine rarely share one."""
    return random.randint(100, 250)


def free_port(hosts: Iterable[str], attempts: int = 50) -> int:
    """A TCP port that is free on every one of ``hosts`` right now (below the ephemeral range)."""
    hosts = list(hosts)
    for _ in range(attempts):
        port = random.randint(20000, 29999)
        try:
            for host in hosts:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port found on {hosts} after {attempts} attempts")


def http_json(url: str, timeout_s: float = 0.5) -> dict[str, Any] | None:
    """GET a JSON document; None if the node does not answer (yet) or answers an error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


def parse_timestamp(text: str) -> float:
    """A log line's ``timestamp`` (ISO 8601, UTC) as seconds since the epoch."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class NodeProcess:
    """One ``python -m node`` process. Restartable: each start appends to the same log files."""

    def __init__(self, ip: str, port: int, env: Mapping[str, str], log_dir: Path) -> None:
        self.ip = ip
        self.port = port
        self.env = dict(env)
        self.log_dir = log_dir
        self.stdout_path = log_dir / f"node-{ip}.stdout.jsonl"
        self.stderr_path = log_dir / f"node-{ip}.stderr.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.time() of the last spawn
        self.starts = 0
        self._stdout_offset = 0  # where the current run's output begins in stdout_path

    @property
    def node_id(self) -> int:
        return node_id(self.ip)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> NodeProcess:
        if self.running:
            raise RuntimeError(f"node {self.ip} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stdout_offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node"],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a Ctrl-C on the test run must not reach the node; we stop it
            )
        self.starts += 1
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send(self, sig: int) -> None:
        if self.proc is None:
            raise RuntimeError(f"node {self.ip} was never started")
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to exit; raise subprocess.TimeoutExpired if it does not in time."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 5.0) -> tuple[int, float]:
        """Send ``sig`` and wait for the exit; return (exit status, seconds it took). Kills on timeout."""
        start = time.monotonic()
        self.send(sig)
        try:
            code = self.wait_exit(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return code, time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL and reap (no-op if not running)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def status(self, timeout_s: float = 0.5) -> dict[str, Any] | None:
        return http_json(f"{self.url}/cluster/status", timeout_s)

    # --- logs -----------------------------------------------------------------------------------------

    def stdout_lines(self, *, all_runs: bool = True) -> list[str]:
        """Complete lines written so far (a line still being written is left out)."""
        if not self.stdout_path.exists():
            return []
        data = self.stdout_path.read_bytes()
        if not all_runs:
            data = data[self._stdout_offset :]
        text = data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        return lines[:-1]  # the part after the last newline is incomplete (or empty)

    def events(self, name: str | None = None, *, all_runs: bool = True) -> list[dict[str, Any]]:
        """Parsed log lines (those that parse), optionally only those with ``event == name``."""
        out = []
        for line in self.stdout_lines(all_runs=all_runs):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (name is None or record.get("event") == name):
                out.append(record)
        return out

    def wait_events(
        self,
        name: str,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout_s: float = 3.0,
        *,
        all_runs: bool = True,
    ) -> list[dict[str, Any]]:
        """Wait until at least one ``name`` event matching ``where`` is in the log; return all that match.

        Lines reach the file through the node's writer thread, so a change already visible over HTTP may not
        be in the log yet: read events behind a short wait, never right after the change.
        """
        return wait_until(
            lambda: [e for e in self.events(name, all_runs=all_runs) if where(e)],
            timeout_s,
            0.02,
            what=f"{self.ip} to log {name}",
            describe=self.tail,
        )

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_problems(self) -> list[str]:
        """Every stdout line that breaks the log contract: not JSON, or missing a standard key."""
        problems = []
        for number, line in enumerate(self.stdout_lines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                problems.append(f"{self.stdout_path.name}:{number}: not JSON: {line[:200]!r}")
                continue
            if not isinstance(record, dict):
                problems.append(f"{self.stdout_path.name}:{number}: not an object: {line[:200]!r}")
                continue
            missing = [k for k in ("timestamp", "level", "event", "node_id") if k not in record]
            if missing:
                problems.append(f"{self.stdout_path.name}:{number}: missing {missing}: {line[:200]!r}")
        return problems

    def tail(self, lines: int = 15) -> str:
        out = self.stdout_lines()[-lines:]
        err = self.stderr_text().strip().splitlines()[-lines:]
        return "\n".join(
            [f"--- {self.ip} stdout (last {len(out)}) ---", *out, f"--- {self.ip} stderr ---", *err]
        )


class Cluster:
    """Nodes on 127.0.S.2, .3, … sharing one port and a test DNS server that names the running nodes.

    ``with Cluster(log_dir, size=3, env={...}) as c: c.start_all(); ...``. Leaving the block kills every node
    still running and stops the DNS server.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        size: int = 3,
        env: Mapping[str, str] | None = None,
        subnet: int | None = None,
        service: str | None = None,
    ) -> None:
        self.subnet = pick_subnet() if subnet is None else subnet
        self.ips = [f"127.0.{self.subnet}.{i}" for i in range(2, 2 + size)]
        self.port = free_port(self.ips + [f"127.0.{self.subnet}.{i}" for i in range(2 + size, 2 + size + 4)])
        self.service = service or f"tn-{secrets.token_hex(3)}.test"
        self.log_dir = log_dir
        self.extra_env = dict(env or {})
        # A cluster of one is a known single node: it need not look for peers before it forms (as a user
        # would set for `python -m node` on a laptop). Larger clusters, and nodes added later, keep the
        # documented window.
        self.size = size
        self.dns = TestDnsServer()
        self.nodes: dict[str, NodeProcess] = {}
        self.jwt_secret = secrets.token_hex(32)
        for ip in self.ips:
            self.add_node(ip)

    def spare_ip(self, n: int = 0) -> str:
        """An address in this cluster's /24 that no node of the cluster uses (for extra nodes)."""
        return f"127.0.{self.subnet}.{2 + len(self.ips) + n}"

    def node_env(self, ip: str, **overrides: str) -> dict[str, str]:
        env = {
            "SERVICE_NAME": self.service,
            "PORT": str(self.port),
            "HOST": ip,
            "ADVERTISE_ADDRESS": ip,
            "DNS_SERVERS": self.dns.address,
            "JWT_SECRET": self.jwt_secret,
            "DATA_DIR": str(self.log_dir / f"data-{ip}"),
            "LOG_LEVEL": "info",
        }
        if self.size == 1 and ip in self.ips:
            env["FORMATION_WINDOW"] = "0"
        env.update(self.extra_env)
        env.update(overrides)
        return clean_env(env)

    def add_node(self, ip: str, **overrides: str) -> NodeProcess:
        node = NodeProcess(ip, self.port, self.node_env(ip, **overrides), self.log_dir)
        self.nodes[ip] = node
        return node

    def __enter__(self) -> Cluster:
        self.dns.__enter__()
        self.publish_dns()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            for node in self.nodes.values():
                node.kill()
        finally:
            self.dns.__exit__(None, None, None)

    # --- DNS: answers with the running nodes, like Docker's embedded DNS -----------------------------------

    def running_ips(self) -> list[str]:
        return [
            ip for ip, node in self.nodes.items() if node.running and node.env["SERVICE_NAME"] == self.service
        ]

    def publish_dns(self, ips: list[str] | None = None) -> None:
        self.dns.set(self.service, self.running_ips() if ips is None else ips)

    # --- life cycle ---------------------------------------------------------------------------------------

    def start(self, ip: str) -> NodeProcess:
        """Start one node; DNS names it from the moment its process exists (as Docker does)."""
        node = self.nodes[ip].start()
        self.publish_dns()
        return node

    def start_all(self, timeout_s: float = 20.0) -> float:
        """Start every node one after the other, wait until they agree; return seconds until agreement."""
        t0 = time.monotonic()
        for ip in self.ips:
            self.start(ip)
        self.wait_agreed(self.ips, timeout_s=timeout_s)
        return time.monotonic() - t0

    def kill9(self, ip: str) -> None:
        node = self.nodes[ip]
        node.send(signal.SIGKILL)
        node.wait_exit(5)
        self.publish_dns()

    def leader_ip(self) -> str:
        return max(self.running_ips(), key=node_id)

    # --- agreement ----------------------------------------------------------------------------------------

    def statuses(self, ips: Iterable[str], timeout_s: float = 0.5) -> dict[str, dict[str, Any] | None]:
        return {ip: self.nodes[ip].status(timeout_s) for ip in ips}

    @staticmethod
    def agreement(
        statuses: Mapping[str, dict[str, Any] | None], members: Iterable[str], *, exact: bool = True
    ) -> bool:
        """Every node in ``statuses`` reports ``members`` as its healthy nodes, led by the highest ID, and its
        own role accordingly. ``exact``: no other node listed either (with ``exact=False`` a killed peer may
        still be listed as unhealthy, as it is until NODE_TIMEOUT)."""
        members = sorted(members, key=node_id)
        want_ids = [node_id(m) for m in members]
        expected_leader = want_ids[-1]
        for ip, st in statuses.items():
            if st is None or st.get("leader_id") != expected_leader:
                return False
            nodes = st.get("nodes", [])
            if [n.get("id") for n in nodes if n.get("healthy")] != want_ids:
                return False
            if exact and (st.get("total_nodes") != len(members) or len(nodes) != len(members)):
                return False
            expected_role = "leader" if node_id(ip) == expected_leader else "follower"
            if st.get("current_role") != expected_role:
                return False
        return True

    def leader_agreed(self, ips: Iterable[str], leader: str) -> bool:
        """Every node in ``ips`` names ``leader`` as the leader (a weaker check than :meth:`agreement`)."""
        want = node_id(leader)
        return all(st is not None and st.get("leader_id") == want for st in self.statuses(ips).values())

    def wait_agreed(
        self,
        members: Iterable[str],
        timeout_s: float,
        interval_s: float = 0.02,
        *,
        asked: Iterable[str] | None = None,
        exact: bool = True,
    ) -> dict[str, dict[str, Any] | None]:
        """Wait until every node in ``asked`` (default: ``members``) shows :meth:`agreement` on ``members``;
        return the statuses that showed it."""
        members = list(members)
        asked = list(members if asked is None else asked)
        last: dict[str, dict[str, Any] | None] = {}

        def check():
            last.clear()
            last.update(self.statuses(asked))
            return dict(last) if self.agreement(last, members, exact=exact) else None

        return wait_until(
            check,
            timeout_s,
            interval_s,
            what=f"{asked} to agree on members {members} led by {max(members, key=node_id)}",
            describe=lambda: self.describe(last),
        )

    def describe(self, statuses: Mapping[str, dict[str, Any] | None] | None = None) -> str:
        parts = []
        for ip, st in (statuses or {}).items():
            if st is None:
                parts.append(f"{ip}: no answer")
            else:
                nodes = ", ".join(
                    f"{n['id']}{'' if n['healthy'] else '(unhealthy)'}" for n in st.get("nodes", [])
                )
                parts.append(f"{ip}: leader {st.get('leader_id')} nodes [{nodes}]")
        for node in self.nodes.values():
            if node.starts:
                parts.append(node.tail())
        return "\n".join(parts)

    def all_log_problems(self) -> list[str]:
        return [p for node in self.nodes.values() if node.starts for p in node.log_problems()]
