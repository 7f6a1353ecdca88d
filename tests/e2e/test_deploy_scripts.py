"""deploy/up and deploy/down: the Quick start's one-command cluster, with its own names and ports here."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Iterator

import pytest

from node import auth
from tests.e2e.support import ROOT, Docker, Timings, free_port, run, unique_prefix, wait_agree_ports

pytestmark = pytest.mark.e2e


@pytest.fixture
def settings(docker: Docker, image: str) -> Iterator[dict[str, str]]:
    prefix = unique_prefix()
    base = free_port(3)
    env = {
        "DOCKER": docker.binary,
        "IMAGE": image,
        "NETWORK": f"{prefix}-net",
        "NAME_PREFIX": f"{prefix}-",
        "BASE_PORT": str(base),
        "JWT_SECRET": secrets.token_hex(32),
    }
    try:
        yield env
    finally:
        run([str(ROOT / "deploy" / "down"), "-n", "4", "--volumes"], env=env, check=False, timeout=120)
        leftovers = docker("ps", "-aq", "--filter", f"name=^{prefix}-").stdout.split()
        if leftovers:
            docker("rm", "-f", "-v", *leftovers, check=False)
        if docker.exists("network", env["NETWORK"]):
            docker("network", "rm", env["NETWORK"], check=False)


def test_up_scale_down(docker: Docker, settings: dict[str, str], timings: Timings) -> None:
    up = str(ROOT / "deploy" / "up")
    base = int(settings["BASE_PORT"])
    started = time.monotonic()
    result = run([up, "--no-build", "-n", "3", "--wait", "30"], env=settings, timeout=120)
    timings.record(
        "deploy scripts", "deploy/up --no-build (3 nodes, until they agree)", time.monotonic() - started
    )
    table = result.stdout.splitlines()
    assert table[0].split()[:4] == ["NODE", "PORT", "ID", "ROLE"]
    assert [line.split()[0] for line in table[1:4]] == [f"{settings['NAME_PREFIX']}{n}" for n in (1, 2, 3)]
    assert "3 nodes agree" in result.stdout
    wait_agree_ports({str(n): base + n - 1 for n in (1, 2, 3)}, timeout=5)

    # A row written through node 1 lives on node 1's named volume.
    first = f"{settings['NAME_PREFIX']}1"
    assert docker.exists("volume", f"{first}-data")
    assert _sql(settings, "/db/execute", ["CREATE TABLE kept(v TEXT)", "INSERT INTO kept VALUES('still here')"])

    # -n 2 scales down: the third node is stopped (goodbye) and removed, the other two are redeployed one at a
    # time (a rolling redeploy), each on its own volume again: node 1 still has its row.
    result = run([up, "--no-build", "-n", "2", "--wait", "30"], env=settings, timeout=120)
    assert "2 nodes agree" in result.stdout
    assert "before replacing the next" in result.stderr
    assert not docker.exists("container", f"{settings['NAME_PREFIX']}3")
    rows = _sql(settings, "/db/query", ["SELECT v FROM kept"])
    assert rows["results"][0]["values"] == [["still here"]]

    # deploy/down keeps the volumes; --volumes removes them.
    result = run([str(ROOT / "deploy" / "down")], env=settings, timeout=120)
    assert not docker("ps", "-aq", "--filter", f"name=^{settings['NAME_PREFIX']}").stdout.strip()
    assert not docker.exists("network", settings["NETWORK"])
    assert docker.exists("volume", f"{first}-data")
    run([str(ROOT / "deploy" / "down"), "-n", "3", "--volumes"], env=settings, timeout=120)
    assert not docker.exists("volume", f"{first}-data")


def _sql(settings: dict[str, str], path: str, statements: list[str]) -> dict:
    """POST statements to the first node's data API with a token signed by the cluster's secret."""
    token = auth.mint_jwt(settings["JWT_SECRET"], auth.Role.WRITE, now=time.time(), ttl_s=60)
    request = urllib.request.Request(
        f"http://127.0.0.1:{settings['BASE_PORT']}{path}",
        data=json.dumps(statements).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    assert all("error" not in result for result in body["results"]), body
    return body
