"""The image itself: what it declares, its health check, and how PID 1 stops."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.e2e.support import ROOT, STOP_WITHIN, Cluster, Docker, Timings, wait_until

pytestmark = pytest.mark.e2e

NODE_COMMAND = ["/opt/venv/bin/python", "/opt/talentnest/entrypoint.py"]
ENTRYPOINT = ["/usr/bin/tini", "-e", "143", "--", *NODE_COMMAND]


def test_image_metadata(docker: Docker, image: str, timings: Timings) -> None:
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    assert config["User"] in ("10001:10001", "10001")
    assert "/data" in config["Volumes"]
    assert "3000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ENTRYPOINT  # exec form: tini is PID 1, the node its child
    assert "DATA_DIR=/data" in config["Env"]
    assert config["Healthcheck"]["Test"] == ["CMD", "/opt/venv/bin/python", "-m", "node.healthcheck"]
    labels = config["Labels"]
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    base = labels["org.opencontainers.image.base.name"]
    base_size = int(docker("image", "inspect", "-f", "{{.Size}}", base).stdout)
    timings.record("image", f"size over the base ({base})", f"{(size - base_size) / 1e6:.1f} MB")
    # The runtime stage adds the virtual environment without pip, and runs as 10001:10001.
    shell = "id -u; id -g; ls /opt/venv/bin; command -v curl || echo no-curl"
    out = docker("run", "--rm", "--entrypoint", "sh", image, "-c", shell).stdout.split()
    assert out[:2] == ["10001", "10001"]
    assert "talentnest-node" in out and "pip" not in out and "no-curl" in out


def test_missing_secret_is_a_startup_error(docker: Docker, image: str) -> None:
    result = docker("run", "--rm", image, check=False, timeout=60)
    assert result.returncode == 2
    assert "JWT_SECRET" in result.stderr


def test_healthcheck_and_stop(docker: Docker, make_cluster: Callable[..., Cluster], timings: Timings) -> None:
    cluster = make_cluster()
    name = cluster.run(1)
    cluster.wait_agree([name], timeout=30)
    # The HEALTHCHECK runs node.healthcheck inside the container (slim images have no curl).
    probe = docker("exec", name, "python", "-m", "node.healthcheck", check=False)
    assert probe.returncode == 0 and json.loads(probe.stdout)["status"] == "ok"
    wrong_port = docker("exec", "--env", "PORT=3999", name, "python", "-m", "node.healthcheck", check=False)
    assert wrong_port.returncode == 1 and "3999" in wrong_port.stderr
    started = time.monotonic()
    wait_until(lambda: docker.inspect(name, "{{.State.Health.Status}}") == "healthy", 40, 0.5, what="healthy")
    timings.record(
        "image",
        "docker run -> health status 'healthy' (first check after the 10 s interval)",
        time.monotonic() - started,
    )
    # tini is PID 1 and forwards SIGTERM to the node, its only child: docker stop returns at once and the
    # exit status is 0, not 137.
    assert docker("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")[:1] == ["/usr/bin/tini"]
    children = docker("exec", name, "cat", "/proc/1/task/1/children").stdout.split()
    assert len(children) == 1
    child = docker("exec", name, "cat", f"/proc/{children[0]}/cmdline").stdout.split("\0")
    assert child[:2] == NODE_COMMAND
    _, took = docker.timed("stop", *STOP_WITHIN, name)
    timings.record("image", "docker stop (single node)", took)
    assert docker.exit_code(name) == 0  # not 137: it exited by itself within 2 s
    assert docker.inspect(name, "{{.State.OOMKilled}}") == "false"
    lines = docker.logs(name)
    events = [line["event"] for line in lines]
    # In this order, node_stopped last (replication logs its own stop between them).
    shutdown = iter(events[events.index("shutting_down") :])
    assert all(e in shutdown for e in ("goodbye_sent", "node_stopped")) and events[-1] == "node_stopped"
    goodbye = [line for line in lines if line["event"] == "goodbye_sent"]
    assert goodbye[-1]["peers"] == 0  # alone: nobody to say goodbye to


def test_stop_right_after_start(
    docker: Docker, make_cluster: Callable[..., Cluster], timings: Timings
) -> None:
    """A stop that arrives before the node has installed its own SIGTERM handler still ends it at once, with
    status 0. The kernel ignores signals to PID 1 that have no handler, and the interpreter takes up to
    hundreds of milliseconds before Python code can install one: with the node as PID 1 a stop right after
    the run was lost (2 s, then SIGKILL, 137). tini as PID 1 forwards it from the first instant."""
    cluster = make_cluster()
    worst = 0.0
    for n in (1, 2, 3):
        name = cluster.run(n)
        _, took = docker.timed("stop", *STOP_WITHIN, name)
        worst = max(worst, took)
        assert docker.exit_code(name) == 0  # not 137: it exited by itself within 2 s
    timings.record("image", "docker stop right after docker run (worst of 3)", worst)


def test_builds_with_buildkit_too(docker: Docker, image: str, timings: Timings) -> None:
    """The session builds with the engine's default builder (the classic one on Docker 20.10); BuildKit must
    give the same image. Both read the Dockerfile symlink."""
    tag = f"{image}-buildkit"
    started = time.monotonic()
    docker("build", "-q", "-t", tag, str(ROOT), env={"DOCKER_BUILDKIT": "1"}, timeout=900)
    timings.record("image", "DOCKER_BUILDKIT=1 docker build", time.monotonic() - started)
    try:
        template = "{{json .Config.Entrypoint}} {{.Config.User}} {{json .Config.Volumes}}"
        assert (
            docker("image", "inspect", "-f", template, tag).stdout
            == docker("image", "inspect", "-f", template, image).stdout
        )
        assert docker("run", "--rm", tag, "--version").stdout.strip()
    finally:
        docker("rmi", tag, check=False)
