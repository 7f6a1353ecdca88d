"""Removing a member by an operator (``RemoveMember``), on the deterministic simulation.

What must hold: the removal goes through the log like every membership change (one at a time, only by a
writable leader), a removed node that is still alive is not added back while it stays in the leader's
view (whichever node leads), and once it has left the view (stopped, restarted) it may rejoin as a learner.
The simulation checks the safety invariants after every Ready; the asserts here are what an operator sees.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core.replication import machine
from node.core.replication.messages import RemoveMember, SubmitAccepted, SubmitRejected
from tests.support.repsim import RepSim


def remove(sim: RepSim, on: str, who: str) -> SubmitAccepted | SubmitRejected:
    sim.counter += 1
    rid = f"rm{sim.counter}"
    ready = sim.input(on, RemoveMember(rid, who))
    assert ready is not None, f"{on} is down"
    return next(r for r in ready.replies if getattr(r, "request_id", None) == rid)


def proposals(sim: RepSim, name: str) -> list[str]:
    return [fields["reason"] for _, f, fields in sim.nodes[name].facts if f == "config_proposed"]


def test_a_live_follower_is_removed_through_the_log_and_stays_out_while_it_is_alive():
    sim = RepSim(3, seed=40)
    leader = sim.leader()
    reply = remove(sim, leader, "node-1")
    assert isinstance(reply, SubmitAccepted) and reply.epoch == sim.state(leader).hard.epoch
    assert sim.run_until(lambda: sim.write_committed(reply), 2)
    for name in ("node-2", "node-3"):
        assert sim.state(name).config.voters == {"node-2", "node-3"}
        assert sim.state(name).config.removed == {"node-1"}
    # node-1 is alive and in every view, yet for 5 s (far beyond any re-add) it is not a member again,
    # and it cannot disturb the cluster: no campaign of it succeeds, the epoch does not move.
    epoch = sim.state(leader).hard.epoch
    sim.run(5)
    assert "node-1" not in sim.state(leader).config.members
    assert sim.writable() == [leader] and sim.state(leader).hard.epoch == epoch
    assert proposals(sim, leader) == ["removed by an operator: node-1"]
    # Two voters left: writes still commit (quorum 2 of 2).
    write = sim.submit(leader, b"after")
    assert sim.run_until(lambda: sim.write_committed(write), 2)


def test_the_removal_survives_a_leader_change():
    """The exclusion is part of the replicated configuration: a new leader does not add the node back."""
    sim = RepSim(4, seed=41)
    assert sim.leader() == "node-4"
    reply = remove(sim, "node-4", "node-1")
    assert sim.run_until(lambda: sim.write_committed(reply), 2)
    sim.crash("node-4")
    assert sim.leader(timeout_s=3) == "node-3"
    sim.run(3)
    assert "node-1" not in sim.state("node-3").config.members
    assert sim.state("node-3").config.removed == {"node-1"}


def test_a_removed_node_that_restarts_rejoins_as_learner_then_voter():
    sim = RepSim(3, seed=42)
    leader = sim.leader()
    reply = remove(sim, leader, "node-1")
    assert sim.run_until(lambda: sim.write_committed(reply), 2)
    sim.crash("node-1")  # leaves the view: the exclusion is forgotten through the log
    assert sim.run_until(lambda: not sim.state(leader).config.removed, 2)
    sim.restart("node-1")
    assert sim.run_until(lambda: sim.state(leader).config.voters == {"node-1", "node-2", "node-3"}, 3)
    assert proposals(sim, leader) == [
        "removed by an operator: node-1",
        "removed node node-1 left the view",
        "new node node-1",
        "learner node-1 caught up",
    ]


def test_a_dead_voter_is_removed_at_once_instead_of_after_the_reap_timeout():
    sim = RepSim(3, seed=43)  # reap_timeout_s is 60 s by default
    leader = sim.leader()
    sim.crash("node-1")
    sim.run(0.5)
    reply = remove(sim, leader, "node-1")
    assert isinstance(reply, SubmitAccepted)
    assert sim.run_until(lambda: sim.write_committed(reply), 2)
    assert sim.state(leader).config.voters == {"node-2", "node-3"}


def test_refusals_unknown_leader_itself_follower_and_no_quorum():
    sim = RepSim(3, seed=44)
    leader = sim.leader()
    sim.run(0.2)
    unknown = remove(sim, leader, "node-9")
    assert isinstance(unknown, SubmitRejected) and unknown.code == "unknown"
    itself = remove(sim, leader, leader)
    assert isinstance(itself, SubmitRejected) and itself.code == "is-leader"
    assert "stop it first" in itself.reason
    follower = remove(sim, "node-1", "node-2")
    assert isinstance(follower, SubmitRejected)
    assert (follower.code, follower.leader) == ("not-leader", leader)
    sim.crash("node-1")
    sim.crash("node-2")
    sim.run(1)
    lost = remove(sim, leader, "node-1")
    assert isinstance(lost, SubmitRejected) and lost.code == "no-quorum"
    assert sim.state(leader).config.voters == {"node-1", "node-2", "node-3"}  # nothing changed


def test_one_membership_change_at_a_time():
    sim = RepSim(5, seed=45)
    leader = sim.leader()
    sim.run(0.2)
    first = remove(sim, leader, "node-1")
    second = remove(sim, leader, "node-2")  # same instant: the first is appended, not committed
    assert isinstance(first, SubmitAccepted)
    assert isinstance(second, SubmitRejected) and second.code == "conflict"
    assert sim.run_until(lambda: sim.write_committed(first), 2)
    third = remove(sim, leader, "node-2")
    assert isinstance(third, SubmitAccepted)
    assert sim.run_until(lambda: sim.write_committed(third), 2)
    assert sim.state(leader).config.voters == {"node-3", "node-4", "node-5"}


def test_removing_down_to_one_voter_works_and_the_last_one_is_refused():
    sim = RepSim(2, seed=46)
    leader = sim.leader()
    other = next(n for n in sim.nodes if n != leader)
    sim.run(0.2)
    reply = remove(sim, leader, other)
    assert sim.run_until(lambda: sim.write_committed(reply), 2)
    assert sim.state(leader).config.voters == {leader}
    last = remove(sim, leader, leader)  # the only voter left is the leader
    assert isinstance(last, SubmitRejected) and last.code == "is-leader"
    write = sim.submit(leader, b"alone")
    assert sim.run_until(lambda: sim.write_committed(write), 2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**16),
    st.lists(
        st.tuples(st.sampled_from(["remove", "crash", "restart", "run"]), st.sampled_from(range(1, 6))),
        max_size=12,
    ),
)
def test_any_sequence_of_removals_keeps_one_change_at_a_time_and_a_voter(seed, actions):
    """Whatever removals, crashes and restarts happen: the safety invariants hold (checked on every Ready
    by the simulation), a leader never has two configuration changes uncommitted, a configuration always
    has a voter, and a removed identity is never a member while it is listed as removed."""
    sim = RepSim(5, seed=seed)
    sim.leader()
    for action, k in actions:
        name = f"node-{k}"
        if action == "remove":
            alive = sim.alive()
            if alive:
                remove(sim, sim.rng.choice(alive), name)
        elif action == "crash" and sim.nodes[name].alive and len(sim.alive()) > 1:
            sim.crash(name)
        elif action == "restart" and not sim.nodes[name].alive:
            sim.restart(name)
        sim.run(0.3)
        for n in sim.alive():
            s = sim.state(n)
            cfg = s.config
            assert cfg.voters and not (cfg.removed & cfg.members)
            if s.role == machine.LEADER:
                assert sum(1 for index, _ in s.hard.configs if index > s.commit) <= 1
