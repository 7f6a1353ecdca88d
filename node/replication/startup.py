"""Start-up integrity and quarantine: what the Replicator's state is restored from, checked first.

The database's ``quick_check`` and the log's recovery (every checksum) run side by side, then the identity
and the core's hard state are read and the entries to restore. If any of them is damaged (the database
fails its check, the log raises LogCorrupt at open or when read, the hard state or the identity is
unreadable), everything that carries the replicated state is moved into ``DATA_DIR/quarantine/<UTC time>/``
as one event (``REPLICATED_STATE_NAMES``, durable renames, finished at the next start after a crash:
:mod:`node.storage.quarantine`), one ``data_quarantined`` error line says what and where, and the node
starts again empty under a new identity: the leader adds it as a learner and promotes it once caught up, so
it never counts toward a quorum with promises it lost; the old identity is reaped after ``reap_timeout_s``.
While a quarantine is kept and the node holds no replicated state, it only ever joins a cluster, never
bootstraps one (the Replicator's ``rejoin_only``): alone, it stays not ready and serves nothing rather than
an empty database in place of the data it lost, until an operator removes the quarantine.

:class:`StorageOpener` does this for the Replicator, which owns it and learns what it opened through two
narrow callables (``adopt``: the durable log and the identity; ``hold``: why the node only rejoins), set as
soon as they are known, so that /readyz and the Replicator's shutdown see them during the open too.
:func:`read_restore` reads what the core is restored from (at start, and again after a log write failed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from node import errors
from node.core.replication import machine
from node.core.replication import messages as msg
from node.replication.codec import from_log_entry
from node.replication.snapshotting import Snapshots
from node.storage import quarantine
from node.storage.asynclog import AsyncLog
from node.storage.corestate import REPLICATION_STATE_FILE, HardStateDamaged, load_core_hard_state
from node.storage.hardstate import HARD_STATE_FILE_NAME
from node.storage.identity import IDENTITY_FILE_NAME, IdentityError, load_or_create_identity, read_identity
from node.storage.log import LOG_DIR_NAME, DurableLog, LogCorrupt
from node.storage.snapshots import SNAPSHOT_DIR_NAME
from node.storage.sqlite import DB_FILE_NAMES, Database
from node.storage.sqlite import State as DbState

# Everything in DATA_DIR that carries this node's replicated state, in the order a quarantine moves it: the
# identity last, so that until the very end the node is still the old member with all of its state, and a
# crash in between is finished at the next start (node.storage.quarantine). The peer incarnation stays: it
# must keep increasing whatever the identity (node.runtime.incarnation).
REPLICATED_STATE_NAMES = (
    *DB_FILE_NAMES, LOG_DIR_NAME, SNAPSHOT_DIR_NAME, REPLICATION_STATE_FILE, HARD_STATE_FILE_NAME,
    IDENTITY_FILE_NAME,
)  # fmt: skip
QUARANTINE_ADVICE = (
    "the node rejoins its cluster as a new member (a learner until it has caught up, then a voter); the "
    "leader removes the old identity once it has been silent for the reap timeout (60 s; until then it "
    "counts as a silent voter: DELETE /cluster/voters/<old identity> removes it at once); check the "
    "quarantined copy, and remove it to free its space once it is no longer needed"
)


class _Damaged(Exception):
    """Start-up found replicated state it cannot trust; ``str()`` says what (for the log line)."""


@dataclass(frozen=True, slots=True)
class Restore:
    """What the durable state holds at start, read before the core state is built from it."""

    hard: msg.HardState | None
    applied: int
    last: tuple[int, int]  # the log's (epoch, index)
    base_epoch: int = 0
    entries: tuple[msg.Entry, ...] = ()


def _what_failed(exc: BaseException) -> str:
    if isinstance(exc, LogCorrupt):
        return "log"
    if isinstance(exc, IdentityError):
        return "identity"
    return "hard state"


def rejoin_reason(data_dir: Path) -> str:
    """Why a node whose data was quarantined only rejoins (the Replicator's ``rejoin_only``)."""
    where = data_dir / quarantine.QUARANTINE_DIR
    return (
        f"this node's damaged data was moved to {where}; it joins a cluster that holds the data "
        "and never starts an empty cluster of its own in its place; with no cluster to rejoin, "
        "remove that directory to start empty, then load a backup"
    )


async def read_restore(
    data_dir: Path, alog: AsyncLog, identity: str, database: Database, snapshots: Snapshots, read_bytes: int
) -> Restore:
    """Read what the core is restored from (raises LogCorrupt, HardStateDamaged); reads the log
    ``read_bytes`` at a time."""
    hard = await asyncio.to_thread(load_core_hard_state, data_dir, identity)
    applied = await database.applied_index()
    snapshots.alog = alog
    await snapshots.open()  # (again after a quarantine or a resync: it only reads the directory)
    await snapshots.repair_log(applied)  # an install cut short between database and log
    last_epoch, last_index = alog.last
    first_index = alog.first_index
    if (
        hard is None and (last_index == 0 or last_epoch == 0)
    ) or not first_index - 1 <= applied <= last_index:
        return Restore(hard, applied, (last_epoch, last_index))  # refused or formed: _start_state
    if hard is not None and not hard.cluster and last_index and first_index == 1:
        # Written before clusters were named: every member derives the same name from entry 1.
        first = await alog.read(1, read_bytes)
        if first:
            hard = replace(hard, cluster=machine.legacy_cluster(from_log_entry(first[0])))
    base_epoch = await alog.epoch_at(applied) if applied else 0
    entries: list[msg.Entry] = []
    index = applied + 1
    while index <= last_index:
        chunk = await alog.read(index, read_bytes)
        if not chunk:
            break
        entries.extend(from_log_entry(e) for e in chunk)
        index = chunk[-1].index + 1
    return Restore(hard, applied, (last_epoch, last_index), base_epoch, tuple(entries))


class StorageOpener:
    """Opens the Replicator's storage at start, checked, quarantining damaged state (module docstring)."""

    def __init__(
        self,
        *,
        data_dir: Path,
        database: Database,
        snapshots: Snapshots,
        log: Any,
        log_segment_bytes: int | None,
        read_bytes: int,
        adopt: Callable[[AsyncLog | None, str | None], None],
        hold: Callable[[str | None], None],
    ) -> None:
        self.data_dir = data_dir
        self.database = database
        self.snapshots = snapshots
        self.log = log
        self._log_segment_bytes = log_segment_bytes
        self._read_bytes = read_bytes
        self._adopt = adopt  # (durable log, identity): what the Replicator runs on, as soon as known
        self._hold = hold  # (reason or None): sets the Replicator's rejoin_only
        self._alog: AsyncLog | None = None
        self._identity: str | None = None

    def _set(self, alog: AsyncLog | None, identity: str | None) -> None:
        self._alog, self._identity = alog, identity
        self._adopt(alog, identity)

    async def open(self, stop: asyncio.Event) -> Restore | None:
        """Open the database (``quick_check``) and the log (every checksum), load the identity and read what
        the core is restored from. If any of it is damaged, move the whole replicated state aside as one
        event (:mod:`node.storage.quarantine`) and start again as a new, empty node: a new identity, so the
        cluster adds it as a learner and it counts toward no quorum before it has caught up (it lost what
        it promised and acknowledged). None: stopping, or the database cannot be opened for another reason.

        A crash in the middle of a quarantine is finished here first, before anything opens those files."""
        finished = await asyncio.to_thread(quarantine.finish_pending, self.data_dir)
        if finished is not None:
            self.log.error(
                "data_quarantined", path=str(finished.path), moved=list(finished.moved),
                damaged="(a quarantine a crash interrupted, finished now)", advice=QUARANTINE_ADVICE,
            )  # fmt: skip
        kept = await asyncio.to_thread(quarantine.usage, self.data_dir)
        if kept.events:
            self.log.warning(
                "quarantined_data_kept", path=str(self.data_dir / quarantine.QUARANTINE_DIR),
                events=kept.events, size_bytes=kept.size_bytes,
                advice="damaged state moved aside earlier; check it and remove it to free its space",
            )  # fmt: skip
            # Set before the database opens, so that not one read serves the empty copy of a node whose
            # data was quarantined (cleared below if this node holds replicated state after all).
            self._hold(rejoin_reason(self.data_dir))
        try:
            restore = await self._open_checked(stop)
        except _Damaged as damage:
            await self._quarantine_state(str(damage))
            self._hold(rejoin_reason(self.data_dir))
            try:
                restore = await self._open_checked(stop)
            except _Damaged as again:
                # A new, empty state failing its checks means the disk or the filesystem is failing: exit.
                raise errors.RefusedToRun(
                    f"DATA_DIR is damaged again right after a quarantine: {again}"
                ) from None
        if restore is None or restore.hard is not None or restore.last[1] > 0:
            self._hold(None)  # a member with its own state: an old quarantine changes nothing
        return restore

    async def _open_checked(self, stop: asyncio.Event) -> Restore | None:
        """One attempt of :meth:`open`: raises _Damaged (the database and log closed again)."""
        segment = {} if self._log_segment_bytes is None else {"segment_bytes": self._log_segment_bytes}
        log = AsyncLog(lambda: DurableLog.open(self.data_dir / LOG_DIR_NAME, **segment))
        # The database's check and the log's recovery each read a whole file: side by side.
        try:
            started, opened = await asyncio.gather(
                self._start_database(stop), log.start(), return_exceptions=True
            )
        except asyncio.CancelledError:
            # The node failed or stops meanwhile. The log may have opened while the database was still
            # being checked, and nobody else knows of it yet: close it here (a no-op if it did not open),
            # or its thread and segment files outlive this node, and a node restarted in this process
            # (node.runtime.restart) opens the same files a second time. The database is closed by its
            # owner, the node's data service.
            await log.close()
            raise
        if opened is None:
            self._set(log, None)  # closed by the Replicator's run() whatever happens next
        if isinstance(started, BaseException):
            raise started  # Database.start reports bad files in its state: this is a bug or a cancellation
        if isinstance(opened, BaseException) and not isinstance(opened, LogCorrupt):
            raise opened  # not damage (a newer format, an I/O error): the node exits as before
        damage: list[str] = []
        await self._wait_database(stop)
        if stop.is_set():
            return None
        if self.database.state == DbState.CORRUPT:
            damage.append(f"database: {self.database.state_detail}")
        elif not self.database.is_open:
            return None  # failed for another reason: logged by the database; not ready until a restart
        if isinstance(opened, LogCorrupt):
            damage.append(f"log: {opened}")
        if not damage:
            try:
                identity = await asyncio.to_thread(load_or_create_identity, self.data_dir)
                self._set(self._alog, identity)
                assert self._alog is not None
                return await read_restore(
                    self.data_dir, self._alog, identity, self.database, self.snapshots, self._read_bytes
                )
            except (LogCorrupt, HardStateDamaged, IdentityError) as exc:
                damage.append(f"{_what_failed(exc)}: {exc}")
        await self._close_storage()
        raise _Damaged("; ".join(damage))

    async def _start_database(self, stop: asyncio.Event) -> None:
        """Start the database unless someone did (the in-process tests start it themselves)."""
        if not self.database.started and not stop.is_set():
            await self.database.start()

    async def _close_storage(self) -> None:
        log = self._alog
        self._set(None, self._identity)
        if log is not None:
            await log.close()
        await self.database.close()
        self.database.announce_check()  # it opens again, empty, right after the quarantine
        self._set(None, None)

    async def _quarantine_state(self, damage: str) -> None:
        try:
            old_identity = await asyncio.to_thread(read_identity, self.data_dir)
        except IdentityError:
            old_identity = None
        moved = await asyncio.to_thread(quarantine.quarantine, self.data_dir, REPLICATED_STATE_NAMES, damage)
        kept = await asyncio.to_thread(quarantine.usage, self.data_dir)
        self.log.error(
            "data_quarantined", path=str(moved.path), damaged=damage, moved=list(moved.moved),
            size_bytes=moved.size_bytes, old_identity=old_identity, quarantine_events=kept.events,
            quarantine_bytes=kept.size_bytes, advice=QUARANTINE_ADVICE,
        )  # fmt: skip

    async def _wait_database(self, stop: asyncio.Event) -> None:
        """Until the database is open or found corrupt. Bounded by the process's life."""
        logged = False
        while not stop.is_set() and not self.database.is_open and self.database.state != DbState.CORRUPT:
            if self.database.state == DbState.FAILED and not logged:
                logged = True
                self.log.error("replication_waits_for_database", state=self.database.state)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await stop.wait()
