"""Fixtures for the real-process tests: clusters of node processes behind a test DNS server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.cluster import Cluster


@pytest.fixture
def make_cluster(tmp_path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(size=3, env={...})`` → an entered Cluster; every node and DNS server is stopped after
    the test, whatever happened. Node logs stay in the test's tmp_path."""
    clusters: list[Cluster] = []

    def make(size: int = 3, env: dict[str, str] | None = None, **kwargs) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(clusters)}", size=size, env=env, **kwargs)
        clusters.append(cluster)
        cluster.__enter__()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.close()
