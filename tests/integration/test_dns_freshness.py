"""Every discovery round must see the DNS server's current answer, and a failed or empty one keeps the view.

The test DNS server answers with TTL 600, as Docker's embedded DNS does: a resolver that honoured the TTL
(c-ares caches by default) would keep answering with the first answer for ten minutes and fail these tests.
"""

from __future__ import annotations

import time

import pytest

from node.runtime.resolver import AiodnsResolver, LookupFailed
from tests.support.cluster import Cluster, node_id, parse_timestamp
from tests.support.dns import ANSWER, SERVFAIL, SILENT, TestDnsServer
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

NAME = "backend-service.test"


async def test_resolver_sees_every_change_between_two_lookups():
    with TestDnsServer() as dns:
        assert dns.ttl == 600
        resolver = AiodnsResolver([dns.address], timeout_s=1.0)  # one resolver, as the node keeps one

        dns.set(NAME, ["10.0.2.1"])
        assert await resolver.resolve_ipv4(NAME) == ["10.0.2.1"]

        dns.set(NAME, ["10.0.2.1", "10.0.2.2", "10.0.2.3"])  # added
        assert await resolver.resolve_ipv4(NAME) == ["10.0.2.1", "10.0.2.2", "10.0.2.3"]

        dns.set(NAME, ["10.0.2.1", "10.0.2.3"])  # removed
        assert await resolver.resolve_ipv4(NAME) == ["10.0.2.1", "10.0.2.3"]

        dns.set(NAME, None)  # NXDOMAIN: an empty answer, not a failure
        assert await resolver.resolve_ipv4(NAME) == []

        dns.set(NAME, ["10.0.2.4"])  # back, and different
        assert await resolver.resolve_ipv4(NAME) == ["10.0.2.4"]

        assert dns.query_count() >= 5, "every lookup must reach the server"


@pytest.mark.parametrize("mode", [SERVFAIL, SILENT])
async def test_resolver_reports_a_failed_lookup_as_lookup_failed(mode):
    with TestDnsServer() as dns:
        dns.set(NAME, ["10.0.2.1"])
        dns.set_mode(mode)
        resolver = AiodnsResolver([dns.address], timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(LookupFailed):
            await resolver.resolve_ipv4(NAME)
        print(f"{mode}: LookupFailed after {(time.monotonic() - t0) * 1000:.0f} ms")
        dns.set_mode(ANSWER)
        assert await resolver.resolve_ipv4(NAME) == ["10.0.2.1"]


def test_node_sees_a_newly_added_name_within_a_couple_of_rounds(make_cluster):
    c: Cluster = make_cluster(size=1, env={"DISCOVERY_INTERVAL": "1"})
    a = c.ips[0]
    c.start(a)
    wait_until(lambda: c.nodes[a].events("node_started"), 10, what=f"{a} to start", describe=c.describe)
    # A second node under another name: it never resolves A and never says hello to it, so only A's own DNS
    # rounds can make A find it.
    b_ip = c.spare_ip()
    other = f"other-{c.service}"
    b = c.add_node(b_ip, SERVICE_NAME=other, DISCOVERY_INTERVAL="10")
    c.dns.set(other, [b_ip])
    b.start()
    wait_until(lambda: b.status() is not None, 10, what=f"{b_ip} to serve", describe=c.describe)
    # A has answered rounds naming only itself (TTL 600) by now.
    wait_until(lambda: c.dns.query_count() >= 2, 5, what="lookups to reach the DNS server")

    added_at = time.time()
    c.publish_dns([a, b_ip])

    def a_sees_b():
        st = c.nodes[a].status()
        return st is not None and any(n["id"] == node_id(b_ip) and n["healthy"] for n in st["nodes"])

    wait_until(a_sees_b, 4.0, 0.02, what=f"{a} to list {b_ip} after the DNS change", describe=c.describe)
    took = time.time() - added_at
    print(f"DISCOVERY_INTERVAL=1: the new name was in the view {took * 1000:.0f} ms after the DNS change")
    found = c.nodes[a].wait_events("peer_discovered", lambda e: e.get("peer_id") == node_id(b_ip))
    assert [e["via"] for e in found] == ["dns"]
    assert parse_timestamp(found[0]["timestamp"]) >= added_at - 0.05


def _set_failure(dns: TestDnsServer, service: str, failure: str) -> None:
    if failure == "nxdomain":
        dns.set(service, None)
    elif failure == "empty":
        dns.set(service, [])
    else:
        dns.set_mode(failure)


@pytest.mark.parametrize("failure", ["nxdomain", "empty", SERVFAIL, SILENT])
def test_failed_or_empty_lookup_keeps_the_view(make_cluster, failure):
    c: Cluster = make_cluster(env={"DISCOVERY_INTERVAL": "1", "DNS_TIMEOUT": "0.3"})
    c.start_all()

    _set_failure(c.dns, c.service, failure)
    for ip in c.ips:
        wait_until(
            lambda ip=ip: c.nodes[ip].events("dns_lookup_failed"),
            6,
            what=f"{ip} to log dns_lookup_failed",
            describe=c.describe,
        )
    # Two more rounds of every node on the failing server, then the views must be what they were.
    queries = c.dns.query_count()
    wait_until(lambda: c.dns.query_count() >= queries + 2 * len(c.ips), 10, what="two more failing rounds")
    statuses = c.statuses(c.ips)
    assert Cluster.agreement(statuses, c.ips, exact=True), c.describe(statuses)
    for ip in c.ips:
        assert not c.nodes[ip].events("peer_removed"), c.nodes[ip].tail()
        failed = c.nodes[ip].events("dns_lookup_failed")
        assert failed[0]["level"] == "warning" and failed[0]["consecutive"] == 1

    c.dns.set_mode(ANSWER)
    c.publish_dns()
    for ip in c.ips:
        wait_until(
            lambda ip=ip: c.nodes[ip].events("dns_lookup_recovered"),
            6,
            what=f"{ip} to log dns_lookup_recovered",
            describe=c.describe,
        )
    assert Cluster.agreement(c.statuses(c.ips), c.ips, exact=True)
