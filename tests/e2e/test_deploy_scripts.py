"""deploy/up and deploy/down: the Quick start's one-command cluster, with its own names and ports here."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

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
    }
    try:
        yield env
    finally:
        run([str(ROOT / "deploy" / "down"), "-n", "4"], env=env, check=False, timeout=120)
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

    # -n 2 scales down: the third node is stopped (goodbye) and removed, the other two are redeployed.
    result = run([up, "--no-build", "-n", "2", "--wait", "30"], env=settings, timeout=120)
    assert "2 nodes agree" in result.stdout
    assert not docker.exists("container", f"{settings['NAME_PREFIX']}3")

    result = run([str(ROOT / "deploy" / "down")], env=settings, timeout=120)
    assert not docker("ps", "-aq", "--filter", f"name=^{settings['NAME_PREFIX']}").stdout.strip()
    assert not docker.exists("network", settings["NETWORK"])
