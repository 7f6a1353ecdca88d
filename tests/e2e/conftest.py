"""End-to-end fixtures: a real Docker engine, the image built once per session, throw-away clusters.

Where no engine answers the tests are skipped with the reason, except under CI=true, where a missing engine
is a failure: CI runs ../shared/docker/setup.sh first, so no engine there means something broke.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.support import ROOT, Cluster, Docker, Timings, docker_binary, run, unique_prefix

_TIMINGS = Timings()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing(what: str) -> None:
    """Skip with the reason, or fail under CI=true."""
    if _in_ci():
        pytest.fail(f"CI=true and {what}; the e2e tests need it (.ci/run sets it up)", pytrace=False)
    pytest.skip(f"{what}: run ../shared/docker/setup.sh or start Docker to run the e2e tests")


def _engine_problem(binary: str | None) -> str | None:
    if binary is None:
        return "no docker client found"
    try:
        result = subprocess.run([binary, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'{binary} info' failed: {exc}"
    if result.returncode != 0:
        return f"no Docker engine answers ('{binary} info': {result.stderr.strip()[:200]})"
    return None


@pytest.fixture(scope="session")
def docker() -> Docker:
    binary = docker_binary()
    problem = _engine_problem(binary)
    if problem:
        _missing(problem)
    assert binary is not None
    return Docker(binary)


@pytest.fixture(autouse=True)
def _needs_engine(docker: Docker) -> None:
    """Every test here needs the engine: skip (or fail under CI) before it starts otherwise."""


@pytest.fixture(scope="session")
def timings() -> Timings:
    return _TIMINGS


@pytest.fixture(scope="session")
def image(docker: Docker, timings: Timings) -> Iterator[str]:
    """The image, built once per session from this checkout under a tag of its own (removed at the end)."""
    tag = f"backend-tn:{unique_prefix()}"
    started = time.monotonic()
    docker("build", "-q", "-t", tag, str(ROOT), timeout=900)
    timings.record("session", "docker build (first build of the session)", time.monotonic() - started)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    timings.record("session", "image size", f"{size / 1e6:.1f} MB")
    try:
        yield tag
    finally:
        docker("rmi", tag, check=False)


@pytest.fixture
def make_cluster(docker: Docker, image: str) -> Iterator[Callable[..., Cluster]]:
    """Factory for throw-away clusters (unique names and network); all removed after the test, pass or fail."""
    clusters: list[Cluster] = []

    def make(**kwargs: object) -> Cluster:
        cluster = Cluster(docker, image, **kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        cluster.create_network()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.destroy()


@pytest.fixture(scope="session")
def compose(docker: Docker) -> str:
    """The docker-compose (1.x) command, or skip/fail like a missing engine."""
    binary = shutil.which("docker-compose")
    if binary is None:
        _missing("docker-compose is not installed (Debian: apt-get install docker-compose)")
    assert binary is not None
    run([binary, "version"], timeout=60)
    return binary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TIMINGS.rows:
        return
    terminalreporter.section("e2e timings")
    width = max(len(test) for test, _, _ in _TIMINGS.rows)
    for test, what, value in _TIMINGS.rows:
        terminalreporter.write_line(f"{test.ljust(width)}  {what}: {value}")
