"""Bounded-staleness reads (``freshness``): the pure rule and the query flags that carry it."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import errors
from node.core.replication import machine
from node.core.sqlreq import parse_flags
from node.replication.service import staleness


def status(role=machine.FOLLOWER, writable=False, contact=machine.NEVER, leader_commit=0) -> machine.Status:
    return machine.Status(
        role, 3, "L", writable, 10, 10, 10, frozenset({"a"}), frozenset(), MappingProxyType({}), contact,
        leader_commit,
    )  # fmt: skip


def test_a_follower_in_recent_contact_passes_and_a_silent_one_fails_with_the_numbers():
    assert staleness(status(contact=100.0), 10, 100.4, 1.0, False) is None
    why = staleness(status(contact=100.0), 10, 103.2, 1.0, False)
    assert why == "stale read: last contact with the leader 3.2 s ago > freshness 1s"


def test_strict_also_needs_the_leaders_commit_applied():
    assert staleness(status(contact=100.0, leader_commit=12), 10, 100.1, 1.0, False) is None
    why = staleness(status(contact=100.0, leader_commit=12), 10, 100.1, 1.0, True)
    assert why is not None and "applied index 10" in why and "commit index 12" in why
    assert staleness(status(contact=100.0, leader_commit=12), 12, 100.1, 1.0, True) is None


def test_a_writable_leader_passes_a_leader_without_majority_and_a_node_that_never_heard_one_fail():
    assert staleness(status(machine.LEADER, writable=True), 0, 1e9, 0.001, True) is None
    assert "no majority contact" in staleness(status(machine.LEADER), 0, 1.0, 5.0, False)
    assert "not heard from a leader" in staleness(status(), 0, 1.0, 5.0, False)
    assert "not joined" in staleness(None, 0, 1.0, 5.0, False)


@given(
    st.sampled_from([machine.FOLLOWER, machine.CANDIDATE, machine.LEADER]),
    st.booleans(),
    st.floats(0, 1e6),
    st.floats(0, 1e3),
    st.floats(1e-3, 1e3),
    st.integers(0, 100),
    st.integers(0, 100),
    st.booleans(),
)
def test_staleness_is_exactly_the_documented_rule(
    role, writable, contact, elapsed, fresh, applied, commit, strict
):
    st_ = status(role, writable, contact, commit)
    why = staleness(st_, applied, contact + elapsed, fresh, strict)
    if role == machine.LEADER:
        expected_ok = writable
    else:
        expected_ok = (contact + elapsed) - contact <= fresh and (not strict or applied >= commit)
    assert (why is None) == expected_ok, why
    assert why is None or why.startswith("stale read: ")


def test_flags_carry_freshness_and_strict():
    flags = parse_flags({"level": "none", "freshness": "1m30s", "freshness_strict": ""})
    assert flags.freshness_s == 90.0 and flags.freshness_strict
    assert parse_flags({}).freshness_s is None and not parse_flags({}).freshness_strict
    assert not parse_flags({"freshness_strict": "false"}).freshness_strict


@pytest.mark.parametrize("bad", ["", "soon", "-1s", "0", "1e99", "1s2", "nan", "inf"])
def test_a_bad_freshness_is_400(bad):
    with pytest.raises(errors.BadRequest, match="freshness"):
        parse_flags({"freshness": bad})
