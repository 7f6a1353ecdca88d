"""``machine.next_deadline``: the shell ticks the core only at that time, so a Tick before it must change
nothing. The simulation (tests/support/repsim.py ``check_deadline``) checks this on every Tick of every
simulated schedule; these tests add schedules drawn by hypothesis, the cases found while writing it, and
show that the check fails when the deadline is too late."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core.replication import machine
from node.core.replication.messages import Tick
from tests.support.repsim import InvariantViolated, RepSim


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**32 - 1),
    st.integers(3, 5),
    st.booleans(),
    st.floats(0.0, 0.1),
    st.sampled_from([0.001, 0.005, 0.013]),
)
def test_no_tick_before_the_deadline_changes_anything(seed, voters, pipelined, drop, tick_s):
    """Random faults (crashes, cuts, stops, ID changes), writes and reads on 3-5 voters, with ticks of
    several lengths: every Tick before the node's next_deadline is a no-op (else the sim raises)."""
    sim = RepSim(voters, seed=seed, drop=drop, pipelined=pipelined, tick_s=tick_s, view_lag_s=0.1)
    for _ in range(round(3.0 / tick_s)):
        sim.random_fault(p_fault=0.02, max_fault_s=1.0)


def test_a_timed_out_campaign_is_retried_at_once():
    """Found by the check: a campaign that times out steps down, and the next campaign only starts with
    the next step; the deadline must say "now", not wait for a timer that no longer exists."""
    sim = RepSim(3, seed=1)
    leader = sim.leader()
    for name in sim.nodes:
        if name != leader:
            sim.cut(leader, name, both=True)
    # Alone, the old leader is not writable; the others campaign. Isolate one candidate so its campaign
    # times out while it still sees itself as the highest healthy voter.
    candidate = max(n for n in sim.nodes if n != leader)
    sim.isolate(candidate)
    sim.nodes[candidate].view = None
    for _ in range(400):
        sim.tick()
        state = sim.state(candidate)
        if state.role == machine.FOLLOWER and state.campaign is None and machine._campaign_due(state, sim.now):
            assert machine.next_deadline(state, sim.now) == sim.now
            return
    pytest.skip("the schedule never left a due campaign between two steps")  # pragma: no cover


def test_the_check_fails_when_the_deadline_is_too_late(monkeypatch):
    """A next_deadline that never asks for a tick: the first Tick that does something is reported."""
    monkeypatch.setattr(machine, "next_deadline", lambda _state, _now: float("inf"))
    sim = RepSim(3, seed=3)
    with pytest.raises(InvariantViolated, match="before next_deadline"):
        sim.run(2.0)


def test_a_leader_is_ticked_for_its_heartbeats_and_an_idle_follower_not_at_all():
    """The point of the deadline: a leader's next tick is its next heartbeat; a follower that hears its
    leader has no timer before the lease, which the leader's heartbeats keep pushing back."""
    sim = RepSim(3, seed=5)
    leader = sim.leader()
    sim.run(0.2)
    state = sim.state(leader)
    deadline = machine.next_deadline(state, sim.now)
    assert sim.now <= deadline <= state.heartbeat_sent_s + state.options.heartbeat_s
    follower = next(n for n in sim.nodes if n != leader)
    fstate = sim.state(follower)
    expected = fstate.leader_contact_s + fstate.options.lease_s
    assert machine.next_deadline(fstate, sim.now) == pytest.approx(expected, abs=1e-5)
    same, ready = machine.step(fstate, Tick(), sim.now + 0.001)
    assert ready.empty and same == fstate


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(3, 5), st.floats(0.0, 0.1))
def test_a_persisted_of_a_non_leaders_append_changes_nothing(seed, voters, drop):
    """The Replicator feeds no Persisted for appends carried out while the node was not leading (a
    follower's appends: most of them): under random faults every such Persisted, fed anyway, is a no-op
    (else the sim raises), so skipping it changes nothing."""
    sim = RepSim(voters, seed=seed, drop=drop, pipelined=True, view_lag_s=0.1)
    for _ in range(400):
        sim.random_fault(p_fault=0.02, max_fault_s=1.0)
    assert sim.persisted_checks > 0
