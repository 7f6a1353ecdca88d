"""deploy/stack.yaml on a single-node swarm: replicas find each other through tasks.<service>.

The swarm is initialised for the test and left again at the end (unless the engine was already part of
one, which is then left alone). Nodes are asked through `docker exec`, not the routing mesh: the mesh
needs IPVS in the kernel, which some machines (this CI's included) lack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from node import auth
from tests.e2e.support import ROOT, Docker, Timings, agreement, free_port, node_id, unique_prefix, wait_until

pytestmark = pytest.mark.e2e

STACK_FILE = ROOT / "deploy" / "stack.yaml"
STATUS = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:3000/cluster/status', timeout=1).read().decode())"
)

# POST (a JSON body in argv[2]) or GET (argv[2] empty) on the node's own data API, with a token.
SQL = (
    "import sys, urllib.request; "
    "r = urllib.request.Request('http://127.0.0.1:3000' + sys.argv[1], data=sys.argv[2].encode() or None, "
    "headers={'Content-Type': 'application/json', 'Authorization': 'Bearer ' + sys.argv[3]}); "
    "sys.stdout.write(urllib.request.urlopen(r, timeout=5).read().decode())"
)


class Stack:
    def __init__(self, docker: Docker, image: str) -> None:
        self.docker = docker
        self.name = unique_prefix().replace("-", "")
        self.service = f"{self.name}_backend"
        self.volume_prefix = f"{self.name}-data"
        self.env = {"IMAGE": image, "PUBLISHED_PORT": str(free_port()), "DATA_VOLUME": self.volume_prefix}

    def tasks(self) -> list[str]:
        """IDs of this service's running containers."""
        label = f"label=com.docker.swarm.service.name={self.service}"
        return self.docker("ps", "-q", "--filter", label, "--filter", "status=running").stdout.split()

    def status(self, container: str) -> dict[str, Any] | None:
        result = self.docker("exec", container, "python", "-c", STATUS, check=False, timeout=30)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def sql(self, container: str, path: str, body: Any, tok: str) -> dict[str, Any] | None:
        """The node's answer (200 only) to one data API call made inside its container, else None."""
        payload = json.dumps(body) if body is not None else ""
        result = self.docker(
            "exec", container, "python", "-c", SQL, path, payload, tok, check=False, timeout=30
        )
        return json.loads(result.stdout) if result.returncode == 0 else None

    def views(self, expect: int) -> dict[str, Any] | None:
        """The replicas' views if exactly `expect` run and they agree, else None."""
        tasks = self.tasks()
        if len(tasks) != expect:
            return None
        views = {task: self.status(task) for task in tasks}
        return views if agreement(views, expect, listed=-1) is None else None

    def remove(self) -> None:
        self.docker("stack", "rm", self.name, check=False)
        label = f"label=com.docker.stack.namespace={self.name}"
        try:
            wait_until(
                lambda: not self.docker("ps", "-aq", "--filter", label).stdout.strip(),
                60,
                0.5,
                what="tasks gone",
            )
            wait_until(
                lambda: not self.docker("network", "ls", "-q", "--filter", label).stdout.strip(),
                30,
                0.5,
                what="network gone",
            )
        finally:
            volumes = self.docker(
                "volume", "ls", "-q", "--filter", f"name={self.volume_prefix}-"
            ).stdout.split()
            if volumes:
                self.docker("volume", "rm", "-f", *volumes, check=False)


@pytest.fixture
def swarm(docker: Docker) -> Iterator[None]:
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    joined = state != "active"
    # swarm init creates docker_gwbridge and leaving keeps it: remove it too if it was not there before.
    had_gwbridge = docker.exists("network", "docker_gwbridge")
    if joined:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        yield
    finally:
        if joined:
            docker("swarm", "leave", "--force", check=False)
            if not had_gwbridge:
                docker("network", "rm", "docker_gwbridge", check=False)


@pytest.fixture
def stack(docker: Docker, image: str, swarm: None) -> Iterator[Stack]:
    stack = Stack(docker, image)
    try:
        yield stack
    finally:
        stack.remove()


def test_swarm_stack(stack: Stack, docker: Docker, timings: Timings) -> None:
    test = "swarm"
    started = time.monotonic()
    docker("stack", "deploy", "-c", str(STACK_FILE), stack.name, env=stack.env)
    # Replicas start together and tasks.<service> lists a task only once it runs, so the first lookups
    # may come back short: the next discovery round (10 s) completes the view.
    views = wait_until(lambda: stack.views(3), 60, 0.5, what="3 replicas to agree")
    timings.record(test, "docker stack deploy -> 3 replicas agree", time.monotonic() - started)
    for view in views.values():
        assert view["healthy_nodes"] == 3
        ids = {node_id(n["address"].split("//")[1].split(":")[0]) for n in view["nodes"]}
        assert ids == {n["id"] for n in view["nodes"]}
    env = docker(
        "service", "inspect", "-f", "{{json .Spec.TaskTemplate.ContainerSpec.Env}}", stack.service
    ).stdout
    assert "SERVICE_NAME=tasks.{{.Service.Name}}" in json.loads(env)
    task = stack.tasks()[0]
    assert docker("exec", task, "sh", "-c", "echo $SERVICE_NAME").stdout.strip() == f"tasks.{stack.service}"

    # One database (REPLICATION=on by default): a row written through one replica is in every replica's copy.
    tok = auth.mint_jwt("secret_key", auth.Role.WRITE, now=time.time(), ttl_s=3600)
    wait_until(
        lambda: stack.sql(task, "/db/execute", ["CREATE TABLE IF NOT EXISTS s (v TEXT)"], tok),
        30,
        0.5,
        what="the first write through one replica",
    )
    inserted = stack.sql(task, "/db/execute", [["INSERT INTO s VALUES ('one')"]], tok)
    assert inserted is not None and "error" not in inserted["results"][0], inserted

    def everywhere() -> bool:
        for other in stack.tasks():
            body = stack.sql(other, "/db/query?level=none&q=SELECT+v+FROM+s", None, tok)
            if body is None or body["results"][0].get("values") != [["one"]]:
                return False
        return True

    wait_until(everywhere, 20, 0.5, what="the row in every replica's copy (level=none)")

    started = time.monotonic()
    docker("service", "scale", "--detach", f"{stack.service}=4")
    wait_until(lambda: stack.views(4), 40, 0.5, what="4 replicas to agree")
    timings.record(test, "docker service scale =4 -> 4 replicas agree", time.monotonic() - started)
