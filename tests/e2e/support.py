"""Helpers for the end-to-end tests: a thin docker CLI wrapper, bounded waits, and a test cluster.

Everything talks to the engine through the docker command line (the same commands the README documents)
and to the nodes through their published ports on 127.0.0.1. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# Documented contracts the tests hold the image to.
# The promise: on SIGTERM a node says goodbye and exits 0 within 2 s. Tests check it without timing the machine:
# `docker stop -t 2` has Docker SIGKILL the container at 2 s, which shows as exit status 137, not 0.
STOP_BOUND_S = 2
STOP_WITHIN = ("-t", str(STOP_BOUND_S))
ROUND_S = 10.0  # the documented discovery round: failover must be well within it


def docker_binary() -> str | None:
    """$DOCKER, else Debian's client (it speaks the engine's API natively), else docker on PATH."""
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker")


def unique_prefix() -> str:
    return f"tn-e2e-{secrets.token_hex(3)}"


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "") -> T:
    """Poll predicate until it returns something truthy; return that. AssertionError after timeout s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what or predicate}; last: {last!r}"
            )
        time.sleep(interval)


class Docker:
    """Runs the docker CLI; every call has a timeout and, by default, must succeed."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def __call__(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run([self.binary, *args], check=check, timeout=timeout, env=env, cwd=cwd)

    def timed(self, *args: str, **kwargs: Any) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = self(*args, **kwargs)
        return result, time.monotonic() - started

    def exists(self, kind: str, name: str) -> bool:
        return self(kind, "inspect", name, check=False, timeout=30).returncode == 0

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", "-f", template, name).stdout.strip()

    def exit_code(self, name: str) -> int:
        return int(self.inspect(name, "{{.State.ExitCode}}"))

    def host_port(self, name: str, port: int = 3000) -> int:
        # "127.0.0.1:49153" (one line per published address)
        out = self("port", name, str(port)).stdout.split()
        return int(out[0].rpartition(":")[2])

    def ip(self, name: str, network: str) -> str:
        return self.inspect(name, f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}')

    def logs(self, name: str, *args: str) -> list[dict[str, Any]]:
        """The container's stdout as JSON objects; every line must be one (the documented log format)."""
        result = self("logs", *args, name)
        return parse_json_lines(result.stdout)


def run(
    cmd: list[str],
    *,
    check: bool = True,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env} if env else None
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd, input=input_text
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\nstdout: {result.stdout[-2000:]}\n"
            f"stderr: {result.stderr[-2000:]}"
        )
    return result


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
        assert isinstance(value, dict) and "event" in value and "timestamp" in value, line
        lines.append(value)
    return lines


def get_json(
    port: int, path: str = "/cluster/status", timeout: float = 1.0, host: str = "127.0.0.1"
) -> dict[str, Any] | None:
    """GET http://host:port/path as JSON; None if the node does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def node_id(ip: str) -> int:
    """The documented ID: the last two octets of the IPv4 address."""
    octets = [int(part) for part in ip.split(".")]
    return octets[2] * 256 + octets[3]


def agreement(
    views: dict[str, dict[str, Any] | None], expect: int, *, listed: int | None = None
) -> str | None:
    """None when every node answered, sees `expect` healthy nodes and names the same leader: the highest
    healthy ID. `listed` is the number of entries each view must have (default `expect`); None in the
    keyword means exactly `expect`, -1 means any (a dead peer stays listed, unhealthy, until NODE_TIMEOUT).
    """
    listed = expect if listed is None else listed
    for name, view in views.items():
        if view is None:
            return f"{name} does not answer"
        if view["healthy_nodes"] != expect or (listed >= 0 and view["total_nodes"] != listed):
            return f"{name} sees {view['healthy_nodes']}/{view['total_nodes']} healthy, expected {expect}"
    leaders = {view["leader_id"] for view in views.values() if view}
    highest = {max(n["id"] for n in view["nodes"] if n["healthy"]) for view in views.values() if view}
    if len(leaders) != 1 or leaders != highest:
        return f"leaders {sorted(leaders)}, highest healthy IDs {sorted(highest)}"
    return None


def wait_agree_ports(
    ports: dict[str, int], timeout: float, *, listed: int | None = None, interval: float = 0.05
) -> dict[str, Any]:
    """Wait until the nodes published on these 127.0.0.1 ports agree (see agreement); return their views."""
    views: dict[str, Any] = {}

    def agreed() -> bool:
        views.clear()
        views.update({name: get_json(port) for name, port in ports.items()})
        return agreement(views, len(ports), listed=listed) is None

    try:
        wait_until(agreed, timeout, interval, what=f"{len(ports)} nodes to agree")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nproblem: {agreement(views, len(ports), listed=listed)}") from None
    return views


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive TCP ports free on this host right now (for -p HOST:3000 mappings)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", 0))
            first = sock.getsockname()[1]
        if first + count > 65536:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"no {count} consecutive free ports found")


@dataclass
class Timings:
    """Measured figures, printed in the pytest summary ("e2e timings") so CI output records them."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, test: str, what: str, value: float | str, unit: str = "s") -> None:
        text = f"{value:.2f} {unit}" if isinstance(value, float) else str(value)
        self.rows.append((test, what, text))
        print(f"[timing] {test}: {what} = {text}")


class Cluster:
    """Nodes on their own bridge network, published on ephemeral 127.0.0.1 ports; removed by destroy()."""

    def __init__(
        self,
        docker: Docker,
        image: str,
        *,
        prefix: str | None = None,
        service: str = "backend-service",
        env: dict[str, str] | None = None,
    ) -> None:
        self.docker = docker
        self.image = image
        self.prefix = prefix or unique_prefix()
        self.network = f"{self.prefix}-net"
        self.service = service
        self.env = {"SERVICE_NAME": service, "JWT_SECRET": "e2e-" + secrets.token_hex(16), "PORT": "3000"}
        self.env.update(env or {})
        self.names: list[str] = []
        self._ports: dict[str, int] = {}

    def name(self, n: int) -> str:
        return f"{self.prefix}-{n}"

    def create_network(self) -> None:
        self.docker("network", "create", "--driver", "bridge", self.network)

    def run(self, n: int) -> str:
        name = self.name(n)
        env_args = [arg for key, value in self.env.items() for arg in ("--env", f"{key}={value}")]
        self.docker(
            "run", "-d", "--name", name, "--network", self.network, "--network-alias", self.service,
            "-p", "127.0.0.1::3000", *env_args, self.image,
        )  # fmt: skip
        if name not in self.names:
            self.names.append(name)
        self._ports.pop(name, None)
        return name

    def port(self, name: str) -> int:
        if name not in self._ports:
            self._ports[name] = self.docker.host_port(name)
        return self._ports[name]

    def forget_port(self, name: str) -> None:
        """After docker start the engine may publish on another ephemeral port."""
        self._ports.pop(name, None)

    def status(self, name: str, timeout: float = 1.0) -> dict[str, Any] | None:
        return get_json(self.port(name), timeout=timeout)

    def views(self, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        return {name: self.status(name) for name in names}

    def wait_agree(
        self, names: list[str], timeout: float = 30.0, interval: float = 0.05, *, listed: int | None = None
    ) -> dict[str, Any]:
        """Wait until the named nodes agree (see agreement); return their views."""
        ports = {name: self.port(name) for name in names}
        return wait_agree_ports(ports, timeout, listed=listed, interval=interval)

    def ip(self, name: str) -> str:
        return self.docker.ip(name, self.network)

    def destroy(self) -> None:
        """Remove every container of this cluster (even ones a failed test left behind), then the network."""
        listed = self.docker("ps", "-aq", "--filter", f"name=^{self.prefix}-", check=False).stdout.split()
        if listed:
            self.docker("unpause", *listed, check=False)
            self.docker("rm", "-f", "-v", *listed, check=False)  # -v: the image's anonymous /data volume
        if self.docker.exists("network", self.network):
            self.docker("network", "rm", self.network, check=False)
