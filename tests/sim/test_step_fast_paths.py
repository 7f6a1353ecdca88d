"""The core step's cheaper paths give what the plain ones give, and a step keeps nothing between calls.

``node/core/replication/machine.py`` builds State, Ready and Progress through their slot descriptors
(``node.core.slots``), checks the membership steady state on the oldest answer only and finds the handover
target in one pass; each is pinned here by a property against its plain form (``test_step_reference``
compares whole steps against a plain reference).

The core is pure: a step's State and Ready are a function of the State, the input and ``now`` alone, with no
module-level memo or other state carried from one call to the next. ``test_a_step_keeps_nothing_between_calls``
and its simulated form step States with inputs, then step every one of those (State, input, now) again in
another order, interleaved with the steps of other States and other nodes: each must give what it gave the
first time. ``test_the_replay_catches_state_kept_between_steps`` shows the check fails for a step that does
carry something over.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import replication, slots
from node.core.replication import machine
from node.core.replication.machine import LEADER, NEVER, Progress, State
from node.core.replication.messages import Config, HardState, Ready, Tick
from tests.sim.test_step_reference import (
    SCHEDULES,
    leader_inputs,
    leader_state,
    reference_handover_target,
    run_schedule,
)

_step = machine.step


@dataclass(frozen=True)
class Call:
    """One call of ``machine.step`` and what it returned."""

    state: State
    inp: object
    now: float
    new: State
    ready: Ready


def assert_same(a: object, b: object, what: str) -> None:
    """Equal, and every field of the same type (a dict where a MappingProxyType belongs compares equal)."""
    assert a == b, f"{what} differs"
    for f in fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert type(x) is type(y), f"{what}.{f.name}: {type(x).__name__} != {type(y).__name__}"


@contextmanager
def recording() -> Iterator[list[Call]]:
    """Every ``machine.step`` call made inside (by the test or by RepSim), with its result."""
    calls: list[Call] = []

    def record(state: State, inp: object, now: float) -> tuple[State, Ready]:
        new, ready = _step(state, inp, now)
        calls.append(Call(state, inp, now, new, ready))
        return new, ready

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "step", record)
        yield calls


def replay(calls: list[Call], order: list[int]) -> None:
    """Steps each recorded (State, input, now) again, in ``order``: the same State and Ready as the first
    time, whatever was stepped in between."""
    for i in order:
        c = calls[i]
        new, ready = machine.step(c.state, c.inp, c.now)
        assert_same(ready, c.ready, f"Ready of call {i} ({c.inp!r} at {c.now}) stepped again")
        assert_same(new, c.new, f"State of call {i} ({c.inp!r} at {c.now}) stepped again")


def shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# --- no state between calls --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.lists(st.tuples(st.sampled_from([3, 5]), st.booleans()), min_size=2, max_size=3))
def test_a_step_keeps_nothing_between_calls(data, shapes):
    """Leaders of generated shapes, each fed arbitrary inputs (writes, reads, acks, rejects, Persisted, view
    changes that start a handover, Stop, Ticks) at generated times, their steps taken in turn; then every
    step again in a generated order, and once more in the first order (so that most are taken straight
    after the step that built their State): always the first result."""
    states = [leader_state(voters, pipelined) for voters, pipelined in shapes]
    nows = [0.0] * len(states)
    with recording() as calls:
        for _ in range(data.draw(st.integers(1, 15))):
            for i in range(len(states)):  # one step of each leader in turn: their steps interleave
                nows[i] += data.draw(st.sampled_from([0.0, 0.001, 0.03, 0.2, 0.6, 1.5, 70.0]))
                inp = data.draw(leader_inputs(states[i]))
                states[i], _ = machine.step(states[i], inp, nows[i])
    assert len(calls) >= len(shapes) >= 2  # the steps were recorded, of two leaders or more
    replay(calls, data.draw(st.permutations(range(len(calls)))))
    replay(calls, list(range(len(calls))))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEDULES, st.integers(0, 2**32 - 1))
def test_simulated_steps_keep_nothing_between_calls(schedule, seed):
    """Random fault schedules on generated cluster shapes (leaders, followers, candidates, joiners, all in
    one process): every step of every node, stepped again in a shuffled order, gives its first result."""
    with recording() as calls:
        run_schedule(schedule)
    assert len({c.state.me for c in calls}) >= 2  # steps of several nodes, interleaved
    replay(calls, shuffled(len(calls), seed))


def test_the_replay_catches_state_kept_between_steps():
    """The check can fail: a step that carries one value over from the call before (here the latest
    ``now`` it saw, as a monotonic-clock memo would) gives another result when an earlier call is made
    again after later ones, and the replay says so."""

    class Leaky(machine._Step):
        latest_s = 0.0

        def __init__(self, st: State, now: float) -> None:
            Leaky.latest_s = max(Leaky.latest_s, now)
            super().__init__(st, Leaky.latest_s)

    state = leader_state(3, pipelined=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "_Step", Leaky)
        with recording() as calls:
            later, _ = machine.step(state, Tick(), 0.01)
            machine.step(later, Tick(), 5.0)
        with pytest.raises(AssertionError, match="differs"):
            replay(calls, [1, 0])


MUTABLE = (list, dict, set, bytearray, deque)


def test_the_core_modules_hold_no_mutable_value():
    """Nowhere to keep anything between calls: no module of the replication core holds a list, dict, set or
    deque at module level (``_discard`` runs an iterator into a deque that keeps nothing: maxlen 0)."""
    found = []
    for info in pkgutil.iter_modules(replication.__path__, replication.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.startswith("__"):
                continue
            owner = getattr(value, "__self__", None)  # a bound method keeps its object
            if isinstance(owner, deque) and owner.maxlen == 0:
                continue
            if isinstance(value, MUTABLE) or isinstance(owner, MUTABLE):
                found.append(f"{info.name}.{name}")
    assert found == []


def test_the_mutable_value_check_can_fail(monkeypatch):
    monkeypatch.setattr(machine, "_a_memo", [None], raising=False)
    with pytest.raises(AssertionError):
        test_the_core_modules_hold_no_mutable_value()


# --- the handover target against its plain form ----------------------------------------------------------

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
def test_handover_target_equals_the_plain_one(states, now):
    """Generated voters, views (ties with and ranks above the leader's), departing members, answer times,
    Stop and retry pauses: always the plain reference's answer, also when asked again after other States."""
    expected = [reference_handover_target(state, now) for state in states]
    assert [machine._handover_target(state, now) for state in states] == expected
    assert [machine._handover_target(state, now) for state in reversed(states)] == expected[::-1]


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
    built, made = slots.slot_builder(Progress)(values), Progress(*values)
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
            slots.slot_builder(cls)
        with pytest.raises(TypeError):  # the codec's per-field setters are refused alike
            slots.slot_setters(cls)
