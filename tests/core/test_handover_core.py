"""Planned handover in the core, one input at a time: the successor's campaign survives the old leader's
messages that cross its Prepare on the wire.

The defect: the leader keeps sending heartbeats (and any Append in flight) in its epoch until the successor's
Prepare reaches it. The successor, a candidate whose campaign epoch is not taken yet, treated such a
heartbeat as "a leader exists": it abandoned the campaign, and the lead passed only after the lease (a
real-process SIGTERM of the leader paused writes for about one second instead of tens of milliseconds).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.replication import machine
from node.core.replication.messages import (
    Append,
    AppendAck,
    Config,
    Entry,
    HardState,
    Heartbeat,
    HeartbeatAck,
    Kind,
    LogId,
    Prepare,
    Promise,
    Receive,
    TakeOver,
    ViewChanged,
)

VOTERS = frozenset({"a", "b", "c"})
VIEW = ViewChanged({"a": 1, "b": 2, "c": 3})
T0 = 10.0


def cmd(epoch: int, index: int) -> Entry:
    return Entry(epoch, index, Kind.COMMAND, f"p{index}".encode())


def successor(last: int = 3, commit: int = 3) -> machine.State:
    """'b' follows 'c', the leader of epoch 2, with entries 2..last (committed up to ``commit``)."""
    config = Config(VOTERS)
    log = (Entry(0, 1, Kind.CONFIG, config.encode()), *(cmd(2, i) for i in range(2, last + 1)))
    state = machine.State(
        "b",
        machine.Options(),
        HardState(2, None, ((1, config),)),
        LogId(0, 0),
        log,
        commit=commit,
        applied=commit,
        verified=commit,
    )
    state, _ = machine.step(state, VIEW, T0)
    state, _ = machine.step(state, Receive("c", Heartbeat(2, commit, 1)), T0)
    assert state.leader == "c" and state.role == machine.FOLLOWER
    return state


def take_over(state: machine.State, at: float, leaving: bool = True) -> machine.State:
    state, ready = machine.step(state, Receive("c", TakeOver(2, leaving=leaving)), at)
    assert state.role == machine.CANDIDATE and state.campaign is not None and state.campaign.handover
    prepares = {s.to: s.message for s in ready.messages if isinstance(s.message, Prepare)}
    assert set(prepares) == {"a", "c"} and all(p.handover and p.epoch == 3 for p in prepares.values())
    return state


def test_a_heartbeat_of_the_handing_over_leader_does_not_end_the_successors_campaign():
    state = take_over(successor(), T0 + 0.01)
    # The old leader's heartbeat, sent before our Prepare reached it.
    state, ready = machine.step(state, Receive("c", Heartbeat(2, 3, 2)), T0 + 0.02)
    assert state.role == machine.CANDIDATE and state.campaign is not None, "campaign abandoned"
    assert [s.message for s in ready.messages] == [HeartbeatAck(2, 2)]  # still answered
    # One promise besides our own is a majority of three: the epoch is ours, no lease waited for.
    state, ready = machine.step(state, Receive("a", Promise(3, LogId(2, 3))), T0 + 0.03)
    assert state.role == machine.LEADER and state.hard.epoch == 3
    assert any(f.event == "became_leader" for f in ready.facts)


def test_a_heartbeat_of_another_node_or_a_higher_epoch_still_ends_the_campaign():
    """Only the leader that handed over is let through: anyone else speaking as leader is news."""
    state = take_over(successor(), T0 + 0.01)
    higher, _ = machine.step(state, Receive("c", Heartbeat(4, 3, 2)), T0 + 0.02)
    assert higher.role == machine.FOLLOWER and higher.hard.epoch == 4
    # A non-handover campaign (the lease expired) still yields to its epoch's leader.
    lone = successor()
    lone, _ = machine.step(lone, ViewChanged({"a": 1, "b": 2}), T0 + 1.0)  # c gone from the view
    assert lone.role == machine.CANDIDATE and not lone.campaign.handover
    back, _ = machine.step(lone, Receive("c", Heartbeat(2, 3, 2)), T0 + 1.01)
    assert back.role == machine.FOLLOWER and back.campaign is None


@settings(max_examples=200, deadline=None)
@given(
    crossing=st.lists(
        st.one_of(st.just("heartbeat"), st.integers(min_value=1, max_value=3)),  # n: an Append of n entries
        max_size=8,
    ),
    promiser=st.sampled_from(["a", "c"]),
    leaving=st.booleans(),
)
def test_any_crossing_traffic_of_the_old_leader_leaves_the_handover_to_complete_at_once(
    crossing, promiser, leaving
):
    """Whatever the old leader sends in its epoch between its TakeOver and our Prepare's arrival
    (heartbeats, Appends of entries it still had in flight), the successor takes the lead as soon as a
    majority promised: before any lease could have run out, and with every entry it acknowledged."""
    state = take_over(successor(), T0 + 0.001, leaving=leaving)
    now = T0 + 0.001
    acked = state.last.index
    for i, item in enumerate(crossing):
        now += 0.001
        if item == "heartbeat":
            inp = Heartbeat(2, state.commit, 10 + i)
        else:
            first = state.last.index + 1
            entries = tuple(cmd(2, j) for j in range(first, first + item))
            inp = Append(2, state.last, entries, state.commit, 10 + i)
        state, ready = machine.step(state, Receive("c", inp), now)
        assert state.role == machine.CANDIDATE and state.campaign is not None, f"campaign ended by {inp}"
        acks = [s.message for s in ready.messages if isinstance(s.message, AppendAck)]
        if acks:
            acked = max(acked, *(a.match for a in acks))
    now += 0.001
    state, _ = machine.step(state, Receive(promiser, Promise(3, LogId(2, 3))), now)
    assert now - T0 < state.options.lease_s
    assert state.role == machine.LEADER and state.hard.epoch == 3
    # Nothing acknowledged to the old leader is lost: it is below the new leader's EpochStart.
    assert state.epoch_start == acked + 1
