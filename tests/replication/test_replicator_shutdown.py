"""A stopping node's Replicator answers new client requests at once once its loop is over.

The defect: after a leader handed over, its loop returned, but a write (or linearizable read) arriving in
the remaining milliseconds before HTTP stopped was queued for a loop that would never step it again. It
hung until the HTTP server's shutdown cancelled it: its client stalled for up to a second after the new
leader was already writable, and the graceful HTTP stop waited for it, delaying the exit by as much.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import errors
from node.actors.replicator import Replicator
from node.core.ids import Endpoint
from node.core.replication import machine
from node.runtime import logging as nodelog
from node.runtime.mailbox import LatestCell


def replicator(tmp_path) -> Replicator:
    r = Replicator(
        me=Endpoint.parse("127.0.0.2:4001"),
        data_dir=tmp_path,
        database=None,  # never reached: the requests under test are answered before any database work
        views=LatestCell(),
        secret="s" * 32,
        formation_window_s=0,
        log=nodelog.get_logger(),
    )
    r.state = machine.joiner("me")
    return r


async def test_a_write_or_read_after_the_loop_is_over_is_refused_at_once(tmp_path):
    r = replicator(tmp_path)
    r.done.set()
    async with asyncio.timeout(1):  # a hang is the defect: fail, do not wait out the 10 s write limit
        with pytest.raises(errors.Unavailable, match="shutting down"):
            await r.submit(b"payload", timeout_s=10)
        with pytest.raises(errors.Unavailable, match="shutting down"):
            await r.confirm_read(timeout_s=10)
    assert r._submits == [] and r._reads == [] and r._waiters == {}


async def test_before_the_loop_is_over_a_write_waits_for_it(tmp_path):
    """The check can fail: without ``done`` the same write is queued for the loop (and times out here,
    with no loop running, as outcome unknown)."""
    r = replicator(tmp_path)
    with pytest.raises(errors.NodeError) as caught:
        await r.submit(b"payload", timeout_s=0.05)
    assert caught.value.code == "outcome_unknown"


@settings(max_examples=50, deadline=None)
@given(requests=st.lists(st.sampled_from(["write", "read"]), min_size=1, max_size=20))
def test_any_mix_of_requests_after_the_loop_is_over_is_answered_without_waiting(tmp_path_factory, requests):
    r = replicator(tmp_path_factory.mktemp("r"))

    async def run() -> list[str]:
        r.done.set()
        calls = [r.submit(b"p", 10) if kind == "write" else r.confirm_read(10) for kind in requests]
        async with asyncio.timeout(1):
            results = await asyncio.gather(*calls, return_exceptions=True)
        return [type(x).__name__ for x in results]

    assert asyncio.run(run()) == ["Unavailable"] * len(requests)
    assert r._waiters == {} and r._read_waiters == {}


@given(grace_s=st.floats(min_value=0.001, max_value=3600, allow_nan=False))
def test_the_handover_budget_leaves_the_goodbye_and_the_http_stop_their_share_of_any_grace(grace_s):
    """A stopping leader's handover comes first in the shutdown; its budget must never take the whole
    grace (the goodbye gets min(0.5, grace/3), the HTTP stop the rest)."""
    from node.replication.wiring import handover_budget_s

    budget = handover_budget_s(grace_s)
    assert 0 < budget <= min(0.5, grace_s / 3)
