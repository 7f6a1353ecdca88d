"""The Replicator carries a Ready out without the completer task's wake-ups when nothing holds it, and in
exactly the completer's order when something does (``Replicator._advance``).

A Ready without writes (the commit carried by a heartbeat: applies and an ack) behind an empty queue goes
out within ``_carry_out``; behind a Ready whose log write still runs it waits for it; behind a Ready the
completer task is carrying out itself (here: the applier's backlog is full) it waits for that too. The
real Replicator, its real durable log on disk and the real core; the network is a recorder.
"""

from __future__ import annotations

import asyncio
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from node.actors import replicator as replicator_module
from node.actors.replicator import Replicator
from node.core.ids import Endpoint
from node.core.replication import machine
from node.core.replication import messages as msg
from node.runtime import logging as nodelog
from node.runtime.mailbox import LatestCell
from tests.replication.test_log_write_failure import LEADER, Recorder, append, carry, follower
from tests.support.wait import until


def heartbeat(prev: msg.LogId, commit: int, seq: int) -> msg.Receive:
    return msg.Receive("leader", msg.Append(prev.epoch, prev, (), commit, seq), "c")


async def step(r: Replicator, inp: msg.Input) -> None:
    """Step one input and hand its Ready to ``_carry_out``, without waiting for anything queued."""
    assert r.state is not None
    r.state, ready = machine.step(r.state, inp, 1.0)
    async with asyncio.timeout(10):
        await r._carry_out([ready])


def applying(r: Replicator) -> list[int]:
    return [e.index for e in r._apply_queue]


async def test_a_ready_without_writes_is_carried_out_at_once(tmp_path):
    async with follower(tmp_path) as (r, net, _completer):
        await carry(r, append(1, msg.LogId(0, 1), 2, 2, 1, seq=1))
        r._apply_queue.clear()
        acks = len(net.acks())
        # The commit of entries 2-3 comes with a heartbeat: nothing to write, an ack and two applies.
        await step(r, heartbeat(msg.LogId(1, 3), 3, seq=2))
        # Done within _carry_out: no completer task, no loop round in between.
        assert len(net.acks()) == acks + 1
        assert applying(r) == [2, 3]
        assert not r._unsynced and r._unsynced_empty.is_set()


async def test_a_ready_without_writes_waits_for_the_writes_queued_before_it(tmp_path):
    async with follower(tmp_path) as (r, net, _completer):
        await carry(r, append(1, msg.LogId(0, 1), 2, 2, 1, seq=1))
        r._apply_queue.clear()
        acks = len(net.acks())
        gate = threading.Event()
        assert r._asynclog is not None
        held = r._asynclog.run_future(lambda _log: gate.wait(10))  # the log thread is busy until released
        try:
            # Entry 4 (its write waits on the log thread), committing 2-3; then the heartbeat committing 4.
            await step(r, append(1, msg.LogId(1, 3), 4, 1, 3, seq=2))
            await step(r, heartbeat(msg.LogId(1, 4), 4, seq=3))
            assert len(r._unsynced) == 2
            assert len(net.acks()) == acks and applying(r) == []  # nothing overtook the write
        finally:
            gate.set()
        async with asyncio.timeout(10):
            await held
            await r._drain()
        assert [a.match for a in net.acks()[acks:]] == [4, 4]
        assert applying(r) == [2, 3, 4]  # in commit order: the heartbeat's apply came last


async def test_a_ready_waits_for_the_one_the_completer_task_carries_out(tmp_path, monkeypatch):
    monkeypatch.setattr(replicator_module, "MAX_APPLY_BACKLOG", 3)
    async with follower(tmp_path) as (r, net, completer):
        await carry(r, append(1, msg.LogId(0, 1), 2, 2, 1, seq=1))
        # The applier's backlog is full: the next apply waits for room, in the completer task.
        r._apply_queue.clear()
        filler = [msg.Entry(1, 100 + i, msg.Kind.COMMAND, b"f") for i in range(3)]
        r._apply_queue.extend(filler)
        acks = len(net.acks())
        await step(r, append(1, msg.LogId(1, 3), 4, 1, 3, seq=2))  # entry 4, committing 2-3
        await until(lambda: r._completer_busy, "the completer task to take the Ready")
        await step(r, heartbeat(msg.LogId(1, 4), 4, seq=3))  # no writes, but queued behind the busy one
        assert not completer.done()
        assert [a.match for a in net.acks()[acks:]] == [4]  # the first Ready's ack went out before its apply
        assert applying(r) == [100, 101, 102] and len(r._unsynced) == 2
        r._apply_queue.clear()  # the applier took its backlog
        r._apply_room.set()
        async with asyncio.timeout(10):
            await r._drain()
        assert [a.match for a in net.acks()[acks:]] == [4, 4]
        assert applying(r) == [2, 3, 4]


async def test_a_failure_in_a_write_callback_stops_the_node_through_the_completer(tmp_path):
    async with follower(tmp_path) as (r, _net, completer):

        def broken(_send: msg.Send) -> None:
            raise RuntimeError("send failed")

        r._send = broken  # type: ignore[method-assign]
        await step(r, append(1, msg.LogId(0, 1), 2, 1, 1, seq=1))  # its ack is sent by the write's callback
        async with asyncio.timeout(10):
            await asyncio.wait([completer])
        assert isinstance(completer.exception(), RuntimeError)


# --- the whole class: any mix of Readys, writes finishing in any order, the applier full at times ------

_items = st.lists(
    st.tuples(st.integers(0, 2), st.booleans()),  # (writes of the Ready, whether it applies something)
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(items=_items, order=st.randoms(use_true_random=False), backlog=st.integers(1, 4))
def test_readys_are_carried_out_in_order_once_their_writes_and_all_earlier_ones_are_done(
    items, order, backlog, tmp_path_factory
):
    asyncio.run(_carry_out_in_order(items, order, backlog, tmp_path_factory.mktemp("hops")))


async def _carry_out_in_order(items, order, backlog: int, tmp_path) -> None:
    loop = asyncio.get_running_loop()
    r = Replicator(
        me=Endpoint.parse("127.0.0.2:4001"), data_dir=tmp_path, database=None, views=LatestCell(),
        secret="s" * 32, formation_window_s=0, log=nodelog.get_logger(),
    )  # fmt: skip
    r.identities = {LEADER: "leader"}
    r.transport = net = Recorder()
    old_backlog = replicator_module.MAX_APPLY_BACKLOG
    replicator_module.MAX_APPLY_BACKLOG = backlog
    completer = asyncio.create_task(r._completer())
    try:
        pending: list[asyncio.Future] = []
        writes_of: list[list[asyncio.Future]] = []
        for n, (count, applies) in enumerate(items):
            writes = [loop.create_future() for _ in range(count)]
            pending += writes
            writes_of.append(writes)
            entry = (msg.Entry(1, n + 1, msg.Kind.COMMAND, b"x"),) if applies else ()
            send = msg.Send("leader", msg.AppendAck(1, n + 1, n))
            await r._queue_unsynced(replicator_module._Unsynced(list(writes), [send], entry, (), None))
        order.shuffle(pending)
        for _ in range(20 * (len(pending) + len(items)) + 20):  # bounded (the rest is finished below)
            sent = [m.match for _, m in net.sent]
            # Carried out in queue order, and each only once its writes and every earlier Ready's are done.
            assert sent == list(range(1, len(sent) + 1))
            for n in sent:
                assert all(w.done() for ws in writes_of[:n] for w in ws)
            if not r._unsynced:
                break
            if pending and order.random() < 0.8:
                pending.pop().set_result(None)
            if r._apply_queue and (not pending or order.random() < 0.3):
                # The applier catches up, also while writes run (their callbacks then come first).
                r._apply_queue.clear()
                r._apply_room.set()
            for _ in range(4):
                await asyncio.sleep(0)  # the done callbacks and the completer task run
        async with asyncio.timeout(10):
            while r._unsynced:  # the applier still full: let it catch up until all is out
                r._apply_queue.clear()
                r._apply_room.set()
                await asyncio.sleep(0.001)
            await r._drain()
        assert [m.match for _, m in net.sent] == list(range(1, len(items) + 1))
        assert not completer.done()
    finally:
        replicator_module.MAX_APPLY_BACKLOG = old_backlog
        completer.cancel()
        await asyncio.gather(completer, return_exceptions=True)


# --- submit's deadline (a timer on the waiter's future, not asyncio.timeout) --------------------------------


async def test_a_write_not_applied_in_time_is_answered_outcome_unknown_and_forgotten(tmp_path):
    async with follower(tmp_path) as (r, _net, _completer):
        # Nobody steps the submit (no loop runs): it waits until its deadline.
        async with asyncio.timeout(10):
            try:
                await r.submit(b"{}", 0.05)
            except replicator_module.OutcomeUnknown as exc:
                assert "not committed within 0.05 s" in str(exc)
            else:
                raise AssertionError("a write nobody committed was answered")
        assert r._waiters == {} and r._by_index == {}


async def test_a_cancelled_write_is_forgotten_and_its_deadline_cancelled(tmp_path):
    async with follower(tmp_path) as (r, _net, _completer):
        task = asyncio.create_task(r.submit(b"{}", 3600))
        await until(lambda: bool(r._waiters), "the write to wait")
        (waiter,) = r._waiters.values()
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled() and waiter.future.cancelled()
        assert r._waiters == {}
        # The timer is gone: the loop holds no handle that would fire in an hour.
        loop = asyncio.get_running_loop()
        scheduled = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert all(h.when() - loop.time() < 600 for h in scheduled)
