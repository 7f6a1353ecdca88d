"""ReplicatedDataService: the DataService (``node.service``) of a node with REPLICATION=on.

* ``submit``: stamps the write once, here, off the event loop (followers never re-stamp: the stamped
  command is the log entry), hands it to the Replicator as leader and answers when it is applied, with the
  real per-statement results, the epoch and the index. A follower never gets here for a client's write:
  the forwarding middleware (``node.http.replication``) sends it to the leader first; if it does (a leader
  change in between, or no healthy leader), the core's rejection is the answer (503 not_leader / no_quorum
  / not_writable with the core's reason).
* ``read``: ``none`` reads the local copy; ``weak`` / ``auto`` read the leader's local state (followers
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
from node.core.sqlreq import DbRequest, Flags, Level, stamp_write
from node.replication import codec
from node.service import LoadOutcome, WriteOutcome, WriteRequest
from node.storage.results import StatementResult
from node.storage.sqlite import Database
from node.storage.statemachine import Command

# Seconds a write waits for commit and apply before it answers "outcome unknown" (503). Far above a
# healthy commit (milliseconds); a node that loses its quorum answers sooner (see the Replicator).
WRITE_WAIT_S = 10.0
READ_CONFIRM_S = 5.0

# The epoch of the write this task just answered (read by the HTTP layer for its header).
ANSWERED_EPOCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("answered_epoch", default=None)


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
    ) -> None:
        self.database = database
        self.replicator = replicator
        self._wall_clock_ns = wall_clock_ns
        self._seeds = seeds

    def _database_first(self) -> None:
        """While this node's own database is being checked, or is corrupt, its replication waits for it: that
        is the reason to give (database_checking, database_corrupt), not the 'no leader' that follows."""
        if not self.database.is_open:
            self.database._require_ready()

    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome:
        self._database_first()
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
        return WriteOutcome(applied.results, epoch, applied.index, applied.duplicate)

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]:
        self._database_first()
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
