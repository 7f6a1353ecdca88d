"""REPLICATION=on formation with real node processes: one cluster from any start order, no merge of data,
re-formation after every node came back with a new address.

Random start orders and delays (seeded, printed on failure) with DNS listing each node only some time after
its process started, as Swarm and Kubernetes do. FORMATION_TRIALS (default 5) sets how many real-process
trials run; FORMATION_SEED replays one printed seed; the same scenario over the pure rules runs hundreds of times in tests/core/test_formation.py.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.integration.test_replication import ENV, base, call, local_values, token
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

TRIALS = int(os.environ.get("FORMATION_TRIALS", "5"))


def one_cluster(c: Cluster, ips: list[str]) -> dict | None:
    """Every node reports the same leader identity, epoch and cluster name, 3 voters, a writable leader."""
    statuses = [c.nodes[ip].status() for ip in ips]
    if any(not s or "commit_index" not in s for s in statuses):
        return None
    if len({s.get("leader_identity") for s in statuses}) != 1 or statuses[0].get("leader_identity") is None:
        return None
    if len({s["epoch"] for s in statuses}) != 1:
        return None
    if len({s.get("cluster_name") for s in statuses}) != 1 or not statuses[0].get("cluster_name"):
        return None  # one named cluster, the same on every node
    if any(sum(1 for n in s["nodes"] if n.get("voter")) != len(ips) for s in statuses):
        return None
    if not any(s.get("writable") for s in statuses):
        return None
    return {"leader_identity": statuses[0]["leader_identity"], "epoch": statuses[0]["epoch"]}


def start_staggered(c: Cluster, rng: random.Random, max_start_s: float, max_dns_s: float) -> None:
    """Start the nodes in a random order with random delays; DNS lists each one only after its own delay."""
    order = list(c.ips)
    rng.shuffle(order)
    listed_at: dict[str, float] = {}
    t0 = time.monotonic()
    plan = sorted((rng.uniform(0, max_start_s), ip) for ip in order)
    pending = list(plan)
    published: set[str] = set()
    c.publish_dns([])
    for _ in range(10_000):  # bounded: the plan ends within max_start_s + max_dns_s
        now = time.monotonic() - t0
        while pending and pending[0][0] <= now:
            at, ip = pending.pop(0)
            c.nodes[ip].start()
            listed_at[ip] = at + rng.uniform(0, max_dns_s)
        due = {ip for ip, at in listed_at.items() if at <= now}
        if due != published:
            published = due
            c.publish_dns(sorted(due))
        if not pending and len(published) == len(c.ips):
            return
        time.sleep(0.02)  # the schedule's clock tick, not a wait for an outcome
    raise AssertionError("the start schedule did not finish")


@pytest.mark.parametrize("trial", range(TRIALS))
def test_nodes_started_in_any_order_with_staggered_dns_form_exactly_one_cluster(make_cluster, trial):
    seed = int(os.environ.get("FORMATION_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    # Odd trials: a window much shorter than the DNS delays, so groups often bootstrap apart and must merge.
    window, max_dns_s = ("1", 2.5) if trial % 2 == 0 else ("0.2", 3.0)
    c: Cluster = make_cluster(env={**ENV, "FORMATION_WINDOW": window})
    start_staggered(c, rng, max_start_s=1.5, max_dns_s=max_dns_s)
    agreed = wait_until(
        lambda: one_cluster(c, c.ips),
        45,
        interval_s=0.2,
        what=f"one cluster of three (seed {seed})",
        describe=c.describe,
    )
    tok = token(c)
    via = rng.choice(c.ips)

    def write(sql: str) -> bool:
        return call(f"{base(c, via)}/db/execute", [[sql]], tok)[0] == 200

    wait_until(lambda: write("CREATE TABLE IF NOT EXISTS t (v INTEGER)"), 15, what=f"a write via {via}")
    assert write("INSERT INTO t VALUES (1)")
    for ip in c.ips:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == {1}, 10, what=f"the row on {ip} (seed {seed})")
    # Still one cluster afterwards (the same leader identity), and no node ever reported a conflict.
    after = one_cluster(c, c.ips)
    assert after is not None and after["leader_identity"] == agreed["leader_identity"]
    assert not any(c.nodes[ip].events("cluster_conflict") for ip in c.ips)


def test_three_nodes_that_each_bootstrapped_alone_merge_into_one_cluster_led_by_the_highest(make_cluster):
    """The worst case of a late DNS: every node's window ends before it sees anyone, so each bootstraps a
    cluster of one; once DNS lists them all they merge (no data anywhere) into one, led by the highest."""
    c: Cluster = make_cluster(env={**ENV, "FORMATION_WINDOW": "0.2"})
    order = list(c.ips)
    random.shuffle(order)
    c.publish_dns([])
    for ip in order:
        c.nodes[ip].start()
    for ip in c.ips:
        wait_until(lambda ip=ip: c.nodes[ip].events("replication_bootstrapped"), 20, what=f"{ip} alone")
    c.publish_dns(c.ips)
    agreed = wait_until(lambda: one_cluster(c, c.ips), 45, what="one cluster of three", describe=c.describe)
    assert agreed["leader_identity"] == c.nodes[c.ips[-1]].status()["identity"]
    tok = token(c)
    assert call(f"{base(c, c.ips[0])}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    assert call(f"{base(c, c.ips[0])}/db/execute", [["INSERT INTO t VALUES (8)"]], tok)[0] == 200
    for ip in c.ips:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == {8}, 10, what=f"the row on {ip}")


def test_two_clusters_without_data_formed_apart_merge_under_the_highest_id(make_cluster):
    c: Cluster = make_cluster(size=1, env=ENV)
    a = c.ips[0]
    b = c.spare_ip()  # the higher ID
    other = f"other-{c.service}"
    c.add_node(b, SERVICE_NAME=other)
    c.start(a)
    c.nodes[b].start()
    c.dns.set(other, [b])
    for ip in (a, b):
        wait_until(lambda ip=ip: (c.nodes[ip].status() or {}).get("writable"), 20, what=f"{ip} alone")
    c.dns.set(c.service, [a, b])
    c.dns.set(other, [a, b])
    agreed = wait_until(lambda: one_cluster(c, [a, b]), 30, what="one cluster of two", describe=c.describe)
    assert agreed["leader_identity"] == c.nodes[b].status()["identity"]
    assert c.nodes[a].events("replication_dissolving") and not c.nodes[b].events("replication_dissolving")
    tok = token(c)
    assert call(f"{base(c, a)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    assert call(f"{base(c, a)}/db/execute", [["INSERT INTO t VALUES (5)"]], tok)[0] == 200
    wait_until(lambda: local_values(c, b, tok) == {5}, 10, what="the write on b")


def test_two_clusters_with_data_that_come_to_see_each_other_both_refuse_and_report_it(make_cluster):
    c: Cluster = make_cluster(size=1, env=ENV)
    a = c.ips[0]
    b = c.spare_ip()
    other = f"other-{c.service}"
    c.add_node(b, SERVICE_NAME=other)
    c.start(a)
    c.nodes[b].start()
    c.dns.set(other, [b])
    tok = token(c)
    for ip, value in ((a, 1), (b, 2)):

        def wrote(ip=ip, value=value) -> bool:
            return (
                call(f"{base(c, ip)}/db/execute", [["CREATE TABLE IF NOT EXISTS t (v INTEGER)"]], tok)[0]
                == 200
                and call(f"{base(c, ip)}/db/execute", [[f"INSERT INTO t VALUES ({value})"]], tok)[0] == 200
            )

        wait_until(wrote, 20, what=f"a write on {ip} alone")
    # Now each one sees the other.
    c.dns.set(c.service, [a, b])
    c.dns.set(other, [a, b])

    def conflict(ip: str) -> dict | None:
        s = c.nodes[ip].status()
        return s if s and s.get("replication") == "conflict" else None

    sa = wait_until(lambda: conflict(a), 20, what="a to report the conflict", describe=c.describe)
    sb = wait_until(lambda: conflict(b), 20, what="b to report the conflict", describe=c.describe)
    assert sa["conflict"]["other_leader_identity"] == sb["identity"]
    assert sb["conflict"]["other_leader_identity"] == sa["identity"]
    assert c.nodes[a].events("cluster_conflict") and c.nodes[b].events("cluster_conflict")
    # Neither absorbed the other: each keeps its own data, still a cluster of one voter, still writable.
    assert local_values(c, a, tok) == {1}
    assert local_values(c, b, tok) == {2}
    for ip in (a, b):
        s = c.nodes[ip].status()
        assert sum(1 for n in s["nodes"] if n.get("voter")) == 1, s
    assert call(f"{base(c, a)}/db/execute", [["INSERT INTO t VALUES (3)"]], tok)[0] == 200
    assert local_values(c, b, tok) == {2}
    # Logged at most once per interval, not on every check.
    assert len(c.nodes[a].events("cluster_conflict")) <= 2


def test_a_cluster_without_data_merges_into_the_one_with_data(make_cluster):
    c: Cluster = make_cluster(size=1, env=ENV)
    a = c.ips[0]  # the lower ID, with data
    b = c.spare_ip()  # the higher ID, no data: it dissolves even so
    other = f"other-{c.service}"
    c.add_node(b, SERVICE_NAME=other)
    c.start(a)
    c.nodes[b].start()
    c.dns.set(other, [b])
    tok = token(c)
    for ip in (a, b):
        wait_until(lambda ip=ip: (c.nodes[ip].status() or {}).get("writable"), 20, what=f"{ip} alone")
    assert call(f"{base(c, a)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    assert call(f"{base(c, a)}/db/execute", [["INSERT INTO t VALUES (7)"]], tok)[0] == 200
    c.dns.set(c.service, [a, b])
    c.dns.set(other, [a, b])
    wait_until(lambda: local_values(c, b, tok) == {7}, 30, what="b to join a's cluster", describe=c.describe)
    wait_until(lambda: one_cluster(c, [a, b]), 30, what="one cluster of two", describe=c.describe)
    assert c.nodes[b].events("replication_dissolving")
    assert not c.nodes[a].events("replication_dissolving")


def test_every_node_restarted_at_once_on_a_new_address_reforms_with_every_write(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    c.start_all()
    wait_until(lambda: one_cluster(c, c.ips), 30, what="one cluster of three", describe=c.describe)
    tok = token(c)
    old = list(c.ips)
    leader = c.ips[-1]
    assert call(f"{base(c, leader)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    for v in range(5):
        assert call(f"{base(c, old[v % 3])}/db/execute", [[f"INSERT INTO t VALUES ({v})"]], tok)[0] == 200
    for ip in old:
        c.kill9(ip)
    # New addresses, in reverse order of the old IDs, so the old lowest now has the highest ID.
    new = [c.spare_ip(i) for i in range(3)]
    for old_ip, new_ip in zip(reversed(old), new, strict=True):
        c.add_node(new_ip, DATA_DIR=str(c.log_dir / f"data-{old_ip}"))
    for ip in new:
        c.start(ip)
    wait_until(
        lambda: one_cluster(c, new), 45, what="the cluster re-formed on new addresses", describe=c.describe
    )
    for ip in new:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == set(range(5)), 15, what=f"every write on {ip}")
    writable = wait_until(
        lambda: next((ip for ip in new if (c.nodes[ip].status() or {}).get("writable")), None),
        15,
        what="a writable leader",
    )
    assert call(f"{base(c, writable)}/db/execute", [["INSERT INTO t VALUES (99)"]], tok)[0] == 200
    # No node bootstrapped again: every one restored its own history.
    for ip in new:
        assert c.nodes[ip].events("replication_restored")
        assert not c.nodes[ip].events("replication_bootstrapped")
