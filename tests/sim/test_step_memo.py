"""The core step's memos give what the step gives without them, on generated input sequences.

Two memos outlive a step (``node/core/replication/machine.py``): ``_last_finished`` (the fields of the State
the last step built, so the next step from that State copies one dict instead of reading 40 fields) and
``_candidates_memo`` (the voters a handover may go to, by rank, per configuration, view and Stop). Both
are memos of pure functions, keyed by the State's identity or by the values they are computed from.
Here every step that would use them (a hit) is run twice from the same State and input: once with both
memos emptied (the plain path: every field read from the State, the ranking computed afresh), once with
them as the last step left them, and the two State and Ready must be equal, field by field with the same
types. ``test_step_reference`` compares the steps against a plain reference; its interleaving of the two
paths empties ``_last_finished`` before every optimised step, so the hit path is checked here.

The cheaper checks inside a step are pinned by their own properties: the membership steady check (the
oldest answer instead of every answer) and the slot builder that replaced the generated ``__init__``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core.replication import machine
from node.core.replication.machine import LEADER, NEVER, Progress, State
from node.core.replication.messages import Config, HardState, Ready, Tick
from tests.sim.test_step_reference import (
    SCHEDULES,
    leader_inputs,
    leader_state,
    reference_handover_target,
)
from tests.support.repsim import RepSim

_step = machine.step
_EMPTY_FINISHED = (None, {})
_EMPTY_CANDIDATES = (frozenset(), {}, "", False, ())


class Counted:
    def __init__(self) -> None:
        self.hits = 0  # steps from the State the last step built: the memo path was compared
        self.misses = 0
        self.leader_hits = 0


def assert_same(a: object, b: object, what: str) -> None:
    """Equal, and every field of the same type (a dict where a MappingProxyType belongs compares equal)."""
    assert a == b, f"{what} differs"
    for f in fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert type(x) is type(y), f"{what}.{f.name}: {type(x).__name__} != {type(y).__name__}"


def memo_checked_step(counted: Counted, state: State, inp, now: float) -> tuple[State, Ready]:
    finished, candidates = machine._last_finished[0], machine._candidates_memo[0]
    if finished[0] is not state:
        counted.misses += 1
        return _step(state, inp, now)
    machine._last_finished[0], machine._candidates_memo[0] = _EMPTY_FINISHED, _EMPTY_CANDIDATES
    plain_new, plain_ready = _step(state, inp, now)
    machine._last_finished[0], machine._candidates_memo[0] = finished, candidates
    new, ready = _step(state, inp, now)
    assert_same(ready, plain_ready, f"Ready after {inp!r} at {now}")
    assert_same(new, plain_new, f"State after {inp!r} at {now}")
    assert machine._last_finished[0][0] is new  # the next step from ``new`` can hit again
    counted.hits += 1
    counted.leader_hits += state.role == LEADER
    return new, ready


@contextlib.contextmanager
def comparing_memo():
    counted = Counted()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "step", lambda s, i, n: memo_checked_step(counted, s, i, n))
        yield counted


def test_the_comparison_catches_a_stale_memo():
    """The check can fail: a memo whose fields are not the State's (here: a commit index one behind)
    gives another State than the plain path, and the comparison says so."""
    state = leader_state(3, pipelined=False)
    state, _ = _step(state, Tick(), 0.01)  # the memo now holds this State's fields
    finished = machine._last_finished[0]
    assert finished[0] is state
    stale = {**finished[1], "commit": state.commit - 1}
    machine._last_finished[0] = (state, stale)
    with pytest.raises(AssertionError, match="differs"):
        memo_checked_step(Counted(), state, Tick(), 0.02)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([3, 5]), st.booleans())
def test_generated_leader_inputs_step_alike_with_and_without_the_memos(data, voters, pipelined):
    """A leader fed arbitrary inputs (writes, reads, acks, rejects, Persisted, view changes that start a
    handover, Stop, Ticks) at generated times: each step from the last step's State equals its plain run."""
    state = leader_state(voters, pipelined)
    now = 0.0
    with comparing_memo() as counted:
        machine._last_finished[0] = _EMPTY_FINISHED
        state, _ = machine.step(state, Tick(), now)  # a miss: fills the memo
        for _ in range(data.draw(st.integers(1, 40))):
            now += data.draw(st.sampled_from([0.0, 0.001, 0.03, 0.2, 0.6, 1.5, 70.0]))
            inp = data.draw(leader_inputs(state))
            state, _ = machine.step(state, inp, now)
    assert counted.hits >= 1 and counted.leader_hits >= 1


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEDULES)
def test_simulated_schedules_step_alike_with_and_without_the_memos(schedule):
    """Random fault schedules on generated cluster shapes, all nodes in one process (so the memos are
    shared and overwritten by the nodes in turn): every hit equals its plain run."""
    options = (
        machine.Options(
            keep_applied=3, max_batch_entries=2, max_inflight=2, snapshot_entries=20, snapshot_trailing=4
        )
        if schedule["small_window"]
        else machine.Options()
    )
    with comparing_memo() as counted:
        sim = RepSim(
            schedule["voters"],
            joiners=schedule["joiners"],
            seed=schedule["seed"],
            options=options,
            drop=0.05,
            duplicate=0.05,
            view_lag_s=0.3,
            pipelined=schedule["pipelined"],
            group_commit=schedule["group_commit"] and not schedule["pipelined"],
        )
        for _ in range(schedule["ticks"]):
            sim.random_fault(p_fault=schedule["p_fault"])
    assert counted.hits > 0 and counted.misses > 0


# --- the handover target with a warm ranking memo ----------------------------------------------------------

NAMES = ("a", "b", "c", "d", "e")


@st.composite
def leader_views(draw):
    """A leader "a" with generated voters, view (IDs may tie with or outrank its own), departing members,
    answer times and Stop."""
    voters = frozenset(draw(st.lists(st.sampled_from(NAMES), min_size=1, unique=True))) | {"a"}
    view = {n: draw(st.integers(0, 6)) for n in draw(st.lists(st.sampled_from(NAMES), unique=True))}
    progress = {
        v: Progress(next=1, last_ack_s=draw(st.sampled_from([NEVER, 0.0, 0.4, 0.5, 0.9, 1.0])))
        for v in voters - {"a"}
        if draw(st.booleans())
    }
    departing = {n: 5.0 for n in draw(st.lists(st.sampled_from(NAMES), unique=True))}
    state, _ = machine.bootstrap("a", voters)
    return State(
        "a",
        state.options,
        HardState(1, "a", ((1, Config(voters)),)),
        state.base,
        state.log,
        commit=1,
        applied=1,
        role=LEADER,
        view=MappingProxyType(view),
        progress=MappingProxyType(progress),
        departing=MappingProxyType(departing),
        stopping=draw(st.booleans()),
        handover_retry_s=draw(st.sampled_from([NEVER, 0.5, 2.0])),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(leader_views(), min_size=1, max_size=6), st.sampled_from([0.5, 1.0, 1.4]))
def test_handover_target_equals_the_plain_one_with_the_memo_warm_or_cold(states, now):
    """Each State asked twice (the second with the ranking memo warm from the first, or from the State
    before it): always the plain reference's answer."""
    for state in states:
        expected = reference_handover_target(state, now)
        assert machine._handover_target(state, now) == expected
        assert machine._handover_target(state, now) == expected


def test_a_view_changed_in_place_is_not_answered_from_the_memo():
    """The memo compares the view by value: a mapping changed after it was asked is seen."""
    voters = frozenset({"a", "b"})
    view = {"a": 1, "b": 2}
    assert machine._handover_candidates(voters, view, "a", False) == ("b",)
    view["b"] = 0
    assert machine._handover_candidates(voters, view, "a", False) == ()
    assert machine._handover_candidates(voters, view, "a", True) == ("b",)


# --- the membership steady check and the slot builder ------------------------------------------------------

TIMES = st.one_of(st.just(NEVER), st.floats(-1e9, 1e9, allow_nan=False))


@given(st.lists(TIMES, min_size=1, max_size=6), st.floats(-1e9, 1e9, allow_nan=False), st.floats(0, 1e3))
def test_the_oldest_answer_decides_the_steady_check(last_acks, now, reap_s):
    """maintain_membership compares only the oldest answer: the same as comparing every one (``now - x``
    only grows as ``x`` falls, float rounding included)."""
    every = all(now - x <= reap_s for x in last_acks)
    assert (now - min(last_acks) <= reap_s) == every


PROGRESS_VALUES = st.tuples(
    st.integers(0, 100), st.integers(0, 100), st.integers(0, 8), TIMES, TIMES, st.integers(0, 50),
    st.booleans(), st.booleans(), TIMES,
)  # fmt: skip


@given(PROGRESS_VALUES)
def test_the_slot_builder_equals_the_constructor(values):
    """A builder's object is the constructor's: equal, same hash, same repr, still frozen."""
    built, made = machine._slot_builder(Progress)(values), Progress(*values)
    assert (
        type(built) is Progress and built == made and hash(built) == hash(made) and repr(built) == repr(made)
    )
    with pytest.raises(AttributeError):
        built.next = 1  # type: ignore[misc]


def test_the_slot_builder_equals_the_constructor_on_every_field_of_a_state():
    state = leader_state(5, pipelined=True)
    built = machine._new_state(machine._state_values(state))
    assert built == state
    assert all(getattr(built, f.name) is getattr(state, f.name) for f in fields(State))


def test_the_slot_builder_refuses_classes_whose_init_does_more():
    @dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self) -> None:
            raise ValueError

    @dataclass(frozen=True, slots=True)
    class Derived:
        x: int
        y: int = field(init=False, default=0)

    @dataclass(frozen=True)
    class Unslotted:
        x: int

    for cls in (Checked, Derived, Unslotted):
        with pytest.raises(TypeError):
            machine._slot_builder(cls)
