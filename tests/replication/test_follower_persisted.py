"""A follower's appends are not reported back to its core as ``Persisted`` (it only counts for a leader's
own-epoch entries, see ``machine.persisted``): one core step and loop round less per replicated batch on
every follower. A leader still gets its Persisted (it commits with it)."""

from __future__ import annotations

import asyncio

from node.core.replication import machine
from node.core.replication import messages as msg
from tests.replication.test_log_write_failure import append, carry, follower


async def test_a_follower_queues_no_persisted_for_its_appends(tmp_path):
    async with follower(tmp_path) as (r, net, _completer):
        await carry(r, append(1, msg.LogId(0, 1), 2, 3, 1, seq=1))
        assert [a.match for a in net.acks()] == [4]  # durable and acknowledged
        assert r._persisted == []
        assert r.state is not None and r.state.role == machine.FOLLOWER


async def test_a_leader_still_gets_persisted_for_its_appends(tmp_path):
    async with follower(tmp_path) as (r, _net, _completer):
        assert r.state is not None
        # As the only voter of its cluster this node leads at once; its EpochStart entry is its own append.
        r.state, _ = machine.bootstrap("me", frozenset({"me"}), r.options, "c")
        r.state, ready = machine.step(r.state, msg.Tick(), 1.0)
        assert r.state.role == machine.LEADER and ready.append
        async with asyncio.timeout(10):
            await r._carry_out([ready])
            await r._drain()
        assert r._persisted == [msg.Persisted(ready.append[-1].id)]
