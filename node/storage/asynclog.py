"""The durable log seen from the event loop: one dedicated thread, one bounded queue, group commit.

Why: appending and fsyncing block for milliseconds; on the event loop they would delay heartbeats and cause
false elections. A :class:`~node.storage.log.DurableLog` is confined to one thread; this wrapper owns that
thread and feeds it from a queue.

Group commit: requests are executed strictly in arrival order. Consecutive ``append_and_sync`` requests that
are waiting when the thread becomes free are taken together (up to ``max_batch_bytes``) and cost ONE
``pwrite`` and ONE ``fdatasync``; while that fsync runs, new requests queue up and form the next batch. So N
concurrent writers cost about one fsync per fsync-time, not N. Every request in a batch is answered only
after the sync returned (never before it is durable); a group whose entries do not follow the log (wrong
index, decreasing epoch) fails alone with ``ValueError``; a write or sync error fails the whole batch and
leaves nothing of it in the log (see :mod:`node.storage.log`).

Bounded queue, overflow policy: at most ``max_pending_requests`` requests and ``max_pending_bytes`` of entry
bytes wait. Beyond that a new request fails at once with :class:`LogBusy` (the caller answers 503 Busy):
never blocks, never grows. After :meth:`AsyncLog.close` began, new requests fail with :class:`LogClosed`.

Cancellation: an accepted request is always executed, in order; cancelling its waiter only stops the wait.
(A queued append cannot be withdrawn: later appends were numbered after it.)

Ownership: :meth:`AsyncLog.start` creates the worker task, :meth:`AsyncLog.close` drains the queue, stops it
and closes the log; use ``async with`` (or start/close from the supervisor's TaskGroup-owned actor).

How the Replicator uses it (the order is the protocol; see the rules in :mod:`node.storage.log`):

* At start: ``load_or_create_identity(DATA_DIR)``, ``load_hard_state(DATA_DIR, identity)``, then
  ``AsyncLog(lambda: DurableLog.open(DATA_DIR / "log", reserve_bytes=...))``; :class:`LogCorrupt` means
  quarantine ``DATA_DIR/log`` and resync from the leader (the identity and hard state stay: they are outside
  it); :class:`LogVersionError` means refuse to start. Compare ``sqlite_version_at(i)`` with the running
  SQLite before applying entry ``i``.
* Before sending any message of a new epoch, or a promise: ``await save_hard_state(...)``.
* Leader: number the client commands (indices from ``last``), send them to followers from memory, and
  ``await append_and_sync(entries)`` concurrently; count its own copy toward the majority only when that
  returned. Concurrent client writes queued together share one write and one fsync.
* Follower: ``await truncate_after(prev_index)`` if the leader's entries diverge (never below commit), then
  ``await append_and_sync(entries)``, then ack the returned index.
* Catch-up: ``await read(next_index, max_bytes)``; :class:`LogCompacted` means send the snapshot.
* After any :class:`LogError` from an append: entries queued behind it were numbered after entries that are
  no longer in the log and fail with ``ValueError`` (does not follow). The in-memory log is then ahead of
  the disk: reset it from :attr:`last` (a leader steps down: it cannot commit what it cannot persist).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from node.storage.hardstate import HardState, save_hard_state
from node.storage.log import RECORD_OVERHEAD_BYTES, DurableLog, LogEntry, LogError

T = TypeVar("T")

DEFAULT_MAX_PENDING_REQUESTS = 4096
DEFAULT_MAX_PENDING_BYTES = 64 << 20
DEFAULT_MAX_BATCH_BYTES = 16 << 20


class LogBusy(LogError):
    """The log's queue is full: the request was not accepted; retry shortly (503 Busy)."""


class LogClosed(LogError):
    """The log is closing or closed: the request was not accepted (or its worker stopped before running it)."""


@dataclass(slots=True)
class _Request:
    future: asyncio.Future
    entries: Sequence[LogEntry] | None = None  # an append_and_sync
    fn: Callable[[DurableLog], Any] | None = None  # anything else, run on the log thread
    nbytes: int = 0


class AsyncLog:
    def __init__(
        self,
        opener: Callable[[], DurableLog],
        *,
        max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if max_pending_requests < 1 or max_pending_bytes < 1 or max_batch_bytes < 1:
            raise ValueError("queue and batch limits must be positive")
        self._opener = opener
        self._max_requests = max_pending_requests
        self._max_bytes = max_pending_bytes
        self._max_batch_bytes = max_batch_bytes
        self._queue: collections.deque[_Request] = collections.deque()
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._log: DurableLog | None = None
        self._worker: asyncio.Task | None = None
        self.last: tuple[int, int] = (0, 0)  # (epoch, index) after the last completed request
        self.synced_index = 0
        self.first_index = 1
        self.stats = {"requests": 0, "batches": 0, "busy": 0}

    async def __aenter__(self) -> AsyncLog:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the log on its own thread (recovery runs there) and start the worker."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="durable-log"
        )
        loop = asyncio.get_running_loop()
        try:
            self._log = await loop.run_in_executor(self._executor, self._open)
        except BaseException:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True)  # the thread is idle: joins at once
            raise
        self._worker = asyncio.create_task(self._run(), name="durable-log")

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, close the log and its thread."""
        self._closing = True
        self._wake.set()
        worker, self._worker = self._worker, None
        try:
            if worker is not None:
                try:
                    await worker
                except asyncio.CancelledError:
                    if not worker.cancelled():
                        raise  # close() itself was cancelled
                    # The worker was cancelled by its owner; its waiters were failed. Nothing else to report.
        finally:
            executor, self._executor = self._executor, None
            if executor is not None:
                if self._log is not None:
                    await asyncio.get_running_loop().run_in_executor(executor, self._log.close)
                await asyncio.to_thread(executor.shutdown, True)

    @property
    def closed(self) -> bool:
        """True once close() began or the worker stopped: every new request fails with LogClosed."""
        return self._closing

    # ---------------------------------------------------------------- requests

    async def append_and_sync(self, entries: Sequence[LogEntry]) -> int:
        """Append ``entries`` and return once they are durable, with the durable last index (>= theirs)."""
        nbytes = sum(RECORD_OVERHEAD_BYTES + len(e.payload) for e in entries)
        return await self._submit(
            _Request(asyncio.get_running_loop().create_future(), entries=entries, nbytes=nbytes)
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(log, *args)`` on the log thread, in order with every other request."""
        future = asyncio.get_running_loop().create_future()
        return await self._submit(_Request(future, fn=lambda log: fn(log, *args)))

    async def sync(self) -> int:
        return await self.run(DurableLog.sync)

    async def truncate_after(self, index: int) -> None:
        await self.run(DurableLog.truncate_after, index)

    async def read(self, from_index: int, max_bytes: int) -> list[LogEntry]:
        return await self.run(DurableLog.read, from_index, max_bytes)

    async def compact(self, upto_index: int) -> int:
        return await self.run(DurableLog.compact, upto_index)

    async def epoch_at(self, index: int) -> int:
        return await self.run(DurableLog.epoch_at, index)

    async def free_bytes(self) -> int:
        return await self.run(DurableLog.free_bytes)

    async def save_hard_state(self, directory: Path, state: HardState) -> None:
        """Persist the hard state on the log thread, in order with the appends queued before it; returns once
        durable. Await it before sending any message of a new epoch or any promise (rule 1 in node.storage.log)."""
        await self.run(lambda _log: save_hard_state(directory, state))

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ---------------------------------------------------------------- worker

    async def _submit(self, request: _Request) -> Any:
        if self._closing or self._worker is None or self._worker.done():
            raise LogClosed("the log is closed")
        if len(self._queue) >= self._max_requests or (
            self._queue and self._pending_bytes + request.nbytes > self._max_bytes
        ):
            self.stats["busy"] += 1
            raise LogBusy(f"the log queue is full ({len(self._queue)} requests, {self._pending_bytes} bytes)")
        self._queue.append(request)
        self._pending_bytes += request.nbytes
        self.stats["requests"] += 1
        self._wake.set()
        return await request.future

    def _take_batch(self) -> list[_Request]:
        first = self._queue.popleft()
        batch = [first]
        nbytes = first.nbytes
        if first.entries is not None:
            # Bounded by the queue length and by max_batch_bytes.
            while self._queue and self._queue[0].entries is not None:
                if nbytes + self._queue[0].nbytes > self._max_batch_bytes:
                    break
                batch.append(self._queue.popleft())
                nbytes += batch[-1].nbytes
        self._pending_bytes -= nbytes
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Request] = []
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._take_batch()
                if batch[0].entries is not None:
                    groups = [r.entries or () for r in batch]
                    try:
                        results, synced = await loop.run_in_executor(
                            self._executor, self._append_sync, groups
                        )
                    except LogError as exc:
                        for r in batch:
                            _settle(r, exc=exc)
                    else:
                        self.stats["batches"] += 1
                        for r, err in zip(batch, results, strict=True):
                            _settle(r, exc=err) if err is not None else _settle(r, synced)
                else:
                    fn = batch[0].fn
                    assert fn is not None
                    try:
                        result = await loop.run_in_executor(self._executor, self._call, fn)
                    except (LogError, OSError, ValueError, IndexError) as exc:
                        _settle(batch[0], exc=exc)
                    else:
                        _settle(batch[0], result)
                batch = []
        except BaseException as exc:
            # Cancelled, or a bug: fail every waiter (none may hang), then let the owner see the exception.
            closed = LogClosed(f"the log worker stopped: {exc!r}")
            for r in [*batch, *self._queue]:
                _settle(r, exc=closed)
            self._queue.clear()
            self._pending_bytes = 0
            self._closing = True
            raise

    # These run on the log thread.

    def _open(self) -> DurableLog:
        log = self._opener()
        self._note(log)
        return log

    def _append_sync(self, groups: list[Sequence[LogEntry]]) -> tuple[list[Exception | None], int]:
        assert self._log is not None
        results = self._log.append_groups(groups)
        try:
            synced = self._log.sync()
        finally:
            self._note(self._log)
        return results, synced

    def _call(self, fn: Callable[[DurableLog], T]) -> T:
        assert self._log is not None
        try:
            return fn(self._log)
        finally:
            self._note(self._log)

    def _note(self, log: DurableLog) -> None:
        # Plain attribute stores of immutable values: safe to read from the loop between requests.
        if log.failure is None:
            self.last = log.last()
            self.synced_index = log.synced_index
            self.first_index = log.first_index


def _settle(request: _Request, result: Any = None, exc: BaseException | None = None) -> None:
    if request.future.done():
        return  # the waiter was cancelled; the request still ran
    if exc is not None:
        request.future.set_exception(exc)
    else:
        request.future.set_result(result)
