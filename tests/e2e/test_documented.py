"""The README's Docker scenario, command for command, with the documented names, ports and image tag."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from node import auth
from tests.e2e.support import (
    ROOT,
    ROUND_S,
    Docker,
    Timings,
    agreement,
    get_json,
    node_id,
    parse_json_lines,
    run,
    wait_until,
)
from tests.e2e.test_replication import call

pytestmark = pytest.mark.e2e

NAMES = ["backend-1", "backend-2", "backend-3"]
NETWORK = "talentnet"
PORTS = {"backend-1": 3001, "backend-2": 3002, "backend-3": 3003}
TEST = "documented scenario"


def _remove_documented(docker: Docker) -> None:
    # The README's `docker rm` keeps the containers' anonymous /data volumes; the test removes them too.
    docker("rm", "-f", "-v", *NAMES, check=False)
    if docker.exists("network", NETWORK):
        docker("network", "rm", NETWORK, check=False)


@pytest.fixture
def documented_names(docker: Docker) -> Iterator[None]:
    """The scenario uses fixed names: remove leftovers before, and everything after, pass or fail."""
    _remove_documented(docker)
    try:
        yield
    finally:
        _remove_documented(docker)


class LogFollower:
    """`docker logs -f NAME` in the background; it ends by itself when the container stops."""

    def __init__(self, docker: Docker, name: str) -> None:
        self.proc = subprocess.Popen(
            [docker.binary, "logs", "-f", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def finish(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(timeout)
        return parse_json_lines("\n".join(self.lines))


def _views(names: list[str]) -> dict[str, dict[str, Any] | None]:
    # `curl http://localhost:300N/cluster/status`
    return {name: get_json(PORTS[name], host="localhost") for name in names}


def _wait_agree(names: list[str], timeout: float) -> dict[str, Any]:
    views: dict[str, Any] = {}

    def agreed() -> bool:
        views.clear()
        views.update(_views(names))
        return agreement(views, len(names)) is None

    wait_until(agreed, timeout, 0.05, what=f"{names} to agree")
    return views


def _rows(name: str, tok: str) -> list[str] | None:
    """backend-N's own copy of table docs (level=none: no forwarding), or None if it cannot answer yet."""
    status, _, body = call(PORTS[name], "/db/query?level=none&q=SELECT+v+FROM+docs+ORDER+BY+v", tok=tok)
    if status != 200 or not isinstance(body, dict) or "error" in body["results"][0]:
        return None
    return [row[0] for row in body["results"][0].get("values", [])]


def _write_through(name: str, tok: str, value: str, timeout: float) -> None:
    """INSERT through backend-N, retried until acknowledged (the cluster may still be forming or electing).
    Every attempt carries the same X-Request-Id, so an attempt that timed out but was applied is not applied
    twice by the next one."""
    request_id = f"documented-{value}"
    answers: list[Any] = []

    def wrote() -> bool:
        request = urllib.request.Request(
            f"http://localhost:{PORTS[name]}/db/execute",
            data=json.dumps([["INSERT INTO docs(v) VALUES(?)", value]]).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {tok}",
                "X-Request-Id": request_id,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            answers.append((exc.code, exc.read()[:300]))
            return False
        except OSError as exc:
            answers.append(repr(exc))
            return False
        answers.append(body)
        return "error" not in body["results"][0]

    try:
        wait_until(wrote, timeout, 0.2, what=f"a write through {name}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast answers: {answers[-3:]}") from None


def _wait_rows(names: list[str], tok: str, want: list[str], timeout: float) -> None:
    seen: dict[str, Any] = {}

    def replicated() -> bool:
        seen.update({name: _rows(name, tok) for name in names})
        return all(seen[name] == want for name in names)

    try:
        wait_until(replicated, timeout, 0.1, what=f"{want} on {names} (level=none)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nseen: {seen}") from None


def test_documented_scenario(docker: Docker, image: str, timings: Timings, documented_names: None) -> None:
    _, took = docker.timed("network", "create", "--driver", "bridge", NETWORK)
    timings.record(TEST, "docker network create", took)
    _, took = docker.timed("build", "-t", "backend-tn:latest", ".", cwd=ROOT, timeout=900)
    timings.record(TEST, "docker build -t backend-tn:latest . (layers cached by the session build)", took)

    started = time.monotonic()
    for n in (1, 2, 3):
        _, took = docker.timed(
            "run", "-d", "--name", f"backend-{n}", "--network", NETWORK, "--network-alias", "backend-service",
            "-p", f"300{n}:3000", "--env", "SERVICE_NAME=backend-service", "--env", "JWT_SECRET=secret_key",
            "--env", "PORT=3000", "backend-tn:latest",
        )  # fmt: skip
        timings.record(TEST, f"docker run backend-{n}", took)
    follower = LogFollower(docker, "backend-1")

    # All three agree: leader = highest ID, total_nodes 3, and every ID is the documented one.
    views = _wait_agree(NAMES, timeout=30)
    timings.record(TEST, "first docker run -> all three agree", time.monotonic() - started)
    ips = {name: docker.ip(name, NETWORK) for name in NAMES}
    ids = {name: node_id(ip) for name, ip in ips.items()}
    for name, view in views.items():
        assert view["current_node_id"] == ids[name]
        assert view["total_nodes"] == 3
        assert view["leader_id"] == max(ids.values()) == ids["backend-3"]
        assert view["leader_address"] == f"http://{ips['backend-3']}:3000"
        assert view["current_role"] == ("leader" if name == "backend-3" else "follower")
        assert {n["address"] for n in view["nodes"]} == {f"http://{ip}:3000" for ip in ips.values()}
        assert [n["id"] for n in view["nodes"]] == sorted(ids.values())
        assert all(n["healthy"] for n in view["nodes"])
        assert [n["is_leader"] for n in view["nodes"]].count(True) == 1

    # docker logs backend-1 ; docker logs --tail 50 backend-1: JSON lines, jq-parsable.
    lines = docker.logs("backend-1")
    events = [line["event"] for line in lines]
    for expected in ("node_starting", "http_listening", "node_started", "peer_discovered", "leader_elected"):
        assert expected in events
    # The image installs uvloop, and the node runs on it.
    assert [line["event_loop"] for line in lines if line["event"] == "node_starting"] == ["uvloop"]
    discovered = {line["peer_id"] for line in lines if line["event"] == "peer_discovered"}
    assert discovered == {ids["backend-2"], ids["backend-3"]}
    assert all(line["node_id"] == ids["backend-1"] for line in lines)
    elected = [line for line in lines if line["event"] == "leader_elected"]
    assert elected[-1]["leader_id"] == ids["backend-3"]
    tail = docker.logs("backend-1", "--tail", "50")
    assert 0 < len(tail) <= 50 and tail[-1] == lines[-1]
    if shutil.which("jq"):  # literally jq-parsable, as the README pipes it
        raw = docker("logs", "backend-1").stdout
        parsed = run(["jq", "-c", ".event"], input_text=raw).stdout.split()
        assert parsed[: len(events)] == [f'"{e}"' for e in events]  # lines may have been added since

    # One database: a row written through backend-1 is read back through backend-2 and backend-3, first as
    # they serve any client (forwarded to the leader), then from each one's own copy once it has replicated.
    tok = auth.mint_jwt("secret_key", auth.Role.WRITE, now=time.time(), ttl_s=3600)
    created: list[Any] = []

    def create() -> bool:
        created.append(
            call(PORTS["backend-1"], "/db/execute", ["CREATE TABLE IF NOT EXISTS docs (v TEXT)"], tok)
        )
        return created[-1][0] == 200

    try:
        wait_until(
            create, 45, 0.2, what="the replicated cluster to accept its first write (after FORMATION_WINDOW)"
        )
    except AssertionError as exc:
        replication = {
            name: {k: (view or {}).get(k) for k in ("replication", "epoch", "writable", "leader_identity")}
            for name, view in _views(NAMES).items()
        }
        raise AssertionError(f"{exc}\nlast answer: {created[-1][::2]}\nreplication: {replication}") from None
    _write_through("backend-1", tok, "first", timeout=10)
    timings.record(
        TEST, "first docker run -> a write through backend-1 acknowledged", time.monotonic() - started
    )
    # A weak read through each node is forwarded to the leader. A follower that has not yet heard the new
    # leader's first heartbeat answers 503 (retry) for that moment, as a client would see: retry until 200.
    for name in ("backend-2", "backend-3"):
        answers: list[Any] = []

        def forwarded(name: str = name, answers: list[Any] = answers) -> bool:
            answers.append(call(PORTS[name], "/db/query?q=SELECT+v+FROM+docs", tok=tok))
            status, _, body = answers[-1]
            return status == 200 and body["results"][0].get("values") == [["first"]]

        try:
            wait_until(forwarded, 10, 0.1, what=f"a weak read through {name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast answer: {answers[-1][::2]}") from None
        assert all(a[0] in (200, 503) for a in answers), answers  # never an error but 'retry'

    _wait_rows(NAMES, tok, ["first"], timeout=10)

    # docker stop backend-3 (verbatim; the 2 s bound is checked with `stop -t 2` elsewhere): exits 0; the others elect the next-highest ID well within a round.
    stop_started = time.monotonic()
    _, took = docker.timed("stop", "backend-3")
    timings.record(TEST, "docker stop backend-3 (leader)", took)
    assert docker.exit_code("backend-3") == 0
    views = _wait_agree(["backend-1", "backend-2"], timeout=ROUND_S)
    timings.record(
        TEST, "docker stop backend-3 -> backend-1,2 agree on backend-2", time.monotonic() - stop_started
    )
    assert {view["leader_id"] for view in views.values()} == {ids["backend-2"]}
    stopped_events = [line["event"] for line in docker.logs("backend-3")]
    # In this order, node_stopped last (replication may log its own stop between them).
    shutdown = iter(stopped_events[stopped_events.index("shutting_down") :])
    assert (
        all(e in shutdown for e in ("goodbye_sent", "node_stopped")) and stopped_events[-1] == "node_stopped"
    )
    removed = wait_until(
        lambda: [ln for ln in docker.logs("backend-1") if ln["event"] == "peer_removed"],
        5,
        what="peer_removed",
    )
    assert removed[-1]["peer_id"] == ids["backend-3"]
    # Two of three voters are a majority: writes go on without backend-3.
    _write_through("backend-1", tok, "second", timeout=20)
    _wait_rows(["backend-1", "backend-2"], tok, ["first", "second"], timeout=10)

    # docker start backend-3: rejoins by itself and, being highest, leads again.
    start_started = time.monotonic()
    docker("start", "backend-3")
    ips["backend-3"] = docker.ip("backend-3", NETWORK)
    views = _wait_agree(NAMES, timeout=ROUND_S + 5)
    timings.record(TEST, "docker start backend-3 -> all three agree on it", time.monotonic() - start_started)
    new_id = node_id(ips["backend-3"])
    assert {view["leader_id"] for view in views.values()} == {new_id} and new_id == max(
        view["current_node_id"] for view in views.values()
    )
    # Its data survived the restart, it caught up with what it missed, and writes resume through any node.
    _wait_rows(["backend-3"], tok, ["first", "second"], timeout=20)
    _write_through("backend-2", tok, "third", timeout=20)
    _wait_rows(NAMES, tok, ["first", "second", "third"], timeout=10)
    timings.record(
        TEST,
        "docker start backend-3 -> a write through backend-2 on all three",
        time.monotonic() - start_started,
    )

    # docker stop backend-1 backend-2 backend-3 ; docker rm ... ; docker network rm talentnet
    _, took = docker.timed("stop", *NAMES)
    timings.record(TEST, "docker stop backend-1 backend-2 backend-3", took)
    assert [docker.exit_code(name) for name in NAMES] == [0, 0, 0]
    followed = follower.finish()
    followed_events = [line["event"] for line in followed]
    assert "peer_removed" in followed_events and followed_events[-1] == "node_stopped"
    # backend-1 saw the leadership go to backend-2 and come back to backend-3 (docker logs -f, as it happened).
    leaders = iter([ln["leader_id"] for ln in followed if ln["event"] == "leader_elected"])
    assert all(
        expected in leaders for expected in (ids["backend-3"], ids["backend-2"], new_id)
    )  # in this order
    volumes = [docker.inspect(name, "{{range .Mounts}}{{.Name}} {{end}}").split() for name in NAMES]
    docker("rm", *NAMES)
    docker("network", "rm", NETWORK)
    docker("volume", "rm", *(v for names in volumes for v in names), check=False)
    assert not docker.exists("network", NETWORK)
