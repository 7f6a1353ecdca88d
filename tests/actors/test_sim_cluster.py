"""Whole nodes (supervisor, actors, mailboxes) in one process with a fake clock and an in-memory network."""

import asyncio

import pytest

from node.config import Config
from node.core.election import Role
from tests.support.sim import SimCluster

H1, H2, H3 = "10.0.10.1", "10.0.10.2", "10.0.10.3"  # IDs 2561, 2562, 2563 as in the documentation
ALL = [H1, H2, H3]


@pytest.fixture
async def cluster():
    sim = SimCluster()
    yield sim
    await sim.close()


async def start_all(sim: SimCluster) -> None:
    for host in ALL:
        await sim.start(host)
    await sim.advance(0.5)


async def test_three_nodes_agree_on_highest_id(cluster):
    await start_all(cluster)
    assert cluster.leaders(ALL) == {h: 2563 for h in ALL}
    assert cluster.decision(H3).role is Role.LEADER
    assert cluster.decision(H1).role is Role.FOLLOWER
    assert all(len(cluster.decision(h).view.healthy) == 3 for h in ALL)


async def test_a_starting_node_joins_without_waiting_for_a_tick(cluster):
    await cluster.start(H1)
    await cluster.start(H2)
    await cluster.advance(0.5)
    assert cluster.leaders([H1, H2]) == {H1: 2562, H2: 2562}
    # H3 starts; no discovery tick happens on H1/H2 (the interval is 10 s), yet they learn at once.
    rounds_before = cluster.net.nodes[cluster.endpoint(H1)].discoverer.rounds
    await cluster.start(H3)
    assert cluster.leaders(ALL) == {h: 2563 for h in ALL}
    assert cluster.net.nodes[cluster.endpoint(H1)].discoverer.rounds == rounds_before


async def test_kill_of_leader_fails_over_after_threshold_misses(cluster, captured_logs):
    await start_all(cluster)
    await cluster.kill(H3)
    await cluster.advance(0.25 * 2)
    assert cluster.leaders([H1, H2]) == {H1: 2563, H2: 2563}, "two misses are not enough"
    await cluster.advance(0.25 * 2)
    assert cluster.leaders([H1, H2]) == {H1: 2562, H2: 2562}
    assert cluster.decision(H2).role is Role.LEADER
    unhealthy = [e for e in captured_logs if e["event"] == "peer_unhealthy"]
    assert {e["peer_id"] for e in unhealthy} == {2563}
    elected = [e for e in captured_logs if e["event"] == "leader_elected" and e["leader_id"] == 2562]
    assert elected and elected[-1]["previous_leader_id"] == 2563


async def test_departure_triggers_an_immediate_round(cluster, captured_logs):
    await start_all(cluster)
    await cluster.terminate(H3)  # no clock advance: only the goodbye can explain the change
    assert cluster.leaders([H1, H2]) == {H1: 2562, H2: 2562}
    removed = [e for e in captured_logs if e["event"] == "peer_removed"]
    assert {(e["peer_id"], e["reason"]) for e in removed} == {(2563, "left")}
    assert all(2563 not in [m.node_id for m in cluster.decision(h).view.members] for h in (H1, H2))


async def test_restarted_leader_leads_again(cluster):
    await start_all(cluster)
    await cluster.terminate(H3)
    await cluster.advance(1)
    await cluster.start(H3)
    await cluster.advance(0.25)
    assert cluster.leaders(ALL) == {h: 2563 for h in ALL}


async def test_silent_peer_removed_after_node_timeout(cluster, captured_logs):
    await start_all(cluster)
    await cluster.kill(H1)
    await cluster.advance(29)
    assert 2561 in [m.node_id for m in cluster.decision(H3).view.members]
    assert not [m for m in cluster.decision(H3).view.members if m.node_id == 2561][0].healthy
    assert not [e for e in captured_logs if e["event"] == "peer_removed"]
    await cluster.advance(1.5)
    assert 2561 not in [m.node_id for m in cluster.decision(H3).view.members]
    removed = [e for e in captured_logs if e["event"] == "peer_removed"]
    assert {(e["node_id"], e["peer_id"], e["reason"]) for e in removed} == {
        (2562, 2561, "timeout"),
        (2563, 2561, "timeout"),
    }


async def test_dead_peer_still_in_stale_dns_never_looks_healthy(cluster):
    await start_all(cluster)
    await cluster.kill(H3, remove_from_dns=False)
    for _ in range(8):
        await cluster.advance(10)
        members = {m.node_id: m.healthy for m in cluster.decision(H1).view.members}
        assert members.get(2563) in (None, False)
        assert cluster.leaders([H1, H2]) == {H1: 2562, H2: 2562}


async def test_dns_failure_keeps_the_view(cluster, captured_logs):
    await start_all(cluster)
    cluster.resolver.failing = True
    await cluster.advance(25)
    assert cluster.leaders(ALL) == {h: 2563 for h in ALL}
    assert all(len(cluster.decision(h).view.healthy) == 3 for h in ALL)
    failed = [e for e in captured_logs if e["event"] == "dns_lookup_failed"]
    assert failed and failed[0]["log_level"] == "warning"
    cluster.resolver.failing = False
    cluster.resolver.names["backend-service"] = []  # empty answers keep the view too
    await cluster.advance(25)
    assert all(len(cluster.decision(h).view.healthy) == 3 for h in ALL)


async def test_rounds_run_on_every_discovery_tick(cluster):
    await start_all(cluster)
    node = cluster.net.nodes[cluster.endpoint(H1)]
    before = node.elector.rounds
    await cluster.advance(30)
    assert node.elector.rounds - before >= 3


async def test_partition_and_heal_converge_on_one_leader(cluster):
    await start_all(cluster)
    cluster.partition([H3], [H1, H2])
    await cluster.advance(1.5)
    assert cluster.leaders([H1, H2]) == {H1: 2562, H2: 2562}
    assert cluster.leaders([H3]) == {H3: 2563}  # the minority side still thinks it leads (no quorum rule yet)
    cluster.heal()
    await cluster.advance(0.5)
    assert cluster.leaders(ALL) == {h: 2563 for h in ALL}


async def test_paused_peer_dropped_then_rejoins_through_its_probes(cluster):
    await start_all(cluster)
    cluster.partition([H2], [H1, H3])
    await cluster.advance(31)
    for host in (H1, H3):
        assert {m.node_id: m.healthy for m in cluster.decision(host).view.members}.get(2562) in (None, False)
    assert [m.node_id for m in cluster.decision(H2).view.healthy] == [2562]
    cluster.heal()
    await cluster.advance(0.5)  # well before the next DNS tick
    assert all(len(cluster.decision(h).view.healthy) == 3 for h in ALL)


async def test_no_false_suspicion_when_idle(cluster, captured_logs):
    await start_all(cluster)
    captured_logs.clear()
    await cluster.advance(120, step=0.25)
    suspicious = ("peer_unhealthy", "peer_removed", "leader_elected", "role_changed")
    assert [e for e in captured_logs if e["event"] in suspicious] == []
    assert sum(1 for e in captured_logs if e["event"] == "election_round") >= 3 * 12


async def test_custom_threshold_is_respected():
    sim = SimCluster(Config(jwt_secret="s" * 32, failure_threshold=5, probe_interval_s=0.25))
    try:
        await start_all(sim)
        await sim.kill(H3)
        await sim.advance(0.25 * 4)
        assert sim.leaders([H1]) == {H1: 2563}
        await sim.advance(0.25 * 2)
        assert sim.leaders([H1]) == {H1: 2562}
    finally:
        await sim.close()


async def test_an_actor_that_crashes_ends_the_node(cluster):
    class BrokenResolver:
        async def resolve_ipv4(self, name):
            raise RuntimeError("resolver bug")

    await cluster.start(H1)
    node = cluster.net.nodes[cluster.endpoint(H1)]
    task = cluster._tasks[cluster.endpoint(H1)]
    node.discoverer._resolver = BrokenResolver()
    node.discoverer.kick()
    await cluster.advance(0.1)
    assert task.done()
    with pytest.raises(ExceptionGroup) as info:
        task.result()
    assert info.group_contains(RuntimeError, match="resolver bug")
    # Nothing of the node is left running: its other actors were cancelled with it.
    cluster._tasks.pop(cluster.endpoint(H1))
    actor_names = ("health-monitor", "elector", "discoverer", "health-ticker", "probe-")
    leftovers = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(actor_names)]
    assert leftovers == []


async def test_replicas_listed_late_by_dns_find_each_other_before_the_next_full_round(cluster):
    # Swarm and Kubernetes list a replica only once it runs: started together, each first sees nobody.
    await cluster.start(H1, in_dns=False)
    await cluster.start(H2, in_dns=False)
    await cluster.advance(0.1)
    assert cluster.leaders([H1, H2]) == {H1: 2561, H2: 2562}
    await cluster.advance(15)  # DNS lists them only after a while, as Swarm does
    cluster.resolver.names["backend-service"] = [H1, H2]
    await cluster.advance(1.5)  # far less than DISCOVERY_INTERVAL (10 s)
    assert cluster.leaders([H1, H2]) == {H1: 2562, H2: 2562}


async def test_quick_lookups_while_alone_are_bounded(cluster):
    await cluster.start(H1, in_dns=False)
    node = cluster.net.nodes[cluster.endpoint(H1)]
    await cluster.advance(20)
    assert node.discoverer.rounds >= 15, "alone, a node looks again about every second at first"
    await cluster.advance(60)
    settled = node.discoverer.rounds
    await cluster.advance(60)
    assert node.discoverer.rounds - settled == 6, "then it settles at one lookup per DISCOVERY_INTERVAL"
