"""Planned handover with real node processes (REPLICATION=on), under a steady write load through every node.

What is asserted is what does not depend on speed: the leader's SIGTERM hands the lead to the next-highest
node by handover (the successor's logs show a TakeOver and a handover campaign, no campaign after a lease
ran out), the process exits with status 0 within the 2 s shutdown contract, no acknowledged write is lost;
the stopped node, back on the same DATA_DIR, takes the lead again by handover and loses nothing either.
Waits are bounded liveness deadlines, never speed assertions (figures: bench/handover.py).
"""

from __future__ import annotations

from typing import Any

from tests.integration.test_replication import ENV, base, call, form, local_values, token, writable_node
from tests.support.cluster import Cluster, NodeProcess
from tests.support.wait import wait_until
from tests.support.writeload import WriteLoad

SHUTDOWN_CONTRACT_S = 2.0  # documented: a node exits within 2 s of SIGTERM (docker stop allows 10)


def identity(node: NodeProcess) -> str:
    status = node.status()
    assert status is not None and status.get("identity"), node.tail()
    return status["identity"]


def leadership_events(node: NodeProcess) -> list[dict[str, Any]]:
    wanted = {"replication_campaign_started", "replication_became_leader", "replication_takeover_requested"}
    return [e for e in node.events(all_runs=False) if e.get("event") in wanted]


def took_lead_by_handover(node: NodeProcess, old_leader: str) -> bool:
    """Its last leadership came from a campaign that a TakeOver of ``old_leader`` started."""
    events = leadership_events(node)
    became = [i for i, e in enumerate(events) if e["event"] == "replication_became_leader"]
    if not became:
        return False
    before = events[: became[-1]]
    campaigns = [e for e in before if e["event"] == "replication_campaign_started"]
    takeovers = [e for e in before if e["event"] == "replication_takeover_requested"]
    return (
        bool(campaigns)
        and campaigns[-1].get("handover") is True
        and campaigns[-1]["epoch"] == events[became[-1]]["epoch"]
        and bool(takeovers)
        and takeovers[-1].get("by") == old_leader
    )


def assert_all_acknowledged_on(c: Cluster, ips: list[str], tok: str, acked: set[int]) -> None:
    for ip in ips:
        wait_until(
            lambda ip=ip: (local_values(c, ip, tok) or set()) >= acked,
            15,
            what=f"every acknowledged write on {ip}",
            describe=lambda ip=ip: sorted(acked - (local_values(c, ip, tok) or set()))[:20],
        )


def executed_by(load: WriteLoad, node: NodeProcess, after_value: int) -> int:
    acks, _ = load.snapshot()
    return sum(1 for a in acks if a.node_id == node.node_id and a.value > after_value)


def test_sigterm_of_the_leader_hands_over_under_load_and_the_returning_node_takes_the_lead_back(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    lowest, middle, highest = c.ips
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, lowest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    old_leader, successor = identity(c.nodes[highest]), identity(c.nodes[middle])

    load = WriteLoad(lambda: [base(c, ip) for ip in c.running_ips()], tok, threads=2).start()
    try:
        wait_until(lambda: len(load.snapshot()[0]) >= 30, 20, what="writes before the stop")
        # 1. SIGTERM of the leader: it hands over, then exits in time with status 0.
        code, took_s = c.nodes[highest].stop(timeout_s=10)
        c.publish_dns()
        assert code == 0, c.nodes[highest].tail()
        assert took_s < SHUTDOWN_CONTRACT_S
        stopped = c.nodes[highest].events("replication_stopped", all_runs=False)
        assert stopped and stopped[-1]["led"] is True and stopped[-1]["handed_over"] is True, stopped
        high_water = max(load.acked_values(), default=0)
        wait_until(
            lambda: executed_by(load, c.nodes[middle], high_water) >= 20,
            20,
            what="writes executed by the successor",
            describe=c.describe,
        )
        wait_until(
            lambda: took_lead_by_handover(c.nodes[middle], old_leader),
            3,
            what="the successor's log to show it took the lead by handover",
            describe=lambda: leadership_events(c.nodes[middle]),
        )
        assert_all_acknowledged_on(c, [lowest, middle], tok, load.acked_values())

        # 2. The stopped node returns on the same DATA_DIR, behind by the writes since, and takes the lead
        #    back by handover from the successor.
        c.start(highest)
        high_water = max(load.acked_values(), default=0)
        wait_until(
            lambda: executed_by(load, c.nodes[highest], high_water) >= 20,
            30,
            what="writes executed by the returned highest node",
            describe=c.describe,
        )
        wait_until(
            lambda: took_lead_by_handover(c.nodes[highest], successor),
            3,
            what="the returned node's log to show it took the lead by handover",
            describe=lambda: leadership_events(c.nodes[highest]),
        )
    finally:
        load.stop()
    assert_all_acknowledged_on(c, c.ips, tok, load.acked_values())
    assert c.all_log_problems() == []
