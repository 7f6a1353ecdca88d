"""The transport's send path: a frame write that has to wait is still bounded by the peer timeout (a stuck
peer's stream is closed in that time), a write that need not wait runs without a timer, and new work wakes
one idle worker, never loses a message, never leaves one queued while a worker is idle."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.replication import codec
from node.replication.transport import ReplicationTransport, _Peer, send_within
from node.runtime import logging as nodelog

PEER = Endpoint.parse("10.0.0.2:3000")


async def written_at_once(log: list[str]) -> str:
    log.append("written")
    return "done"


async def waits(log: list[str], steps: int) -> str:
    for _ in range(steps):
        await asyncio.sleep(0)
    log.append("written")
    return "done"


async def never(log: list[str]) -> None:
    try:
        await asyncio.get_running_loop().create_future()
    except asyncio.CancelledError:
        log.append("cancelled")
        raise


async def test_a_write_that_need_not_wait_finishes_without_a_timer():
    log: list[str] = []
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # the loop's timers: a timeout context would have added one
    await send_within(written_at_once(log), 5.0)
    assert log == ["written"] and len(loop._scheduled) == before


async def test_a_write_that_waits_finishes_within_its_bound():
    log: list[str] = []
    await send_within(waits(log, 3), 5.0)
    assert log == ["written"]


async def test_a_write_that_never_finishes_times_out_and_is_cancelled():
    log: list[str] = []
    async with asyncio.timeout(10):  # the test's own bound
        with pytest.raises(TimeoutError):
            await send_within(never(log), 0.05)
    assert log == ["cancelled"]


async def test_errors_of_the_write_reach_the_caller_whether_or_not_it_waited():
    async def fails_at_once() -> None:
        raise ConnectionResetError("closing transport")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ConnectionResetError("connection lost")

    for write in (fails_at_once, fails_later):
        with pytest.raises(ConnectionResetError):
            await send_within(write(), 5.0)


async def test_cancelling_the_sender_cancels_the_write_and_is_not_a_timeout():
    log: list[str] = []
    task = asyncio.ensure_future(send_within(never(log), 5.0))
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["cancelled"]


steps = st.lists(st.sampled_from(["yield", "future", "raise", "return"]), max_size=8)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_any_write_ends_as_it_would_when_awaited_directly(plan):
    """Property: a write of any shape (waits of either kind, an error or a value at any step) gives through
    send_within what awaiting it gives: the same value or exception and the same side effects."""

    async def write(log: list[str]) -> str:
        for step in plan:
            log.append(step)
            if step == "yield":
                await asyncio.sleep(0)
            elif step == "future":
                future = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_soon(future.set_result, None)
                await future
            elif step == "raise":
                raise ValueError("write failed")
            else:
                return "value"
        return "end"

    async def outcome(wrap: bool) -> tuple[object, list[str]]:
        log: list[str] = []
        try:
            if wrap:
                await send_within(write(log), 5.0)
                result: object = "returned"
            else:
                await write(log)
                result = "returned"
        except ValueError as exc:
            result = repr(exc)
        return result, log

    async def both() -> None:
        assert await outcome(True) == await outcome(False)

    asyncio.run(both())


class StuckStream:
    """A peer's stream whose socket takes nothing more: every write waits (flow control) forever."""

    closed = False

    def __init__(self) -> None:
        self.writes = 0

    async def send_bytes(self, frame: bytes) -> None:
        self.writes += 1
        await asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        self.closed = True


def transport(timeout_s: float = 0.05) -> ReplicationTransport:
    return ReplicationTransport(
        secret="s" * 32, me=Endpoint.parse("10.0.0.1:3000"), identity="me", timeout_s=timeout_s,
        learn=lambda *a: None, log=nodelog.get_logger(),
    )  # fmt: skip


async def test_a_stuck_peers_stream_is_closed_within_the_peer_timeout_and_the_batch_not_counted_sent():
    t = transport()
    peer = _Peer(PEER)
    stuck = StuckStream()
    peer.ws, peer.mac = stuck, codec.FrameMac(b"k" * 32, "10.0.0.1:3000", 1, 1)  # type: ignore[assignment]
    async with asyncio.TaskGroup() as tg:
        t._group = tg
        async with asyncio.timeout(10):  # the test's own bound
            sent = await t._send_frame(peer, [msg.HeartbeatAck(1, 1)], "")
        t._group = None
    assert sent is False and stuck.writes == 1
    assert peer.ws is None and peer.mac is None and stuck.closed  # the next batch opens a new stream or POSTs
    assert t.stats["frames"] == 0


async def test_new_work_wakes_one_idle_worker_and_the_next_wakes_another():
    peer = _Peer(PEER)
    woken: list[int] = []

    async def worker(n: int) -> None:
        await peer.wait_for_work()
        woken.append(n)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(worker(n)) for n in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        peer.put("", msg.HeartbeatAck(1, 1), {"dropped": 0})
        peer.put("", msg.HeartbeatAck(1, 2), {"dropped": 0})  # the woken one has not run: no second wake
        for _ in range(5):
            await asyncio.sleep(0)
        assert woken == [0]
        peer.put("", msg.HeartbeatAck(1, 3), {"dropped": 0})
        for _ in range(5):
            await asyncio.sleep(0)
        assert woken == [0, 1]
        tasks[2].cancel()
    assert not peer.waking


async def test_a_worker_cancelled_after_it_was_woken_does_not_hold_the_wake():
    peer = _Peer(PEER)
    first = asyncio.ensure_future(peer.wait_for_work())
    await asyncio.sleep(0)
    peer.wake_one()
    first.cancel()  # woken, cancelled before it ran
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.ensure_future(peer.wait_for_work())
    await asyncio.sleep(0)
    peer.wake_one()
    async with asyncio.timeout(5):
        await second


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 20), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12),
    st.booleans(),
)
def test_every_queued_message_is_sent_once_however_puts_and_sends_interleave(bursts, streamed):
    """Property: bursts of messages put between loop iterations, sends that finish at once (a stream) or
    after some waits (a POST): every message leaves exactly once, and once the last has left both workers
    are idle with nothing queued (no wake was lost)."""

    async def scenario() -> None:
        t = transport(timeout_s=5.0)
        sent: list[int] = []
        delays = iter(d for _, d, _ in bursts * 1000)

        async def send_frame(peer: _Peer, batch: list, cluster: str) -> bool:
            if not streamed:
                return False
            sent.extend(m.seq for m in batch)
            return True

        async def post(endpoint: Endpoint, batch: list, cluster: str = "") -> bool:
            for _ in range(next(delays, 0)):
                await asyncio.sleep(0)
            sent.extend(m.seq for m in batch)
            return True

        t._send_frame, t._post = send_frame, post  # type: ignore[method-assign]
        seq = 0
        async with asyncio.TaskGroup() as tg:
            t._group = tg
            peer = t._peer(PEER)
            for count, _, pause in bursts:
                for _ in range(count):
                    seq += 1
                    t.send(PEER, msg.HeartbeatAck(1, seq))
                for _ in range(pause):
                    await asyncio.sleep(0)
            for _ in range(10_000):  # bounded: every step of the workers is a loop iteration
                if len(sent) >= seq and len(peer.idle) == 2:
                    break
                await asyncio.sleep(0)
            assert sorted(sent) == list(range(1, seq + 1))
            assert not peer.queue and not peer.waking
            for task in peer.tasks:
                task.cancel()
            t._group = None

    asyncio.run(scenario())
