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

Ownership: :meth:`AsyncLog.start` starts the log thread and the task that owns it (cancelling that task fails
every waiter), :meth:`AsyncLog.close` drains the queue, stops the thread and closes the log; use
``async with`` (or start/close from the supervisor's TaskGroup-owned actor). ``append_and_sync_future`` and
``run_future`` queue a request at once, without an await, so the thread can start on it at once.

How the Replicator uses it (the order is the protocol; see the rules in :mod:`node.storage.log`):

* At start: ``AsyncLog(lambda: DurableLog.open(DATA_DIR / "log", reserve_bytes=...))`` beside the database's
  check, then ``load_or_create_identity(DATA_DIR)`` and the hard state; :class:`LogCorrupt` means quarantine
  the whole replicated state (log, database, hard state, identity: one event) and rejoin the cluster as a new
  member (``node.replication.startup``); :class:`LogVersionError` means refuse to start. Compare
  ``sqlite_version_at(i)`` with the running SQLite before applying entry ``i``.
* Before sending any message of a new epoch, or a promise: ``await save_hard_state(...)``.
* Leader: number the client commands (indices from ``last``), send them to followers from memory, and
  ``await append_and_sync(entries)`` concurrently; count its own copy toward the majority only when that
  returned. Concurrent client writes queued together share one write and one fsync.
* Follower: ``await truncate_after(prev_index)`` if the leader's entries diverge (never below commit), then
  ``await append_and_sync(entries)``, then ack the returned index.
* Catch-up: ``await read(next_index, max_bytes)``; :class:`LogCompacted` means send the snapshot.
* After installing a snapshot of index ``i`` (epoch ``e``): ``await reset(i, e)``, then append what is kept.
* After any :class:`LogError` from an append: entries queued behind it were numbered after entries that are
  no longer in the log and fail with ``ValueError`` (does not follow). The in-memory log is then ahead of
  the disk: reset it from :attr:`last` (a leader steps down: it cannot commit what it cannot persist).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import operator
import threading
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

_payload = operator.attrgetter("payload")


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
        # Shared with the log thread, under _lock: the queue, its byte count, the batch the thread runs, and
        # whether the thread is to stop once the queue is empty.
        self._lock = threading.Lock()
        # The log thread sleeps on _wakeup (held while it sleeps; released once to wake it) rather than on a
        # Condition: a Condition's wait and notify are Python code with a fresh lock per wait, paid for every
        # request that finds the thread idle; acquiring and releasing one lock are single C calls.
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._queue: collections.deque[_Request] = collections.deque()
        self._pending_bytes = 0
        self._running: list[_Request] = []
        self._stop_thread = False
        # True (under _lock) from when the log thread found nothing to do until a waker clears it and releases
        # _wakeup: exactly one release per sleep, so _wakeup is never released twice (a request queued while
        # the thread runs a batch needs no wake-up at all).
        self._thread_idle = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future | None = None  # set (from the thread) once the thread closed the log
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
        """Start the log thread (it opens the log: recovery runs there) and the task that owns it."""
        loop = self._loop = asyncio.get_running_loop()
        opened: asyncio.Future = loop.create_future()
        self._exited = loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(opened,), name="durable-log", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.shield(opened)
        except BaseException:
            self._closing = True
            with self._lock:
                self._stop_thread = True  # if the open succeeded after all (start() was cancelled)
                self._wake_thread()
            await asyncio.to_thread(self._thread.join)  # returns at once: nothing was queued
            raise
        self._worker = asyncio.create_task(self._watch(), name="durable-log")

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, close the log and its thread."""
        self._closing = True
        with self._lock:
            self._stop_thread = True
            self._wake_thread()
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
            thread = self._thread
            if thread is not None:
                await asyncio.to_thread(thread.join)  # ends after the batch it runs (bounded by one fsync)

    @property
    def closed(self) -> bool:
        """True once close() began or the worker stopped: every new request fails with LogClosed."""
        return self._closing

    # ---------------------------------------------------------------- requests

    def append_and_sync_future(self, entries: Sequence[LogEntry]) -> asyncio.Future:
        """Queue an append at once (the log thread may start on it before the caller's next await) and return
        the future of its durable last index. Raises LogBusy or LogClosed at once if it was not accepted."""
        nbytes = RECORD_OVERHEAD_BYTES * len(entries) + sum(map(len, map(_payload, entries)))
        assert self._loop is not None
        return self._enqueue(_Request(self._loop.create_future(), entries=entries, nbytes=nbytes))

    def run_future(self, fn: Callable[..., T], *args: Any) -> asyncio.Future:
        """Queue ``fn(log, *args)`` for the log thread, in order with every other request; its future."""
        assert self._loop is not None
        return self._enqueue(_Request(self._loop.create_future(), fn=lambda log: fn(log, *args)))

    async def append_and_sync(self, entries: Sequence[LogEntry]) -> int:
        """Append ``entries`` and return once they are durable, with the durable last index (>= theirs)."""
        return await self.append_and_sync_future(entries)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(log, *args)`` on the log thread, in order with every other request."""
        return await self.run_future(fn, *args)

    async def sync(self) -> int:
        return await self.run(DurableLog.sync)

    async def truncate_after(self, index: int) -> None:
        await self.run(DurableLog.truncate_after, index)

    async def read(self, from_index: int, max_bytes: int) -> list[LogEntry]:
        return await self.run(DurableLog.read, from_index, max_bytes)

    async def compact(self, upto_index: int) -> int:
        return await self.run(DurableLog.compact, upto_index)

    async def reset(self, base_index: int, base_epoch: int) -> None:
        """Empty the log so that it continues after an installed snapshot (see DurableLog.reset)."""
        await self.run(DurableLog.reset, base_index, base_epoch)

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
        """Requests accepted and not yet taken by the log thread."""
        return len(self._queue)

    # ---------------------------------------------------------------- the loop's side

    def _enqueue(self, request: _Request) -> asyncio.Future:
        if self._closing or self._worker is None or self._worker.done():
            raise LogClosed("the log is closed")
        with self._lock:
            if len(self._queue) >= self._max_requests or (
                self._queue and self._pending_bytes + request.nbytes > self._max_bytes
            ):
                self.stats["busy"] += 1
                raise LogBusy(
                    f"the log queue is full ({len(self._queue)} requests, {self._pending_bytes} bytes)"
                )
            self._queue.append(request)
            self._pending_bytes += request.nbytes
            self._wake_thread()
        self.stats["requests"] += 1
        return request.future

    async def _watch(self) -> None:
        """The task that owns the thread: done when the thread is. Cancelled (by its owner), it fails every
        waiter (none may hang), refuses new requests and lets the thread end after the batch it runs."""
        assert self._exited is not None
        try:
            await asyncio.shield(self._exited)
        except asyncio.CancelledError:
            closed = LogClosed("the log worker stopped: cancelled")
            with self._lock:
                self._closing = self._stop_thread = True
                waiting = [*self._running, *self._queue]
                self._queue.clear()
                self._pending_bytes = 0
                self._wake_thread()
            for r in waiting:
                _settle(r, exc=closed)
            raise

    def _wake_thread(self) -> None:
        """Under _lock: wake the log thread if it sleeps (there is something new for it to look at)."""
        if self._thread_idle:
            self._thread_idle = False
            self._wakeup.release()

    def _settle_batch(self, batch: list[_Request], outcomes: list[tuple[Any, BaseException | None]]) -> None:
        if batch[0].entries is not None:
            self.stats["batches"] += 1
        for r, (result, exc) in zip(batch, outcomes, strict=True):
            _settle(r, result, exc)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """From the thread: run ``callback`` on the loop (dropped if the loop is gone: nobody waits then)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop was closed
            self._loop.call_soon_threadsafe(callback, *args)

    # ---------------------------------------------------------------- the log thread
    #
    # Why a thread of its own fed directly, not a task handing work to an executor: a write then starts on
    # the thread as soon as it is queued, instead of after two more turns of a busy event loop (a task to
    # queue it, a task to take it); on a loaded machine those turns were most of a write's latency.

    def _thread_main(self, opened: asyncio.Future) -> None:
        assert self._exited is not None
        try:
            self._log = self._opener()
            self._note(self._log)
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it
            self._post(_set_exception, opened, exc)
            return
        self._post(_set_result, opened, None)
        try:
            while True:
                with self._lock:
                    sleep = self._thread_idle = not self._queue and not self._stop_thread
                if sleep:
                    self._wakeup.acquire()  # until a waker cleared _thread_idle and released it
                with self._lock:
                    if not self._queue:
                        if self._stop_thread:
                            break  # asked to stop, and nothing left
                        continue
                    batch = self._running = self._take_batch()
                outcomes = self._execute(batch)
                with self._lock:
                    self._running = []
                self._post(self._settle_batch, batch, outcomes)
        finally:
            with contextlib.suppress(Exception):
                self._log.close()
            self._post(_set_result, self._exited, None)

    def _take_batch(self) -> list[_Request]:
        """Under _lock: the next request, and consecutive appends after it up to max_batch_bytes."""
        first = self._queue.popleft()
        batch = [first]
        nbytes = first.nbytes
        if first.entries is not None:
            while self._queue and self._queue[0].entries is not None:
                if nbytes + self._queue[0].nbytes > self._max_batch_bytes:
                    break
                batch.append(self._queue.popleft())
                nbytes += batch[-1].nbytes
        self._pending_bytes -= nbytes
        return batch

    def _execute(self, batch: list[_Request]) -> list[tuple[Any, BaseException | None]]:
        if batch[0].entries is not None:
            groups = [r.entries or () for r in batch]
            try:
                results, synced = self._append_sync(groups)
            except LogError as exc:
                return [(None, exc)] * len(batch)
            return [(None, err) if err is not None else (synced, None) for err in results]
        fn = batch[0].fn
        assert fn is not None
        try:
            return [(self._call(fn), None)]
        except Exception as exc:  # noqa: BLE001 - the caller's to handle (a bug there is raised there)
            return [(None, exc)]

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


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _settle(request: _Request, result: Any = None, exc: BaseException | None = None) -> None:
    if request.future.done():
        return  # the waiter was cancelled; the request still ran
    if exc is not None:
        request.future.set_exception(exc)
    else:
        request.future.set_result(result)
