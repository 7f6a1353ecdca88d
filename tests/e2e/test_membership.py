"""Membership changes: scaling 3 -> 5 -> 3, and a node removed and re-created (possibly on a new IP)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.e2e.support import ROUND_S, STOP_WITHIN, Cluster, Timings, node_id

pytestmark = pytest.mark.e2e

# A short NODE_TIMEOUT for the re-create test, so the dead entry goes within seconds instead of 30 s.
SHORT_NODE_TIMEOUT_S = 5.0


def test_scale_3_to_5_to_3(make_cluster: Callable[..., Cluster], timings: Timings) -> None:
    test = "scale 3-5-3"
    cluster = make_cluster()
    names = [cluster.run(n) for n in (1, 2, 3)]
    cluster.wait_agree(names, timeout=30)

    started = time.monotonic()
    names += [cluster.run(n) for n in (4, 5)]
    views = cluster.wait_agree(names, timeout=ROUND_S)
    timings.record(test, "docker run 2 more -> 5 nodes agree", time.monotonic() - started)
    ids = {name: node_id(cluster.ip(name)) for name in names}
    assert {view["leader_id"] for view in views.values()} == {max(ids.values())}
    assert sorted(view["current_node_id"] for view in views.values()) == sorted(ids.values())

    # docker stop of any node takes < 2 s: stop the two newest one by one (the leader first).
    for name in sorted(names[3:], key=ids.__getitem__, reverse=True):
        _, took = cluster.docker.timed("stop", *STOP_WITHIN, name)
        timings.record(test, f"docker stop node {ids[name]}", took)
        assert cluster.docker.exit_code(name) == 0  # not 137: it exited by itself within 2 s
    started = time.monotonic()
    views = cluster.wait_agree(names[:3], timeout=ROUND_S)
    timings.record(
        test, "after the stops -> 3 nodes agree (goodbye: removed at once)", time.monotonic() - started
    )
    assert {view["leader_id"] for view in views.values()} == {max(ids[name] for name in names[:3])}


def test_removed_and_recreated_node(make_cluster: Callable[..., Cluster], timings: Timings) -> None:
    test = "re-create"
    cluster = make_cluster(env={"NODE_TIMEOUT": f"{SHORT_NODE_TIMEOUT_S:g}"})
    names = [cluster.run(n) for n in (1, 2, 3)]
    cluster.wait_agree(names, timeout=30)
    victim = names[0]
    old_ip = cluster.ip(victim)
    # The engine hands out the lowest free address, so a container started right after the removal takes the
    # victim's old one: the re-created node then gets a new IP and ID, and the old entry is dead for good.
    cluster.docker("rm", "-f", "-v", victim)  # SIGKILL and gone: no goodbye
    holder = f"{cluster.prefix}-ipholder"
    cluster.docker(
        "run",
        "-d",
        "--name",
        holder,
        "--network",
        cluster.network,
        "--entrypoint",
        "sleep",
        cluster.image,
        "300",
    )
    timings.record(
        test, "old IP / holder's IP", f"{old_ip} / {cluster.docker.ip(holder, cluster.network)}", unit=""
    )
    started = time.monotonic()
    cluster.run(1)
    new_ip = cluster.ip(victim)
    assert new_ip != old_ip, "the re-created node should have a new address"
    old_url = f"http://{old_ip}:3000"
    # First the new node is seen healthy by all (the old entry may still be listed, unhealthy) ...
    cluster.wait_agree(names, timeout=ROUND_S, listed=-1)
    timings.record(
        test, "docker run re-created node (new IP) -> 3 healthy nodes agree", time.monotonic() - started
    )
    # ... then the dead entry goes after NODE_TIMEOUT and the views are exactly the three live nodes.
    views = cluster.wait_agree(names, timeout=SHORT_NODE_TIMEOUT_S + ROUND_S)
    timings.record(
        test,
        f"-> dead entry removed everywhere (NODE_TIMEOUT={SHORT_NODE_TIMEOUT_S:g} s)",
        time.monotonic() - started,
    )
    for view in views.values():
        assert old_url not in {n["address"] for n in view["nodes"]}
    survivors_logs = [cluster.docker.logs(name) for name in names[1:]]
    for lines in survivors_logs:
        removed = [ln for ln in lines if ln["event"] == "peer_removed" and ln["peer_id"] == node_id(old_ip)]
        assert removed, "the dead entry's removal is logged"
