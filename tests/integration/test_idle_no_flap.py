"""Three idle nodes must not suspect each other: zero peer_unhealthy over a bounded window.

The contract is zero false suspicions over 10 minutes (``bench/failover.py --idle-minutes 10`` checks that);
this is the CI-sized version and the suite's only long test (~45 s).
"""

from __future__ import annotations

import time

import pytest

from tests.support.cluster import Cluster

pytestmark = pytest.mark.integration

IDLE_S = 45.0


@pytest.mark.timeout(IDLE_S + 60)
def test_idle_cluster_has_no_false_suspicions(make_cluster):
    c: Cluster = make_cluster(env={"DISCOVERY_INTERVAL": "2"})  # several DNS rounds in the window too
    c.start_all()
    elected_before = {ip: len(c.nodes[ip].events("leader_elected")) for ip in c.ips}

    # Observe for IDLE_S, checking once a second that the cluster still agrees (bounded in count and time).
    start = time.monotonic()
    checks = 0
    disagreements = []
    for _ in range(int(IDLE_S) + 5):
        elapsed = time.monotonic() - start
        if elapsed >= IDLE_S:
            break
        statuses = c.statuses(c.ips, timeout_s=1.0)
        checks += 1
        if not Cluster.agreement(statuses, c.ips, exact=True):
            disagreements.append((round(elapsed, 1), c.describe(statuses)))
        time.sleep(min(1.0, max(0.0, IDLE_S - (time.monotonic() - start))))
    observed = time.monotonic() - start

    suspicions = [e for ip in c.ips for e in c.nodes[ip].events("peer_unhealthy")]
    elections = {ip: len(c.nodes[ip].events("leader_elected")) - elected_before[ip] for ip in c.ips}
    print(
        f"idle {observed:.0f} s, {checks} status checks: {len(suspicions)} peer_unhealthy, "
        f"{sum(elections.values())} leader changes, {len(disagreements)} disagreements"
    )
    assert observed >= IDLE_S - 1
    assert suspicions == []
    assert all(n == 0 for n in elections.values()), elections
    assert disagreements == []
    assert all(node.running for node in c.nodes.values())
