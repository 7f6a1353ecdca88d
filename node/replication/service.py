"""ReplicatedDataService: the DataService (``node.service``) of a node with REPLICATION=on.

* ``submit``: stamps the write once, here, off the event loop (followers never re-stamp: the stamped
  command is the log entry), hands it to the Replicator as leader and answers when it is applied, with the
  real per-statement results, the epoch and the index. A follower never gets here for a client's write:
  the forwarding middleware (``node.http.replication``) sends it to the leader first; if it does (a leader
  change in between, or no healthy leader), the core's rejection is the answer (503 not_leader / no_quorum
  / not_writable with the core's reason).
* ``read``: ``none`` reads the local copy (with ``freshness``, only if this node heard from the leader
  within that time, and with ``freshness_strict`` has also applied what that leader had committed; else
  503 ``stale_read``, see :func:`staleness`); ``weak`` / ``auto`` read the leader's local state (followers
  forward, see the middleware); ``linearizable`` / ``strong`` first have a majority confirm that this node
  still leads (ReadIndex), wait until that index is applied, then read locally.
* Loads (/db/load) are not replicated yet: they answer 501 rather than change one copy only.

The epoch of each answered write is published in a context variable so the HTTP layer can name it in a
header (``X-TalentNest-Epoch``) without changing the DataService protocol.
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from node import errors
from node.actors.replicator import Replicator
from node.core.replication import machine
from node.core.sqlreq import DbRequest, Flags, Level, stamp_write
from node.replication import codec
from node.service import LoadOutcome, WriteOutcome, WriteRequest
from node.storage.durable import free_bytes
from node.storage.results import StatementResult
from node.storage.sqlite import Database
from node.storage.statemachine import Command

# Seconds a write waits for commit and apply before it answers "outcome unknown" (503). Far above a
# healthy commit (milliseconds); a node that loses its quorum answers sooner (see the Replicator).
WRITE_WAIT_S = 10.0
READ_CONFIRM_S = 5.0
# How long one look at DATA_DIR's free space (for LOG_RESERVE_BYTES) is trusted before the next, off the loop.
SPACE_CHECK_S = 0.5

# The epoch of the write this task just answered (read by the HTTP layer for its header).
ANSWERED_EPOCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("answered_epoch", default=None)


class StaleRead(errors.NodeError):
    """A ``level=none`` read with ``freshness`` on a node that cannot show it is fresh enough. 503, not 200
    with an error per statement as rqlite answers: nothing ran, and another node (or later) may serve it."""

    status = 503
    code = "stale_read"


def staleness(
    status: machine.Status | None, applied_index: int, now: float, freshness_s: float, strict: bool
) -> str | None:
    """Why a ``level=none`` read bounded by ``freshness_s`` must not be served here (None: serve it).

    ``now`` and ``status.leader_contact_s`` are the same monotonic clock (the Replicator's loop clock).
    A writable leader always passes (rqlite ignores freshness on the leader); a leader that is not writable
    (it lost majority contact, or is handing over) does not, since another node may lead by now.
    """
    if status is None:
        return "stale read: this node has not joined a cluster yet"
    if status.role == machine.LEADER:
        return None if status.writable else "stale read: this node leads but has no majority contact"
    if status.leader_contact_s == machine.NEVER:
        return "stale read: this node has not heard from a leader since it started"
    since_s = max(0.0, now - status.leader_contact_s)
    if since_s > freshness_s:
        return f"stale read: last contact with the leader {since_s:.1f} s ago > freshness {freshness_s:g}s"
    if strict and applied_index < status.leader_commit:
        return (
            f"stale read: applied index {applied_index} is behind the leader's commit index "
            f"{status.leader_commit} (freshness_strict)"
        )
    return None


class NotImplementedYet(errors.NodeError):
    status = 501
    code = "not_implemented"


class ReplicatedDataService:
    def __init__(
        self,
        database: Database,
        replicator: Replicator,
        *,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        seeds: Callable[[], int] = lambda: secrets.randbits(63),
        log_reserve_bytes: int = 0,
    ) -> None:
        self.database = database
        self.replicator = replicator
        # The Replicator's log has no reserve of its own (an append that fails stops the node), so writes are
        # refused here, before they are stamped, while DATA_DIR has less than the reserve free.
        self._reserve_bytes = log_reserve_bytes
        self._space_checked_s = float("-inf")
        self._space_short: str | None = None
        self._wall_clock_ns = wall_clock_ns
        self._seeds = seeds

    async def _require_reserve(self) -> None:
        if self._reserve_bytes <= 0:
            return
        now = time.monotonic()
        if now - self._space_checked_s >= SPACE_CHECK_S:
            self._space_checked_s = now  # before the await: concurrent writes use this verdict meanwhile
            try:
                free = await asyncio.to_thread(free_bytes, self.database.data_dir)
            except OSError:
                free = None  # unreadable DATA_DIR: the log append reports the real problem
            reserve = self._reserve_bytes
            self._space_short = (
                None
                if free is None or free >= reserve
                else f"DATA_DIR has {free} bytes free, below LOG_RESERVE_BYTES ({reserve}); nothing was stored"
            )
        if self._space_short is not None:
            raise errors.InsufficientStorage(self._space_short)

    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome:
        await self._require_reserve()
        time_ns, seed = self._wall_clock_ns(), self._seeds()
        db_request = DbRequest(request.statements, Flags(transaction=request.transaction))

        def prepare() -> bytes:
            write = stamp_write(db_request, time_ns=time_ns, seed=seed)
            command = Command(write, unified=request.unified, client=client, request_id=request.request_id)
            return codec.encode_command(command)

        # Stamping and encoding are per-character work: never on the event loop.
        payload = await asyncio.to_thread(prepare)
        epoch, index, applied = await self.replicator.submit(payload, WRITE_WAIT_S)
        ANSWERED_EPOCH.set(epoch)
        assert applied is not None
        return WriteOutcome(applied.results, epoch, applied.index, applied.duplicate, applied.committed)

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]:
        freshness_s = request.flags.freshness_s
        if level is Level.NONE and freshness_s is not None:
            why = staleness(
                self.replicator.status(), self.replicator.applied_index, asyncio.get_running_loop().time(),
                freshness_s, request.flags.freshness_strict,
            )  # fmt: skip
            if why is not None:
                raise StaleRead(why)
        if level in (Level.LINEARIZABLE, Level.STRONG):
            await self.replicator.confirm_read(READ_CONFIRM_S)
        elif level is not Level.NONE and not self.replicator.is_leader():
            # The middleware forwards weak/auto reads to a healthy leader; here there is none to ask.
            status = self.replicator.status()
            raise errors.NotLeader(
                "no healthy leader to serve a weak read; use level=none for this node's copy",
                None if status is None else self.replicator._url(status.leader),
            )
        return await self.database.query(request, client=client)

    async def load_dump_file(self, path: Path) -> LoadOutcome:
        raise NotImplementedYet("/db/load is not replicated yet; with REPLICATION=on it is refused")

    async def load_sqlite_file(self, path: Path) -> LoadOutcome:
        raise NotImplementedYet("/db/load is not replicated yet; with REPLICATION=on it is refused")
