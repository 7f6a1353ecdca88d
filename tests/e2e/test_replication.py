"""REPLICATION=on on real containers: formation, docker kill of the leader under writes, lost quorum, and
network partitions made with iptables inside a node's network namespace.

Each node has a named volume on /data (what an operator runs). Short timings via the documented variables
keep the file within a few minutes. Every wait has a deadline; time bounds are liveness bounds (a write must
be answered, not hang), never speed assertions. Measured figures go to the "e2e timings" summary.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from node import auth
from tests.e2e.support import ROOT, Cluster, Timings, node_id, run, wait_until
from tests.support.http import call_json

pytestmark = pytest.mark.e2e

ENV = {
    "REPLICATION": "on",
    "FORMATION_WINDOW": "2",
    "PROBE_INTERVAL": "0.2",
    "PROBE_TIMEOUT": "0.3",
    "DISCOVERY_INTERVAL": "1",
}
WRITE_TIMEOUT_S = 5.0  # liveness bound for one write: answered (any status) within it, or counted as hung
LEASE_MARGIN_S = 1.5  # the core's lease is 0.5 s; failure detection and a request in flight add the rest


def call(port: int, path: str, body: Any = None, tok: str | None = None, timeout_s: float = WRITE_TIMEOUT_S):
    """(status, headers, JSON body) of one request to 127.0.0.1:port; connection failure or timeout is 0."""
    return call_json(f"http://127.0.0.1:{port}{path}", body, tok, timeout_s)


class ReplicatedCluster(Cluster):
    """A Cluster whose nodes each keep /data on a named volume (removed with the cluster)."""

    def run(self, n: int) -> str:
        name = self.name(n)
        env_args = [arg for key, value in self.env.items() for arg in ("--env", f"{key}={value}")]
        self.docker(
            "run", "-d", "--name", name, "--network", self.network, "--network-alias", self.service,
            "-v", f"{name}-data:/data", "-p", "127.0.0.1::3000", *env_args, self.image,
        )  # fmt: skip
        if name not in self.names:
            self.names.append(name)
        self.forget_port(name)
        return name

    def destroy(self) -> None:
        super().destroy()
        for name in self.names:
            self.docker("volume", "rm", "-f", f"{name}-data", check=False)

    def restart(self, name: str) -> None:
        self.docker("start", name)
        self.forget_port(name)


@pytest.fixture
def rcluster(docker: Any, image: str) -> Iterator[Callable[[], ReplicatedCluster]]:
    made: list[ReplicatedCluster] = []

    def make() -> ReplicatedCluster:
        cluster = ReplicatedCluster(docker, image, env=ENV)
        made.append(cluster)
        cluster.create_network()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.destroy()


def token(cluster: Cluster) -> str:
    return auth.mint_jwt(cluster.env["JWT_SECRET"], auth.Role.ADMIN, now=time.time(), ttl_s=3600)


def formed(cluster: Cluster, names: list[str], ids: dict[str, int]) -> str | None:
    """None when every node reports the replication fields, 3 voters, the same epoch and exactly one
    writable node, the highest ID; else what is still wrong."""
    views = {name: cluster.status(name, timeout=1.0) for name in names}
    for name, view in views.items():
        if view is None or "commit_index" not in view:
            return f"{name}: {view and 'no replication fields'}"
        voters = sum(1 for n in view["nodes"] if n.get("voter"))
        if voters != len(names):
            return f"{name} sees {voters} voters"
    epochs = {view["epoch"] for view in views.values() if view}
    writable = [name for name, view in views.items() if view and view["writable"]]
    if len(epochs) != 1:
        return f"epochs differ: {epochs}"
    if writable != [max(names, key=ids.__getitem__)]:
        return f"writable: {writable}"
    return None


def form(cluster: ReplicatedCluster) -> tuple[list[str], dict[str, int]]:
    names = [cluster.run(n) for n in (1, 2, 3)]
    ids = {name: node_id(cluster.ip(name)) for name in names}
    problem: list[str | None] = [None]

    def ok() -> bool:
        problem[0] = formed(cluster, names, ids)
        return problem[0] is None

    try:
        wait_until(ok, 45, 0.2, what="one cluster of three voters")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nproblem: {problem[0]}") from None
    return sorted(names, key=ids.__getitem__), ids


def rows(cluster: Cluster, name: str, tok: str) -> list[int] | None:
    """The node's local copy of table t (level=none), sorted; None if it cannot answer."""
    try:
        port = cluster.port(name)
    except AssertionError:
        return None
    status, _, body = call(port, "/db/query?level=none&q=SELECT+v+FROM+t+ORDER+BY+v", tok=tok, timeout_s=2)
    if status != 200 or not isinstance(body, dict) or "error" in body["results"][0]:
        return None
    return [row[0] for row in body["results"][0].get("values", [])]


def writable(cluster: Cluster, names: list[str]) -> str | None:
    for name in names:
        view = cluster.status(name, timeout=0.5)
        if view is not None and view.get("writable"):
            return name
    return None


def write(cluster: Cluster, name: str, tok: str, sql: list[Any]) -> int:
    return call(cluster.port(name), "/db/execute", [sql], tok)[0]


def identical(cluster: Cluster, names: list[str], tok: str, must_hold: set[int]) -> bool:
    copies = [rows(cluster, name, tok) for name in names]
    return copies[0] is not None and all(c == copies[0] for c in copies) and must_hold <= set(copies[0])


def wait_identical(cluster: Cluster, names: list[str], tok: str, must_hold: set[int], timeout: float) -> None:
    try:
        wait_until(lambda: identical(cluster, names, tok, must_hold), timeout, 0.2, what="identical tables")
    except AssertionError as exc:
        copies = {name: rows(cluster, name, tok) for name in names}
        summary = {
            name: None
            if r is None
            else f"{len(r)} rows, missing acknowledged {sorted(must_hold - set(r))[:10]}"
            for name, r in copies.items()
        }
        raise AssertionError(f"{exc}\n{summary}") from None


@dataclass
class Load:
    """Unique inserts through one node from a thread: which were acknowledged (200), when, and every other
    answer. Bounded in count and stopped by stop()."""

    cluster: Cluster
    through: str
    tok: str
    start_value: int
    acked: list[int] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    acked_sent: list[float] = field(default_factory=list)
    others: list[tuple[float, int, Any]] = field(default_factory=list)
    hung: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._port = self.cluster.port(self.through)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for v in range(self.start_value, self.start_value + 20_000):
            if self._stop.is_set():
                return
            sent = time.monotonic()
            status, _, body = call(self._port, "/db/execute", [["INSERT INTO t VALUES (?)", v]], self.tok)
            if status == 200:
                self.acked.append(v)
                self.acked_at.append(time.monotonic())
                self.acked_sent.append(sent)
            else:
                self.hung += status == 0 and time.monotonic() - sent >= WRITE_TIMEOUT_S
                self.others.append((sent, status, body))
                time.sleep(0.05)

    def acked_after(self, moment: float) -> int:
        return sum(1 for t in self.acked_at if t > moment)

    def longest_gap_s(self, since: float) -> float:
        marks = [since, *(t for t in self.acked_at if t > since)]
        return max((b - a for a, b in zip(marks, marks[1:], strict=False)), default=0.0)

    @contextmanager
    def running(self) -> Iterator[Load]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=WRITE_TIMEOUT_S + 5)
            assert not self._thread.is_alive(), "the write load did not stop"


def create_table(cluster: Cluster, names: list[str], tok: str) -> None:
    assert write(cluster, names[0], tok, ["CREATE TABLE t (v INTEGER PRIMARY KEY)"]) == 200
    wait_identical(cluster, names, tok, set(), 15)


def test_three_containers_form_one_cluster_and_every_node_sees_every_write(
    rcluster, timings: Timings
) -> None:
    cluster = rcluster()
    started = time.monotonic()
    names, ids = form(cluster)
    timings.record(
        "replication", "docker run x3 -> one writable leader, 3 voters", time.monotonic() - started
    )
    tok = token(cluster)
    create_table(cluster, names, tok)
    for i, name in enumerate(names):
        status, headers, body = call(
            cluster.port(name), "/db/execute", [["INSERT INTO t VALUES (?)", i]], tok
        )
        assert status == 200, body
        assert headers["X-TalentNest-Node"] == str(ids[names[-1]])  # executed by the leader
    wait_identical(cluster, names, tok, {0, 1, 2}, 15)
    assert rows(cluster, names[0], tok) == [0, 1, 2]
    # The operator's view: deploy/status.py agrees (one writable node, one epoch) and shows the columns.
    nodes = [f"{name}={cluster.port(name)}" for name in names]
    shown = run([sys.executable, str(ROOT / "deploy" / "status.py"), "--wait", "10", *nodes], timeout=30)
    header = shown.stdout.splitlines()[0].split()
    assert header[8:13] == ["WRITABLE", "COMMIT", "APPLIED", "VOTER", "LAG"], shown.stdout
    assert "3 nodes agree" in shown.stdout


def test_docker_kill_of_the_leader_under_writes_loses_no_acknowledged_write(
    rcluster, timings: Timings
) -> None:
    test = "replication kill"
    cluster = rcluster()
    names, ids = form(cluster)
    lowest, middle, highest = names
    tok = token(cluster)
    create_table(cluster, names, tok)
    with Load(cluster, lowest, tok, 1).running() as load:
        wait_until(lambda: len(load.acked) >= 20, 20, what="writes before the kill")
        killed_at = time.monotonic()
        cluster.docker("kill", highest)
        wait_until(lambda: writable(cluster, [lowest, middle]), 20, 0.05, what="a writable survivor")
        timings.record(test, "docker kill leader -> writable next-highest", time.monotonic() - killed_at)
        assert writable(cluster, [lowest, middle]) == middle
        wait_until(lambda: load.acked_after(killed_at) >= 10, 20, what="writes after the failover")
    timings.record(test, "longest gap between acknowledged writes", load.longest_gap_s(killed_at))
    assert load.hung == 0, f"{load.hung} writes hung past {WRITE_TIMEOUT_S} s"
    acked = set(load.acked)
    wait_identical(cluster, [lowest, middle], tok, acked, 15)
    cluster.restart(highest)
    started = time.monotonic()
    wait_identical(cluster, names, tok, acked, 30)
    timings.record(test, "docker start killed node -> identical tables", time.monotonic() - started)
    ids[highest] = node_id(cluster.ip(highest))  # docker start may hand out another address
    wait_until(lambda: formed(cluster, names, ids) is None, 30, 0.2, what="one cluster of three again")
    timings.record(test, "docker start killed node -> it leads again, one epoch", time.monotonic() - started)


def test_two_of_three_stopped_reads_work_writes_503_then_resume(rcluster, timings: Timings) -> None:
    test = "replication quorum"
    cluster = rcluster()
    names, ids = form(cluster)
    lowest, middle, highest = names
    tok = token(cluster)
    create_table(cluster, names, tok)
    assert write(cluster, lowest, tok, ["INSERT INTO t VALUES (1)"]) == 200
    wait_identical(cluster, names, tok, {1}, 15)
    cluster.docker("stop", "-t", "2", highest, middle)
    wait_until(
        lambda: (cluster.status(lowest) or {}).get("healthy_nodes") == 1, 20, what="the survivor alone"
    )
    assert rows(cluster, lowest, tok) == [1]
    assert (cluster.status(lowest) or {}).get("current_role") == "leader"  # of its own view; not writable
    assert (cluster.status(lowest) or {}).get("writable") is False
    started = time.monotonic()
    status, _, body = call(cluster.port(lowest), "/db/execute", [["INSERT INTO t VALUES (2)"]], tok)
    took_s = time.monotonic() - started
    timings.record(test, "write without quorum -> 503 answer", took_s)
    assert status == 503 and isinstance(body, dict) and body.get("code") == "no_quorum", (status, body)
    assert took_s < 5.0  # liveness: answered, not hung
    before = cluster.ip(middle)
    cluster.restart(middle)
    started = time.monotonic()
    timings.record(test, "restarted node's address", f"{before} -> {cluster.ip(middle)}", "")
    trace: list[str] = []  # what the survivor said while writes were refused: printed, and shown on failure

    def resumed() -> bool:
        status = write(cluster, lowest, tok, ["INSERT OR IGNORE INTO t VALUES (3)"])
        view = cluster.status(lowest) or {}
        seen = [(n["address"], n["healthy"], n.get("voter")) for n in view.get("nodes", [])]
        trace.append(
            f"{time.monotonic() - started:.2f}s {status} writable={view.get('writable')} "
            f"epoch={view.get('epoch')} commit={view.get('commit_index')} view={seen}"
        )
        return status == 200

    try:
        wait_until(resumed, 40, 0.5, what="writes to resume with two of three")
    finally:
        print("\n".join(trace[-80:]))
    timings.record(test, "docker start of one node -> writes resume", time.monotonic() - started)
    wait_identical(cluster, [lowest, middle], tok, {1, 3}, 15)


def _iptables_missing() -> str | None:
    missing = [tool for tool in ("nsenter", "iptables") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return f"needs {' and '.join(missing)} on the host" if missing else None


class Partition:
    """Drop traffic between one container and the given peers, inside the container's network namespace
    (the host's own requests to the published port come from the bridge gateway and still pass)."""

    def __init__(self, cluster: Cluster, name: str, peers: list[str]) -> None:
        self.cluster = cluster
        self.pid = cluster.docker.inspect(name, "{{.State.Pid}}")
        self.ips = [cluster.ip(peer) for peer in peers]
        self.rules = [r for ip in self.ips for r in (("INPUT", "-s", ip), ("OUTPUT", "-d", ip))]

    def _iptables(self, action: str) -> None:
        for chain, flag, ip in self.rules:
            run(
                ["nsenter", "-t", self.pid, "-n", "iptables", action, chain, flag, ip, "-j", "DROP"],
                timeout=30,
            )

    @contextmanager
    def applied(self) -> Iterator[None]:
        self._iptables("-A")
        try:
            yield
        finally:
            self._iptables("-D")


def test_partitions_a_follower_then_the_leader(rcluster, timings: Timings) -> None:
    problem = _iptables_missing()
    if problem and os.environ.get("CI", "").lower() not in ("true", "1", "yes"):
        pytest.skip(f"partitions with iptables: {problem}")
    assert problem is None, problem
    test = "replication partition"
    cluster = rcluster()
    names, ids = form(cluster)
    lowest, middle, highest = names
    tok = token(cluster)
    create_table(cluster, names, tok)

    # A follower cut off: the majority (leader + the other follower) keeps acknowledging writes.
    with Partition(cluster, lowest, [middle, highest]).applied():
        with Load(cluster, middle, tok, 1).running() as load:
            cut_at = time.monotonic()
            wait_until(lambda: load.acked_after(cut_at) >= 20, 20, what="writes with a follower cut off")
        assert writable(cluster, names) == highest
        assert load.hung == 0
        timings.record(
            test, "follower cut: longest gap between acknowledged writes", load.longest_gap_s(cut_at)
        )
    healed_at = time.monotonic()
    acked = set(load.acked)
    wait_identical(cluster, names, tok, acked, 20)
    timings.record(test, "follower healed -> caught up", time.monotonic() - healed_at)

    # The leader cut off into a minority of one: it stops acknowledging after its lease; the majority elects
    # the next-highest and goes on.
    old = Load(cluster, highest, tok, 100_000)
    with Partition(cluster, highest, [lowest, middle]).applied():
        cut_at = time.monotonic()
        with old.running(), Load(cluster, lowest, tok, 200_000).running() as majority:
            wait_until(lambda: writable(cluster, [lowest, middle]) == middle, 20, 0.05, what="a new leader")
            timings.record(test, "leader cut -> writable next-highest", time.monotonic() - cut_at)
            wait_until(lambda: majority.acked_after(cut_at) >= 10, 20, what="majority writes after the cut")
            wait_until(lambda: len(old.others) >= 3, 20, what="refused writes on the old leader")
        late = [round(t - cut_at, 2) for t in old.acked_sent if t - cut_at > LEASE_MARGIN_S]
        assert not late, f"the cut-off leader acknowledged writes sent {late} s after the cut"
        assert old.hung == 0, f"{old.hung} writes to the cut-off leader hung past {WRITE_TIMEOUT_S} s"
        assert {status for _, status, _ in old.others} == {503}, old.others[:5]
        assert (cluster.status(highest) or {}).get("writable") is False
        timings.record(
            test, "leader cut: longest gap between acknowledged writes", majority.longest_gap_s(cut_at)
        )
        timings.record(
            test, "writes acknowledged by the cut-off leader after the cut", f"{old.acked_after(cut_at)}"
        )
    healed_at = time.monotonic()
    acked = set(load.acked) | set(old.acked) | set(majority.acked)
    wait_identical(cluster, names, tok, acked, 30)
    timings.record(test, "leader healed -> identical tables", time.monotonic() - healed_at)
    wait_until(lambda: formed(cluster, names, ids) is None, 30, 0.2, what="one cluster again after healing")
