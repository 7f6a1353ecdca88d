"""AsyncLog: group commit of concurrent appends, a bounded queue that refuses, order, errors, close.

Coalescing is made deterministic with a gate on the first fsync: it waits (on an Event, with a deadline)
until every other writer has queued, so the second batch must hold all of them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest

from node.storage import log as logmod
from node.storage.asynclog import AsyncLog, LogBusy, LogClosed
from node.storage.hardstate import HardState, load_hard_state
from node.storage.log import DurableLog, LogDiskFull, LogEntry

_REAL_FDATASYNC = os.fdatasync
GATE_TIMEOUT_S = 30


def entry(index: int, epoch: int = 1) -> LogEntry:
    return LogEntry(epoch, index, 2, b"%d" % index)


class GatedFsync:
    """os.fdatasync stand-in: the first call blocks until ``release`` (bounded wait); counts calls."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.fail_with: int | None = None

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(GATE_TIMEOUT_S), "gate never released"
        if self.fail_with is not None:
            code, self.fail_with = self.fail_with, None
            raise OSError(code, os.strerror(code))
        _REAL_FDATASYNC(fd)


async def wait_for(predicate, what: str, timeout_s: float = 10) -> None:
    """Poll a condition on the loop with a deadline (bounded in count and time)."""
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def opener(tmp_path):
    return lambda: DurableLog.open(tmp_path / "log")


async def test_concurrent_appends_share_one_write_and_one_fsync(opener, tmp_path, monkeypatch):
    async with AsyncLog(opener) as log:
        await log.append_and_sync([entry(1)])  # segment creation's fsyncs happen before the gate is set
        gate = GatedFsync()
        monkeypatch.setattr(logmod.os, "fdatasync", gate)
        writers = 32
        first = asyncio.create_task(log.append_and_sync([entry(2)]))
        await wait_for(gate.entered.is_set, "the first fsync to start")
        rest = [asyncio.create_task(log.append_and_sync([entry(i)])) for i in range(3, writers + 2)]
        await wait_for(lambda: log.pending == writers - 1, "every writer to queue")
        gate.release.set()
        results = await asyncio.gather(first, *rest)
        assert results[0] == 2 and set(results[1:]) == {writers + 1}
        assert gate.calls == 2  # one fsync for the first writer, ONE for the 31 others
        assert log.stats["batches"] == 3 and log.stats["requests"] == writers + 1
        assert log.last == (1, writers + 1) and log.synced_index == writers + 1
    async with AsyncLog(opener) as log:
        assert await log.read(1, 1 << 20) == [entry(i) for i in range(1, writers + 2)]


async def test_full_queue_refuses_at_once(opener, monkeypatch):
    async with AsyncLog(opener, max_pending_requests=2) as log:
        await log.append_and_sync([entry(1)])
        gate = GatedFsync()
        monkeypatch.setattr(logmod.os, "fdatasync", gate)
        running = asyncio.create_task(log.append_and_sync([entry(2)]))
        await wait_for(gate.entered.is_set, "the first fsync to start")
        queued = [asyncio.create_task(log.append_and_sync([entry(i)])) for i in (3, 4)]
        await wait_for(lambda: log.pending == 2, "two queued")
        with pytest.raises(LogBusy, match="queue is full"):
            await log.append_and_sync([entry(5)])
        assert log.stats["busy"] == 1
        gate.release.set()
        assert await asyncio.gather(running, *queued) == [2, 4, 4]
        assert await log.append_and_sync([entry(5)]) == 5  # room again


async def test_queue_is_bounded_in_bytes_too(opener, monkeypatch):
    async with AsyncLog(opener, max_pending_bytes=1000) as log:
        gate = GatedFsync()
        monkeypatch.setattr(logmod.os, "fdatasync", gate)
        running = asyncio.create_task(log.append_and_sync([entry(1)]))
        await wait_for(gate.entered.is_set, "the first fsync to start")
        queued = asyncio.create_task(log.append_and_sync([LogEntry(1, 2, 0, b"x" * 600)]))
        await wait_for(lambda: log.pending == 1, "one queued")
        with pytest.raises(LogBusy):
            await log.append_and_sync([LogEntry(1, 3, 0, b"y" * 600)])
        gate.release.set()
        assert await asyncio.gather(running, queued) == [1, 2]


async def test_a_group_that_does_not_follow_fails_alone(opener, monkeypatch):
    async with AsyncLog(opener) as log:
        await log.append_and_sync([entry(1)])
        gate = GatedFsync()
        monkeypatch.setattr(logmod.os, "fdatasync", gate)
        first = asyncio.create_task(log.append_and_sync([entry(2)]))
        await wait_for(gate.entered.is_set, "the first fsync to start")
        good = asyncio.create_task(log.append_and_sync([entry(3), entry(4)]))
        bad = asyncio.create_task(log.append_and_sync([entry(9)]))
        also_good = asyncio.create_task(log.append_and_sync([entry(5)]))
        await wait_for(lambda: log.pending == 3, "three queued")
        gate.release.set()
        assert await first == 2 and await good == 5 and await also_good == 5
        with pytest.raises(ValueError, match="does not follow"):
            await bad
        assert [e.index for e in await log.read(1, 1 << 20)] == [1, 2, 3, 4, 5]


async def test_failed_sync_fails_the_whole_batch_and_leaves_nothing(opener, monkeypatch):
    async with AsyncLog(opener) as log:
        await log.append_and_sync([entry(1)])
        gate = GatedFsync()
        gate.fail_with = errno.ENOSPC
        monkeypatch.setattr(logmod.os, "fdatasync", gate)
        gate.release.set()
        batch = [asyncio.create_task(log.append_and_sync([entry(i)])) for i in (2, 3, 4)]
        outcomes = await asyncio.gather(*batch, return_exceptions=True)
        assert all(isinstance(o, LogDiskFull) for o in outcomes), outcomes  # one batch, one failed fsync
        assert log.last == (1, 1) and log.synced_index == 1
        # The writers retry the same entries once space is back.
        retry = [log.append_and_sync([entry(i)]) for i in (2, 3, 4)]
        assert await asyncio.gather(*retry) == [4, 4, 4]
        assert [e.index for e in await log.read(1, 1 << 20)] == [1, 2, 3, 4]


async def test_requests_run_in_arrival_order(opener, tmp_path):
    async with AsyncLog(opener) as log:
        order = []
        tasks = [
            asyncio.create_task(log.append_and_sync([entry(1), entry(2), entry(3)])),
            asyncio.create_task(log.truncate_after(1)),
            asyncio.create_task(log.append_and_sync([entry(2, epoch=2)])),
            asyncio.create_task(log.run(lambda dl: order.append(dl.last()))),
            asyncio.create_task(log.epoch_at(2)),
        ]
        results = await asyncio.gather(*tasks)
        assert results[0] == 3 and results[2] == 2 and results[4] == 2
        assert order == [(2, 2)]
        assert await log.free_bytes() > 0
        assert await log.compact(0) == 1
        await log.save_hard_state(tmp_path, HardState("me", 2, 2))
        assert load_hard_state(tmp_path, "me").epoch == 2


async def test_cancelled_waiter_does_not_withdraw_its_append(opener, monkeypatch):
    async with AsyncLog(opener) as log:
        gate = GatedFsync()
        monkeypatch.setattr(logmod.os, "fdatasync", gate)
        first = asyncio.create_task(log.append_and_sync([entry(1)]))
        await wait_for(gate.entered.is_set, "the first fsync to start")
        cancelled = asyncio.create_task(log.append_and_sync([entry(2)]))
        after = asyncio.create_task(log.append_and_sync([entry(3)]))
        await wait_for(lambda: log.pending == 2, "two queued")
        cancelled.cancel()
        gate.release.set()
        assert await first == 1 and await after == 3
        assert cancelled.cancelled()
        assert [e.index for e in await log.read(1, 1 << 20)] == [1, 2, 3]


async def test_close_drains_then_refuses(opener, monkeypatch):
    log = AsyncLog(opener)
    await log.start()
    gate = GatedFsync()
    monkeypatch.setattr(logmod.os, "fdatasync", gate)
    pending = [asyncio.create_task(log.append_and_sync([entry(i)])) for i in (1, 2, 3)]
    await wait_for(gate.entered.is_set, "the first fsync to start")
    closing = asyncio.create_task(log.close())
    await wait_for(lambda: log.closed, "close to begin")
    with pytest.raises(LogClosed):
        await log.append_and_sync([entry(4)])
    gate.release.set()
    await closing
    assert [await p for p in pending][-1] == 3
    with pytest.raises(LogClosed):
        await log.read(1, 10)


async def test_worker_cancelled_fails_every_waiter(opener, monkeypatch):
    log = AsyncLog(opener)
    await log.start()
    gate = GatedFsync()
    monkeypatch.setattr(logmod.os, "fdatasync", gate)
    pending = [asyncio.create_task(log.append_and_sync([entry(i)])) for i in (1, 2, 3)]
    await wait_for(gate.entered.is_set, "the first fsync to start")
    log._worker.cancel()
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(o, LogClosed) for o in outcomes)
    gate.release.set()
    await log.close()
    with pytest.raises(LogClosed):
        await log.append_and_sync([entry(1)])


async def test_open_failure_propagates_and_leaves_no_thread(tmp_path):
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "00000000000000000001.seg").write_bytes(b"not a segment at all, but long enough" * 3)
    log = AsyncLog(lambda: DurableLog.open(tmp_path / "log"))
    with pytest.raises(logmod.LogCorrupt):
        await log.start()
    assert not any(t.name.startswith("durable-log") for t in threading.enumerate())


async def test_requests_wake_the_thread_whether_it_sleeps_or_runs(opener):
    """The log thread sleeps only with nothing queued and is woken exactly once per sleep: requests queued
    one at a time (each finding it asleep), in bursts (most finding it busy) and mixed with calls all
    complete, in order, and close() wakes a sleeping thread."""
    async with AsyncLog(opener) as alog:
        index = 0
        for burst in [1, 1, 5, 1, 17, 2, 1, 64, 1, 3] * 5:
            futures, indices = [], []
            for _ in range(burst):
                index += 1
                indices.append(index)
                futures.append(alog.append_and_sync_future([entry(index)]))
            futures.append(alog.run_future(lambda log: log.last()))
            done = await asyncio.wait_for(asyncio.gather(*futures), GATE_TIMEOUT_S)
            synced = done[:-1]  # each the durable index after its batch: at least its own, in order
            assert all(s >= i for s, i in zip(synced, indices, strict=True)) and synced == sorted(synced)
            assert synced[-1] == index and done[-1] == (1, index)
            # Let the thread go back to sleep before the next burst (it has nothing left to do).
            await wait_for(lambda: alog._thread_idle, "the log thread to sleep")
        assert alog.stats["requests"] == index + 50
    assert alog._thread is not None and not alog._thread.is_alive()
