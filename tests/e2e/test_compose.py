"""deploy/compose.yaml: the same 3-node cluster with docker-compose (1.29, as Debian ships it)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from node import auth
from tests.e2e.support import (
    ROOT,
    ROUND_S,
    STOP_WITHIN,
    Docker,
    Timings,
    free_port,
    node_id,
    run,
    unique_prefix,
    wait_agree_ports,
    wait_until,
)
from tests.e2e.test_replication import call

pytestmark = pytest.mark.e2e

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
SERVICES = ["backend-1", "backend-2", "backend-3"]


class Compose:
    def __init__(self, binary: str, image: str) -> None:
        self.project = unique_prefix().replace("-", "")  # compose 1.x project names: [a-z0-9]
        self.ports = {service: free_port() for service in SERVICES}
        self.env = {"COMPOSE_PROJECT_NAME": self.project, "IMAGE": image}
        self.env.update({f"TN_PORT_{n}": str(self.ports[f"backend-{n}"]) for n in (1, 2, 3)})
        self.binary = binary

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return run([self.binary, "-f", str(COMPOSE_FILE), *args], check=check, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()


@pytest.fixture
def project(compose: str, docker: Docker, image: str) -> Iterator[Compose]:
    project = Compose(compose, image)
    try:
        yield project
    finally:
        project("down", "-v", "--remove-orphans", check=False)


def test_compose_cluster(project: Compose, docker: Docker, timings: Timings) -> None:
    test = "compose"
    started = time.monotonic()
    project("up", "-d")  # the session's image: IMAGE is set, so compose uses it instead of building
    views = wait_agree_ports(project.ports, timeout=30)
    timings.record(test, "docker-compose up -d -> 3 nodes agree", time.monotonic() - started)
    containers = {service: project.container(service) for service in SERVICES}
    network = f"{project.project}_talentnet"
    ids = {service: node_id(docker.ip(containers[service], network)) for service in SERVICES}
    assert {view["leader_id"] for view in views.values()} == {max(ids.values())}
    leader = max(SERVICES, key=ids.__getitem__)
    others = {service: port for service, port in project.ports.items() if service != leader}

    # One database (REPLICATION=on by default): a row written through backend-1 reaches every node's copy.
    tok = auth.mint_jwt("secret_key", auth.Role.WRITE, now=time.time(), ttl_s=3600)
    port_1 = project.ports["backend-1"]
    wait_until(
        lambda: call(port_1, "/db/execute", ["CREATE TABLE IF NOT EXISTS c (v TEXT)"], tok)[0] == 200,
        30,
        0.2,
        what="the first write through backend-1",
    )
    assert call(port_1, "/db/execute", [["INSERT INTO c VALUES ('one')"]], tok)[0] == 200
    query = "/db/query?level=none&q=SELECT+v+FROM+c"

    def everywhere() -> bool:
        answers = [call(port, query, tok=tok) for port in project.ports.values()]
        return all(
            status == 200 and body["results"][0].get("values") == [["one"]] for status, _, body in answers
        )

    wait_until(everywhere, 10, 0.1, what="the row in every node's copy (level=none)")

    started = time.monotonic()
    project("stop", *STOP_WITHIN, leader)
    timings.record(test, f"docker-compose stop {leader} (leader)", time.monotonic() - started)
    assert docker.exit_code(containers[leader]) == 0  # not 137: it exited by itself within 2 s
    views = wait_agree_ports(others, timeout=ROUND_S)
    timings.record(test, "-> the other two agree on the next-highest", time.monotonic() - started)
    assert {view["leader_id"] for view in views.values()} == {max(ids[s] for s in others)}

    started = time.monotonic()
    project("start", leader)
    views = wait_agree_ports(project.ports, timeout=ROUND_S + 5)
    timings.record(
        test, f"docker-compose start {leader} -> all agree on it again", time.monotonic() - started
    )
    new_id = node_id(docker.ip(containers[leader], network))
    assert (
        {view["leader_id"] for view in views.values()}
        == {new_id}
        == {max(v["current_node_id"] for v in views.values())}
    )
    # Each node has its own named volume on /data, writable by the node's user.
    assert (
        docker(
            "exec", containers["backend-1"], "sh", "-c", "touch /data/.w && rm /data/.w && echo ok"
        ).stdout.strip()
        == "ok"
    )
