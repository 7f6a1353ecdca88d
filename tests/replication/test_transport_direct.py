"""The transport writes what was queued in a loop step to the peer's open stream at the end of that step,
without waking a worker; a write that has to wait (flow control) goes on in a task of its own and the
workers take over behind it. Frames leave strictly in queue order and numbered order whatever the
interleaving of sends, waits and workers; a failed write loses nothing; the write lock is FIFO."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.replication import codec
from node.replication.transport import ReplicationTransport, WriteLock, _Peer
from node.runtime import logging as nodelog

PEER = Endpoint.parse("10.0.0.2:3000")
ME = "10.0.0.1:3000"
KEY = b"k" * 32


class FakeStream:
    """A peer's stream as aiohttp's is: a frame's bytes reach the socket's buffer in the write's first step;
    then the write may wait (the buffer is full: flow control) for some loop iterations, or fail."""

    def __init__(self, delays: Iterator[int], fail_at: int | None = None) -> None:
        self.frames: list[bytes] = []
        self.closed = False
        self.delays = delays
        self.fail_at = fail_at
        self.writing = False
        self.overlaps = 0  # a write begun while another still waited: two writers at once

    async def send_bytes(self, frame: bytes) -> None:
        if self.fail_at is not None and len(self.frames) + 1 >= self.fail_at:
            raise ConnectionResetError("Cannot write to closing transport")
        if self.writing:
            self.overlaps += 1
        self.frames.append(frame)
        delay = next(self.delays, 0)
        if delay:
            self.writing = True
            try:
                for _ in range(delay):
                    await asyncio.sleep(0)
            finally:
                self.writing = False

    async def close(self) -> None:
        self.closed = True


def transport(timeout_s: float = 5.0) -> ReplicationTransport:
    return ReplicationTransport(
        secret="s" * 32, me=Endpoint.parse(ME), identity="me", timeout_s=timeout_s,
        learn=lambda *a: None, log=nodelog.get_logger(),
    )  # fmt: skip


def read_frames(frames: list[bytes]) -> list[int]:
    """The HeartbeatAck numbers the frames carry, in frame order; every frame must verify in its turn."""
    mac = codec.FrameMac(KEY, ME, 1, 1)
    out: list[int] = []
    for number, frame in enumerate(frames, 1):
        out.extend(m.seq for m in codec.decode_batch(codec.decode_frame(mac, number, frame)).messages)
    return out


def attach(t: ReplicationTransport, stream: FakeStream) -> _Peer:
    peer = t._peer(PEER)
    peer.ws, peer.mac = stream, codec.FrameMac(KEY, ME, 1, 1)  # type: ignore[assignment]
    return peer


def posts_only(t: ReplicationTransport, on_post: Callable[[], None] = lambda: None) -> list[int]:
    """No stream is opened again and what would be POSTed is recorded instead (its numbers, in order):
    the fate of a batch whose stream write failed."""
    posted: list[int] = []

    async def post(endpoint: Endpoint, batch: list, cluster: str = "") -> bool:
        posted.extend(m.seq for m in batch)
        on_post()
        return True

    async def no_stream(peer: _Peer) -> None:
        return None

    t._post, t._open_stream = post, no_stream  # type: ignore[method-assign, assignment]
    return posted


async def settle(done, what: str) -> None:
    for _ in range(20_000):  # bounded: every step of the writes and workers is a loop iteration
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never settled: {what}")


async def stop(t: ReplicationTransport, peer: _Peer) -> None:
    for task in peer.tasks:
        task.cancel()
    t._group = None


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 12), st.integers(0, 4)), min_size=1, max_size=12),
    st.lists(st.integers(0, 5), max_size=40),
)
def test_frames_leave_in_queue_order_however_sends_and_waits_interleave(bursts, delays):
    """Property: bursts of sends between loop iterations, frame writes that finish at once or wait any
    number of iterations: every message arrives once, in the order it was sent, in frames numbered 1, 2,
    3... that verify; never two writes at once; afterwards the lock is free, nothing is queued and both
    workers are idle."""

    async def scenario() -> None:
        t = transport()
        stream = FakeStream(iter(delays))
        posted: list[msg.Message] = []

        async def post(endpoint: Endpoint, batch: list, cluster: str = "") -> bool:
            posted.extend(batch)
            return True

        t._post = post  # type: ignore[method-assign]
        seq = 0
        async with asyncio.TaskGroup() as tg:
            t._group = tg
            peer = attach(t, stream)
            for count, pause in bursts:
                for _ in range(count):
                    seq += 1
                    t.send(PEER, msg.HeartbeatAck(1, seq))
                for _ in range(pause):
                    await asyncio.sleep(0)
            await settle(
                lambda: (
                    len(read_frames(stream.frames)) >= seq
                    and not peer.ws_lock.locked()
                    and len(peer.idle) == 2
                ),
                "every message written and the workers idle",
            )
            assert read_frames(stream.frames) == list(range(1, seq + 1))
            assert stream.overlaps == 0 and not posted and not peer.queue and not peer.waking
            assert t.stats["messages"] == seq and t.stats["frames"] == len(stream.frames)
            await stop(t, peer)

    asyncio.run(scenario())


async def test_messages_queued_in_one_step_go_as_one_frame_written_at_the_end_of_the_step_by_no_worker():
    t = transport()
    stream = FakeStream(iter(()))
    async with asyncio.TaskGroup() as tg:
        t._group = tg
        peer = attach(t, stream)
        await settle(lambda: len(peer.idle) == 2, "the workers idle")
        for seq in (1, 2, 3):
            t.send(PEER, msg.HeartbeatAck(1, seq))
        assert stream.frames == []  # not during the step that queued them
        await asyncio.sleep(0)
        assert read_frames(stream.frames) == [1, 2, 3] and len(stream.frames) == 1
        assert len(peer.idle) == 2 and not peer.waking  # no worker was woken for it
        await stop(t, peer)


async def test_a_write_that_fails_at_once_closes_the_stream_and_its_messages_are_posted_in_order():
    t = transport()
    stream = FakeStream(iter(()), fail_at=2)
    posted = posts_only(t)
    async with asyncio.TaskGroup() as tg:
        t._group = tg
        peer = attach(t, stream)
        t.send(PEER, msg.HeartbeatAck(1, 1))
        await asyncio.sleep(0)
        for seq in (2, 3):
            t.send(PEER, msg.HeartbeatAck(1, seq))
        await settle(lambda: len(posted) >= 2, "the failed frame's messages posted")
        assert read_frames(stream.frames) == [1] and posted == [2, 3]
        assert peer.ws is None and peer.mac is None and stream.closed
        assert not peer.ws_lock.locked()
        await stop(t, peer)


async def test_a_write_that_waits_past_the_peer_timeout_closes_the_stream_and_its_batch_is_posted():
    t = transport(timeout_s=0.05)
    stream = FakeStream(iter([10**9]))  # the first write waits (practically) forever
    first_posted = asyncio.Event()
    posted = posts_only(t, first_posted.set)
    async with asyncio.TaskGroup() as tg:
        t._group = tg
        peer = attach(t, stream)
        t.send(PEER, msg.HeartbeatAck(1, 1))
        await asyncio.sleep(0)
        assert peer.ws_lock.locked() and read_frames(stream.frames) == [1]  # written; waits in a task
        t.send(PEER, msg.HeartbeatAck(1, 2))  # never blocks: queued behind it
        await asyncio.sleep(0)
        assert read_frames(stream.frames) == [1]  # not written while the first write waits
        async with asyncio.timeout(10):  # the test's own bound
            await first_posted.wait()
        assert peer.ws is None and stream.closed and t.stats["frames"] == 0
        await settle(lambda: 2 in posted, "the message queued behind it sent")
        assert sorted(posted) == [1, 2]
        await stop(t, peer)


async def test_the_write_lock_is_handed_over_in_order_and_a_cancelled_waiter_passes_it_on():
    lock = WriteLock()
    assert lock.try_acquire() and not lock.try_acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        await lock.acquire()
        order.append(name)
        lock.release()

    first = asyncio.ensure_future(take("first"))
    cancelled = asyncio.ensure_future(take("cancelled"))
    last = asyncio.ensure_future(take("last"))
    await asyncio.sleep(0)
    lock.release()  # handed to "first": still held, nobody can take it meanwhile
    assert lock.locked() and not lock.try_acquire()
    cancelled.cancel()
    async with asyncio.timeout(5):
        await first
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await last
    assert order == ["first", "last"] and not lock.locked()


async def test_a_waiter_handed_the_lock_then_cancelled_before_it_ran_passes_it_on():
    lock = WriteLock()
    lock.try_acquire()
    handed = asyncio.ensure_future(lock.acquire())
    after = asyncio.ensure_future(lock.acquire())
    await asyncio.sleep(0)
    lock.release()  # handed to the first waiter...
    handed.cancel()  # ...which is cancelled before it ran
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await handed
        await after
    assert lock.locked()
    lock.release()
    assert not lock.locked()


def test_a_send_with_no_loop_running_only_queues_the_message():
    """Outside a running loop nothing can be written: the message waits in the queue for the workers."""
    t = transport()
    t.send(PEER, msg.HeartbeatAck(1, 1))
    peer = t._peers[PEER]
    assert [m for _, m in peer.queue] == [msg.HeartbeatAck(1, 1)]
    assert not peer.flush_due and t._due == []


async def test_a_stream_that_is_not_open_leaves_the_queue_to_a_woken_worker():
    t = transport()
    sent: list[int] = []

    async def send_frame(peer: _Peer, batch: list, cluster: str) -> bool:
        sent.extend(m.seq for m in batch)
        return True

    t._send_frame = send_frame  # type: ignore[method-assign]
    async with asyncio.TaskGroup() as tg:
        t._group = tg
        peer = t._peer(PEER)  # no stream (peer.ws is None)
        await settle(lambda: len(peer.idle) == 2, "the workers idle")
        t.send(PEER, msg.HeartbeatAck(1, 1))
        t.send(PEER, msg.HeartbeatAck(1, 2))
        await settle(lambda: sent == [1, 2], "the worker's frame")
        await stop(t, peer)
