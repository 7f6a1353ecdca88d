"""Real containers for the fault suite: fixed addresses, named volumes, and the faults themselves.

Each cluster gets its own bridge network with an explicit /24 subnet, so a node's address — and therefore its
ID and whether it leads — is chosen by the test (slot ``n`` is ``<subnet>.(n + 1)``). The host reaches every
node on its bridge address (port 3000); partitions are iptables rules inside one container's network
namespace (``nsenter -t <pid> -n``), which leave the host's own requests (they come from the bridge gateway)
untouched. Everything created is removed by :meth:`FaultCluster.destroy`, pass or fail.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from tests.e2e.support import Docker, run, unique_prefix

ENV = {
    "REPLICATION": "on",
    "FORMATION_WINDOW": "2",
    "PROBE_INTERVAL": "0.2",
    "PROBE_TIMEOUT": "0.3",
    "DISCOVERY_INTERVAL": "1",
}


def get_json(url: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - the test's own containers
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


class FaultCluster:
    def __init__(self, docker: Docker, image: str, env: dict[str, str] | None = None) -> None:
        self.docker = docker
        self.image = image
        self.prefix = unique_prefix().replace("e2e", "faults")
        self.network = f"{self.prefix}-net"
        self.service = "backend-service"
        # 10.201-250.x.0/24: far from Docker's default pools (172.17+/192.168) and from loopback tests.
        self.subnet = f"10.{200 + secrets.randbelow(50) + 1}.{secrets.randbelow(250) + 1}"
        self.env = {
            "SERVICE_NAME": self.service,
            "JWT_SECRET": "faults-" + secrets.token_hex(16),
            "PORT": "3000",
            **ENV,
            **(env or {}),
        }
        self.slots: dict[int, str] = {}  # slot -> container name
        self.cuts: dict[int, list[tuple[str, str, str]]] = {}  # slot -> iptables rules in its netns
        self.stopped_by_signal: set[int] = set()  # slots "paused" with SIGSTOP (see pause)

    # ---------------------------------------------------------------------------------------------- set-up
    def create_network(self) -> None:
        self.docker(
            "network", "create", "--driver", "bridge", "--subnet", f"{self.subnet}.0/24", self.network
        )

    def ip(self, slot: int) -> str:
        return f"{self.subnet}.{slot + 1}"

    def node_id(self, slot: int) -> int:
        third, fourth = (int(x) for x in self.ip(slot).split(".")[2:])
        return third * 256 + fourth

    def url(self, slot: int) -> str:
        return f"http://{self.ip(slot)}:3000"

    def name(self, slot: int) -> str:
        return f"{self.prefix}-{slot}"

    def run(self, slot: int, tmpfs_mb: int | None = None) -> str:
        """Start the node of ``slot``: DATA_DIR on a named volume, or on a tmpfs of ``tmpfs_mb`` (a small disk
        that fills up; a restart of the container starts it empty, as a wiped disk would)."""
        name = self.name(slot)
        env_args = [arg for key, value in self.env.items() for arg in ("--env", f"{key}={value}")]
        disk = (
            ["--tmpfs", f"/data:rw,size={tmpfs_mb}m,uid=10001,gid=10001,mode=0700"] if tmpfs_mb
            else ["-v", f"{name}-data:/data"]
        )  # fmt: skip
        self.docker(
            "run", "-d", "--name", name, "--network", self.network, "--ip", self.ip(slot),
            "--network-alias", self.service, *disk, *env_args, self.image,
        )  # fmt: skip
        self.slots[slot] = name
        return name

    # ---------------------------------------------------------------------------------------------- disks
    def fill_disk(self, slot: int) -> None:
        """Fill the node's DATA_DIR (a tmpfs) to the last byte: its next log write fails with ENOSPC."""
        self.docker("exec", self.slots[slot], "sh", "-c", "dd if=/dev/zero of=/data/filler bs=64k", check=False)

    def free_disk(self, slot: int) -> None:
        self.docker("exec", self.slots[slot], "rm", "-f", "/data/filler")

    def corrupt_database(self, slot: int) -> str:
        """With the node stopped: overwrite one page in the middle of its database file (on its volume) with
        random bytes, as a failing disk would; page 1 (the file header) stays intact so the file opens. Returns what
        was done (for the report)."""
        script = (
            "import os, apsw\n"
            "p = '/data/node.db'\n"
            "c = apsw.Connection(p)\n"  # fold a WAL left behind in: the damaged page is the one read
            "c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchall()\n"
            "c.close()\n"
            "size = os.path.getsize(p)\n"
            "page = int.from_bytes(open(p, 'rb').read(18)[16:18], 'big') or 65536\n"
            "pages = size // page\n"
            "victim = max(1, pages // 2)\n"
            "with open(p, 'r+b') as f:\n"
            "    f.seek(victim * page)\n"
            "    f.write(os.urandom(page))\n"
            "    f.flush(); os.fsync(f.fileno())\n"
            "print(f'page {victim + 1} of {pages} ({page} bytes)')\n"
        )
        done = self.docker(
            "run", "--rm", "-v", f"{self.name(slot)}-data:/data", "--entrypoint", "/opt/venv/bin/python",
            self.image, "-c", script,
        )  # fmt: skip
        return done.stdout.strip()

    def destroy(self) -> None:
        listed = self.docker("ps", "-aq", "--filter", f"name=^{self.prefix}-", check=False).stdout.split()
        for slot in list(self.stopped_by_signal):
            self.docker("kill", "-s", "CONT", self.slots[slot], check=False)  # never raises: cleanup goes on
        self.stopped_by_signal.clear()
        if listed:
            self.docker("unpause", *listed, check=False)
            self.docker("rm", "-f", "-v", *listed, check=False)
        for name in self.slots.values():
            self.docker("volume", "rm", "-f", f"{name}-data", check=False)
        if self.docker.exists("network", self.network):
            self.docker("network", "rm", self.network, check=False)

    # ---------------------------------------------------------------------------------------------- views
    def status(self, slot: int) -> dict[str, Any] | None:
        return get_json(f"{self.url(slot)}/cluster/status")

    def writable(self, slots: Iterable[int]) -> list[int]:
        return [s for s in slots if (self.status(s) or {}).get("writable")]

    def healthy(self, slots: list[int]) -> str | None:
        """None when every listed node reports len(slots) voters, one epoch and exactly one writable node —
        the highest ID; else what is still wrong (for the wait's message)."""
        views = {s: self.status(s) for s in slots}
        for s, view in views.items():
            if view is None or "commit_index" not in view:
                return f"slot {s}: no status"
            voters = sum(1 for n in view["nodes"] if n.get("voter"))
            if voters != len(slots):
                return f"slot {s} sees {voters} voters"
        epochs = {view["epoch"] for view in views.values() if view}
        writable = [s for s, view in views.items() if view and view.get("writable")]
        if len(epochs) != 1:
            return f"epochs differ: {epochs}"
        if writable != [max(slots, key=self.node_id)]:
            return f"writable: {writable}"
        return None

    # ---------------------------------------------------------------------------------------------- faults
    def kill(self, slot: int) -> None:
        self.docker("kill", "-s", "KILL", self.slots[slot])

    def stop(self, slot: int) -> None:
        self.docker("stop", "-t", "2", self.slots[slot])

    def start(self, slot: int) -> None:
        self.cuts.pop(slot, None)  # a new network namespace: old rules are gone
        self.docker("start", self.slots[slot])

    def pause(self, slot: int) -> None:
        """Freeze the node. ``docker pause`` needs the cgroup freezer; where the engine cannot freeze (some
        kernels and nested set-ups), SIGSTOP to the container's only process has the same effect: the node is
        PID 1 and starts no children, and SIGSTOP from the host's namespace cannot be caught or ignored."""
        result = self.docker("pause", self.slots[slot], check=False)
        if result.returncode != 0:
            if "freeze" not in result.stderr:
                raise AssertionError(f"docker pause failed: {result.stderr.strip()}")
            self.docker("kill", "-s", "STOP", self.slots[slot])
            self.stopped_by_signal.add(slot)

    def unpause(self, slot: int) -> None:
        if slot in self.stopped_by_signal:
            self.stopped_by_signal.discard(slot)
            self.docker("kill", "-s", "CONT", self.slots[slot])
        else:
            self.docker("unpause", self.slots[slot])

    def _pid(self, slot: int) -> str:
        return self.docker.inspect(self.slots[slot], "{{.State.Pid}}")

    def _iptables(self, slot: int, *args: str) -> None:
        run(["nsenter", "-t", self._pid(slot), "-n", "iptables", *args], timeout=30)

    def cut(self, slot: int, peers: Iterable[int]) -> None:
        """Drop every packet between ``slot`` and each peer, both ways, inside ``slot``'s namespace."""
        for peer in peers:
            for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
                rule = (chain, flag, self.ip(peer))
                self._iptables(slot, "-A", chain, flag, self.ip(peer), "-j", "DROP")
                self.cuts.setdefault(slot, []).append(rule)

    def drop_dns(self, slot: int) -> None:
        """Docker's embedded DNS server answers on 127.0.0.11 inside the namespace: drop what goes to it."""
        rule = ("OUTPUT", "-d", "127.0.0.11")
        self._iptables(slot, "-A", "OUTPUT", "-d", "127.0.0.11", "-j", "DROP")
        self.cuts.setdefault(slot, []).append(rule)

    def heal(self, slot: int | None = None) -> None:
        for s in [slot] if slot is not None else list(self.cuts):
            for chain, flag, ip in self.cuts.pop(s, []):
                self._iptables(s, "-D", chain, flag, ip, "-j", "DROP")


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2, describe=None):  # noqa: ANN001, ANN201
    """Poll until ``predicate()`` is truthy (returned) — AssertionError naming ``what`` after the deadline,
    with ``describe()`` (what is still wrong) if given, else the predicate's last value."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            detail = describe() if describe is not None else last
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; last: {detail!r}")
        time.sleep(interval_s)
