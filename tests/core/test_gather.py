"""Group commit's gathering rule (node.core.replication.gather): who waits, for how long, and who never does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.core.replication.gather import Gather, release_at

RULE = Gather(delay_s=0.003, siblings=4, enough=24)


def test_a_write_with_few_others_under_way_enters_at_once():
    # One client, or a few: nothing to gather, so no write ever waits.
    for under_way in range(1, 5):
        assert release_at(RULE, 1, under_way, 10.0) == 10.0
    assert release_at(RULE, 2, 5, 10.0) == 10.0  # 3 others: still below siblings


def test_with_enough_others_under_way_the_held_writes_wait_at_most_the_delay():
    assert release_at(RULE, 1, 5, 10.0) == pytest.approx(10.003)
    assert release_at(RULE, 10, 30, 10.0) == pytest.approx(10.003)


def test_a_group_that_reached_enough_writes_enters_at_once():
    assert release_at(RULE, 24, 40, 10.0) == 10.0
    assert release_at(RULE, 23, 40, 10.0) == pytest.approx(10.003)


def test_a_delay_of_zero_turns_gathering_off():
    assert release_at(Gather(delay_s=0.0), 3, 100, 7.0) == 7.0


def test_nonsense_settings_are_refused():
    for bad in (dict(delay_s=-0.001), dict(delay_s=float("nan")), dict(siblings=0), dict(enough=0)):
        with pytest.raises(ValueError):
            Gather(**bad)


@given(
    delay=st.floats(0, 0.1),
    siblings=st.integers(1, 64),
    enough=st.integers(1, 128),
    held=st.integers(1, 200),
    others=st.integers(0, 500),
    since=st.floats(0, 1e6),
)
def test_a_held_write_never_waits_longer_than_the_delay_and_only_when_gathering_can_pay(
    delay, siblings, enough, held, others, since
):
    rule = Gather(delay_s=delay, siblings=siblings, enough=enough)
    at = release_at(rule, held, held + others, since)
    assert since <= at <= since + delay
    if at > since:  # it waits: only with enough others under way and a group not yet large enough
        assert others >= siblings and held < enough and delay > 0
