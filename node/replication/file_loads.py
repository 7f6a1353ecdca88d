"""The Replicator's side of staged SQLite-file loads (``/db/load`` of a whole file, see
:mod:`node.replication.staged_loads` for the files, their staging and their fetching).

:class:`FileLoads` is owned by the Replicator, which creates it, forwards to it, and gives it what it needs
through narrow callables (the members to fetch a missed file from). It does four things:

* **apply** a committed ``LoadFile`` entry (:meth:`FileLoads.apply`): the staged file (fetched first from a
  member that holds it, if this node missed the staging) is copied, stamped with the entry's index and the
  load's request ID and swapped in, the same on every replica; a retry of a load already applied (its
  request ID is in the database) loads nothing again and answers the first outcome. Any failure raises:
  the Replicator's applier retries it (a local failure is never a result);
* **fetch** a staged file this node missed, with a backoff doubling from FILE_FETCH_RETRY_FIRST_S up to
  FILE_FETCH_RETRY_MAX_S between attempts;
* **stage** a file the leader asks this node to hold (``POST /cluster/replication/stage``,
  :meth:`FileLoads.stage`): one download at a time, refused (507) when DATA_DIR has less than
  STAGE_SPACE_FACTOR times the file's size free;
* **prune** staged files whose entry the log no longer holds (:meth:`FileLoads.prune`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node import errors
from node.core.ids import Endpoint
from node.core.replication import machine
from node.core.replication import messages as msg
from node.replication import snapshot_transfer as transfer
from node.replication import staged_loads
from node.replication.snapshotting import Snapshots
from node.storage import results as res
from node.storage import statemachine
from node.storage.durable import free_bytes
from node.storage.sqlite import Database, RequestRow
from node.storage.statemachine import Applied

# A node staging a load file wants about this many times its size free: the staged file and the copy a
# load swaps in (plus the old database until the swap).
STAGE_SPACE_FACTOR = 2
# A load file this node lacks when its entry is due: fetched again after a pause doubling up to the max.
FILE_FETCH_RETRY_FIRST_S = 0.5
FILE_FETCH_RETRY_MAX_S = 8.0


def load_sources(
    state: machine.State | None, identity: str | None, url_of: Callable[[str | None], str | None]
) -> list[str]:
    """Where a missing staged file may be: the leader first, then every other member."""
    s = state
    if s is None:
        return []
    order = [machine.status(s).leader, *sorted(s.config.voters), *sorted(s.config.learners)]
    urls: list[str] = []
    for member in order:
        url = None if member is None or member == identity else url_of(member)
        if url is not None and url not in urls:
            urls.append(url)
    return urls


class FileLoads:
    def __init__(
        self,
        *,
        data_dir: Path,
        database: Database,
        snapshots: Snapshots,
        log: Any,
        sources: Callable[[], list[str]],
    ) -> None:
        self.data_dir = data_dir
        self.database = database
        self.snapshots = snapshots  # holds the staged files (``loads``), the peer signer and the rate limit
        self.log = log
        self._sources = sources  # the members' URLs to fetch a missed file from, the leader first
        # One staged-load download at a time (POST /cluster/replication/stage).
        self._stage_lock = asyncio.Lock()
        # After a failed fetch of a missing load file: (sha256, next attempt at, delay, reason).
        self._file_fetch_backoff: tuple[str, float, float, str] | None = None

    async def apply(self, entry: msg.Entry, command: statemachine.Command) -> Applied | None:
        """Apply a file load (``LoadFile``) at ``entry.index`` (module docstring); returns the outcome to
        answer the entry's client with (None: the database already held this index). The caller records
        the index as applied and answers."""
        load = command.load
        assert isinstance(load, statemachine.LoadFile)
        loads = self.snapshots.loads
        if not loads.has(load.sha256, load.size_bytes):
            await self._fetch_load_file(load)
        digest = statemachine.digest(command)
        stored = None
        if command.request_id is not None:
            stored = await self._stored_request(command.client, command.request_id)
        if stored is not None:
            idx, stored_digest, data = stored
            if stored_digest != digest:
                why = f"request id {command.request_id!r} was already used for a different request"
                outcome = Applied((res.failed(why),), idx, True)
            else:
                outcome = Applied(tuple(res.decode_results(data)), idx, True)
            # Only the entry's index is recorded as applied: the load itself happened before.
            await self.database.apply_entries([statemachine.Entry(entry.index, ())])
        else:
            result = res.StatementResult(rows_affected=0)
            row = None
            if command.request_id is not None:
                row = RequestRow(command.client, command.request_id, digest, res.encode_results([result]))
            temp = self.database.temp_path("load")
            started = asyncio.get_running_loop().time()
            try:
                await asyncio.to_thread(loads.copy_to, load.sha256, temp)
                loaded = await self.database.load_sqlite_file(
                    temp, index=entry.index, request=row, only_above=True
                )
            finally:
                await asyncio.shield(asyncio.to_thread(temp.unlink, True))
            self.log.info(
                "replicated_load_applied", index=entry.index, sha256=load.sha256[:16], bytes=load.size_bytes,
                took_ms=round((asyncio.get_running_loop().time() - started) * 1000, 1), skipped=not loaded,
            )  # fmt: skip
            # Not loaded: the database already held this index (an installed snapshot holds the load).
            outcome = Applied((result,), entry.index) if loaded else None
        loads.mark_applied(load.sha256, entry.index)
        return outcome

    async def _fetch_load_file(self, load: statemachine.LoadFile) -> None:
        """Fetch a staged file this node missed, from the leader or any member. After a failure the next
        attempt waits, doubling from FILE_FETCH_RETRY_FIRST_S up to FILE_FETCH_RETRY_MAX_S (the applier
        retries every APPLY_RETRY_S; between fetches it is told the last failure again, which its log
        line already named)."""
        now = asyncio.get_running_loop().time()
        backoff = self._file_fetch_backoff
        if backoff is not None and backoff[0] == load.sha256 and now < backoff[1]:
            raise staged_loads.StagedFileMissing(backoff[3])
        try:
            source = await staged_loads.fetch(
                self.snapshots.loads, load.sha256, load.size_bytes, self._sources(),
                sign_headers=self._sign_headers(), log=self.log, rate=self.snapshots.rate,
            )  # fmt: skip
        except staged_loads.StagedFileMissing as exc:
            delay = FILE_FETCH_RETRY_FIRST_S
            if backoff is not None and backoff[0] == load.sha256:
                delay = min(2 * backoff[2], FILE_FETCH_RETRY_MAX_S)
            reason = f"load file {load.sha256[:12]}... is missing here and no member served it yet"
            self._file_fetch_backoff = (load.sha256, now + delay, delay, reason)
            self.log.warning("staged_load_fetch_failed", sha256=load.sha256[:16], reason=str(exc)[:300],
                             next_in_s=delay)  # fmt: skip
            raise staged_loads.StagedFileMissing(reason) from None
        self._file_fetch_backoff = None
        self.log.info("staged_load_fetched", sha256=load.sha256[:16], bytes=load.size_bytes, via=source)

    async def _stored_request(self, client: str, request_id: str) -> tuple[int, bytes, bytes] | None:
        def lookup(job: Any) -> tuple[int, bytes, bytes] | None:
            ops = self.database._ops(job)
            table = statemachine.REQUESTS_TABLE
            if not ops.internal("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (table,)):
                return None
            rows = ops.internal(
                f"SELECT idx, digest, results FROM {table} WHERE client = ? AND request_id = ?",
                (client, request_id),
            )
            return (int(rows[0][0]), bytes(rows[0][1]), bytes(rows[0][2])) if rows else None

        return await self.database._write(lookup)

    def _sign_headers(self) -> transfer.SignHeaders:
        if self.snapshots.sign_headers is None:
            raise errors.Unavailable("replication has not started: no peer signer yet")
        return self.snapshots.sign_headers

    async def stage(self, sender: Endpoint, sha256: str, size_bytes: int) -> None:
        """``POST /cluster/replication/stage``: hold the file durably (pulled from ``sender``, the leader
        staging a load) before answering. One download at a time; a file already held answers at once."""
        loads = self.snapshots.loads
        if loads.has(sha256, size_bytes):
            return
        async with self._stage_lock:
            if loads.has(sha256, size_bytes):
                return
            free = await asyncio.to_thread(free_bytes, self.data_dir)
            if free < STAGE_SPACE_FACTOR * size_bytes:
                raise errors.InsufficientStorage(
                    f"DATA_DIR has {free} bytes free; staging a {size_bytes}-byte load file needs about "
                    f"{STAGE_SPACE_FACTOR * size_bytes}"
                )
            await staged_loads.fetch(
                loads, sha256, size_bytes, [sender.url], sign_headers=self._sign_headers(), log=self.log,
                rate=self.snapshots.rate,
            )  # fmt: skip
            self.log.info("staged_load_received", sha256=sha256[:16], bytes=size_bytes, source=str(sender))

    async def prune(self, log_first_index: int, memory_base: int) -> None:
        """Staged files whose entry the log no longer holds are not needed again (module doc of
        ``staged_loads``): ``log_first_index`` is the durable log's first entry, ``memory_base`` the index
        below which the core keeps no applied entries in memory."""
        for sha256 in self.snapshots.loads.removable(log_first_index, memory_base):
            await asyncio.to_thread(self.snapshots.loads.remove, sha256)
            self.log.info("staged_load_removed", sha256=sha256[:16])
