"""The Replicator's snapshot work: taking snapshots, fetching them from peers, installing them.

The core decides (``node.core.replication``: ``Ready.take_snapshot``, ``fetch_snapshot``, ``install``); this
module carries those decisions out and steps the results back (``SnapshotTaken``, ``SnapshotFetched``)
through ``feed``. Two worker tasks, owned by :meth:`Snapshots.run` (one TaskGroup):

* the **taker** copies the applied database (``Database.copy_for_snapshot``: a consistent copy that does not
  stop writes), tags it with the epoch of its applied index and the configuration in effect there, makes it
  a snapshot (``SnapshotStore.add``: durable when it returns), and only THEN compacts the log up to
  ``machine.compaction_point`` (the log's rule 5: compact only what a durable snapshot covers);
* the **fetcher** asks the source for the snapshot's meta (size, digest, configuration), checks that it is
  of this cluster and of this SQLite, downloads it (``snapshot_transfer.download``: resumable, rate-limited,
  progress logged), verifies and keeps it (``SnapshotStore.finish_incoming``), and steps
  ``SnapshotFetched``. A failure is logged and dropped: the leader repeats its offer every second or so,
  and the part already received is resumed.

Requests are latest-value cells, not queues: one snapshot at a time (a request while one runs is dropped;
the core asks again when it is due), one fetch at a time (a request for another snapshot replaces a
waiting one; a repeat of the one running is ignored).

The **install** happens in the Ready's write step, in order with the log writes around it: the Replicator
queues :meth:`install_on_log_thread` on the log's thread, which waits there while the event loop replaces
the database (``Database.install_snapshot``), then resets the log when the core says the log does not hold
the snapshot's entry. Every later write, message, apply and reply of the pipeline waits behind it (the
completer's order), so an AppendAck for the snapshot leaves only once the database holds it.

Crash safety is the storage's (a database is old or new, never a mix; a log reset leaves a suffix of the
old log or the new empty one) plus one repair at start (:meth:`repair_log`): when the database holds a
snapshot whose entry the log lacks or disagrees with, the install had replaced the database and not yet
reset the log, and the reset is done then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from node import errors
from node.core.replication import machine
from node.core.replication import messages as msg
from node.replication import snapshot_transfer as transfer
from node.replication.staged_loads import StagedLoads, load_meta, parse_load_name
from node.storage.asynclog import AsyncLog
from node.storage.log import DurableLog, LogError, LogIOError, default_sqlite_version
from node.storage.snapshots import SnapshotInvalid, SnapshotMeta, SnapshotStore, snapshot_stem
from node.storage.sqlite import Database

FETCH_RETRY_S = 1.0  # after a failed fetch, the next one (the leader's next offer) waits at least this long


class Snapshots:
    def __init__(
        self,
        *,
        data_dir: Path,
        database: Database,
        log: Any,
        options: machine.Options,
        feed: Callable[[msg.Input], None],
        rate: transfer.RateLimiter | None = None,
    ) -> None:
        self.store = SnapshotStore(data_dir)
        self.loads = StagedLoads(data_dir)  # staged /db/load files (served on the same route)
        self.database = database
        self.log = log
        self.options = options
        self._feed = feed
        self.rate = rate
        self.alog: AsyncLog | None = None
        self.cluster = ""  # this node's cluster (the Replicator keeps it current)
        self.sqlite_version = default_sqlite_version()  # what Database.sqlite_version says too
        # Configurations by the index that made them effective, as applied (the Replicator records them
        # before it applies the entries): the configuration a snapshot holds is the one at its index.
        self.configs: list[tuple[int, msg.Config]] = []
        self.url_of: Callable[[str], str | None] = lambda _identity: None
        self.sign_headers: transfer.SignHeaders | None = None
        self.progress: transfer.TransferProgress | None = None  # the fetch running or last run
        self.on_installed: Callable[[msg.InstallSnapshot], None] = lambda _install: None
        self._take = asyncio.Event()
        self._fetch: tuple[str, msg.LogId] | None = None  # waiting
        self._fetching: tuple[str, msg.LogId] | None = None  # running
        self._fetch_wake = asyncio.Event()
        self._fetch_failed_at = float("-inf")
        self.stats = {"taken": 0, "take_failures": 0, "fetched": 0, "fetch_failures": 0, "installed": 0}

    # --- what the Replicator calls ------------------------------------------------------------------------

    async def open(self) -> None:
        contents = await asyncio.to_thread(self.store.open)
        staged = await asyncio.to_thread(self.loads.open)
        if staged:
            self.log.info("staged_loads_opened", files=len(staged), bytes=sum(f.size_bytes for f in staged))
        for problem in contents.problems:
            self.log.error("snapshot_removed_damaged", problem=problem)
        newest = self.store.newest()
        if newest is not None:
            self.log.info(
                "snapshot_store_opened", snapshots=len(contents.snapshots), newest_index=newest.index,
                newest_epoch=newest.epoch, newest_bytes=newest.size_bytes,
            )  # fmt: skip

    def newest_id(self, cluster: str) -> msg.LogId:
        """The newest snapshot of ``cluster`` (a node that left a cluster never offers that one's)."""
        mine = [m for m in self.store.snapshots() if m.cluster == cluster]
        return msg.LogId(mine[-1].epoch, mine[-1].index) if mine else machine.NO_SNAPSHOT

    async def forget_all(self) -> None:
        """A node that dissolves out of its cluster keeps nothing of it."""
        for meta in self.store.snapshots():
            await asyncio.to_thread(self.store.remove, meta)

    def find(self, snapshot: msg.LogId) -> SnapshotMeta | None:
        for meta in self.store.snapshots():
            if (meta.epoch, meta.index) == (snapshot.epoch, snapshot.index):
                return meta
        return None

    def resolve(self, stem: str) -> tuple[Path, SnapshotMeta] | None:
        """For the HTTP route: the file and meta of a complete snapshot, or of a staged load file named
        ``load-<sha256>`` (memory only)."""
        sha256 = parse_load_name(stem)
        if sha256 is not None:
            size = self.loads.size_of(sha256)
            return None if size is None else (self.loads.path_of(sha256), load_meta(sha256, size))
        for meta in self.store.snapshots():
            if meta.stem == stem:
                return self.store.path_of(meta), meta
        return None

    def record_configs(self, entries: tuple[msg.Entry, ...] | list[msg.Entry]) -> None:
        for e in entries:
            if e.kind is msg.Kind.CONFIG:
                self.configs.append((e.index, msg.Config.decode(e.payload)))

    def reset_configs(self, configs: tuple[tuple[int, msg.Config], ...]) -> None:
        self.configs = list(configs)

    def config_at(self, index: int) -> msg.Config | None:
        found = None
        for at, config in self.configs:
            if at > index:
                break
            found = config
        return found

    def take(self) -> None:
        self._take.set()

    def fetch(self, source: str, snapshot: msg.LogId) -> None:
        request = (source, snapshot)
        if self._fetching is not None and self._fetching[1] == snapshot:
            return  # already downloading it (the leader repeats its offer)
        self._fetch = request
        self._fetch_wake.set()

    def status(self) -> dict[str, Any]:
        newest = self.store.newest()
        out: dict[str, Any] = {
            "snapshot_index": newest.index if newest is not None else 0,
            "snapshot_bytes": newest.size_bytes if newest is not None else 0,
            "log_first_index": self.alog.first_index if self.alog is not None else 1,
        }
        staged = self.loads.files()
        out["staged_loads"] = len(staged)  # /db/load files kept (node.replication.staged_loads)
        out["staged_load_bytes"] = sum(f.size_bytes for f in staged)
        if self.progress is not None:
            out["snapshot_transfer"] = self.progress.as_dict()
        return out

    # --- start-up repair ------------------------------------------------------------------------------------

    async def repair_log(self, applied: int) -> bool:
        """At start: if the database holds a snapshot (its applied index is a snapshot's in the store) that
        the log does not end with or disagrees about, an install replaced the database and a crash came
        before the log was reset: reset it now. True if it did."""
        assert self.alog is not None
        meta = next((m for m in reversed(self.store.snapshots()) if m.index == applied), None)
        if meta is None or applied == 0:
            return False
        last_epoch, last = self.alog.last
        first = self.alog.first_index
        if first - 1 <= applied <= last and await self.alog.epoch_at(applied) == meta.epoch:
            return False
        await self.alog.reset(meta.index, meta.epoch)
        self.log.warning(
            "replication_log_reset_after_install", index=meta.index, epoch=meta.epoch, old_first=first,
            old_last=last, old_last_epoch=last_epoch,
        )  # fmt: skip
        return True

    # --- install (on the log's thread, in the Ready's write step) ------------------------------------------

    def install_on_log_thread(
        self, log: DurableLog, loop: asyncio.AbstractEventLoop, install: msg.InstallSnapshot
    ) -> None:
        """Runs on the log's thread (``AsyncLog.run_future``): the log's writes queued after it wait. The
        database swap runs on the event loop (its own threads); this thread waits for it. A failure becomes
        a LogIOError: the Replicator then rebuilds its state from what is durable (old or new database)."""
        sid = install.snapshot
        try:
            asyncio.run_coroutine_threadsafe(self._install_database(install), loop).result()
        except (errors.NodeError, OSError, ValueError, LogError) as exc:
            raise LogIOError(f"installing snapshot {sid.index} failed: {exc}") from exc
        if not install.keep_log:
            log.reset(sid.index, sid.epoch)

    async def _install_database(self, install: msg.InstallSnapshot) -> None:
        sid = install.snapshot
        meta = self.find(sid)
        if meta is None:
            raise LogIOError(f"snapshot {sid} is not in the store")
        started = time.monotonic()
        await self.database.install_snapshot(self.store.path_of(meta), sid.index)
        self.stats["installed"] += 1
        self.reset_configs(((sid.index, install.config),))
        self.on_installed(install)
        self.log.info(
            "snapshot_installed", index=sid.index, epoch=sid.epoch, bytes=meta.size_bytes,
            took_ms=round((time.monotonic() - started) * 1000, 1),
        )  # fmt: skip

    # --- workers --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=2)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            tg.create_task(self._taker(), name="snapshot-taker")
            tg.create_task(self._fetcher(session), name="snapshot-fetcher")

    async def _taker(self) -> None:
        while True:
            await self._take.wait()
            self._take.clear()
            outcome: msg.SnapshotTaken
            try:
                outcome = await self._take_one()
            except (errors.NodeError, OSError, LogError, ValueError) as exc:
                self.stats["take_failures"] += 1
                self.log.error("snapshot_failed", reason=str(exc)[:300])
                outcome = msg.SnapshotTaken(None, self.alog.first_index if self.alog is not None else 1)
            self._feed(outcome)

    async def _take_one(self) -> msg.SnapshotTaken:
        assert self.alog is not None
        started = time.monotonic()
        tmp = self.store.temp_path()
        try:
            index = await self.database.copy_for_snapshot(tmp)
        except BaseException:
            await asyncio.to_thread(tmp.unlink, True)
            raise
        config = self.config_at(index)
        if index == 0 or config is None:
            await asyncio.to_thread(tmp.unlink, True)
            raise ValueError(f"nothing to snapshot at index {index} (configuration known: {config is not None})")
        epoch = await self.alog.epoch_at(index)
        meta = await asyncio.to_thread(
            self.store.add, tmp, cluster=self.cluster, epoch=epoch, index=index, config=config.encode(),
            sqlite_version=self.sqlite_version,
        )  # fmt: skip
        # The snapshot is durable: the log may now drop what it covers (keeping the trailing window).
        first = await self.alog.compact(machine.compaction_point(index, self.options))
        # Older configurations are not needed again: keep the one in effect at the snapshot and later ones.
        below = [c for c in self.configs if c[0] <= index][-1:]
        self.configs = below + [c for c in self.configs if c[0] > index]
        self.stats["taken"] += 1
        self.log.info(
            "snapshot_taken", index=index, epoch=epoch, bytes=meta.size_bytes, log_first_index=first,
            took_ms=round((time.monotonic() - started) * 1000, 1),
        )  # fmt: skip
        return msg.SnapshotTaken(msg.LogId(epoch, index), first)

    async def _fetcher(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._fetch is None:
                self._fetch_wake.clear()
                await self._fetch_wake.wait()
                continue
            pause = self._fetch_failed_at + FETCH_RETRY_S - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            request, self._fetch = self._fetch, None
            if request is None:
                continue
            self._fetching = request
            try:
                fetched = await self._fetch_one(session, *request)
            except (transfer.TransferError, SnapshotInvalid, errors.NodeError, OSError, ValueError) as exc:
                self.stats["fetch_failures"] += 1
                self._fetch_failed_at = loop.time()
                self.log.warning(
                    "snapshot_fetch_failed", source=request[0], index=request[1].index, reason=str(exc)[:300]
                )
                fetched = None
            finally:
                self._fetching = None
            if fetched is not None:
                self._feed(fetched)

    async def _fetch_one(
        self, session: aiohttp.ClientSession, source: str, snapshot: msg.LogId
    ) -> msg.SnapshotFetched:
        meta = self.find(snapshot)
        if meta is None:
            base = self.url_of(source)
            if base is None or self.sign_headers is None:
                raise transfer.TransferError(f"no address known for {source}")
            url = transfer.snapshot_url(base, snapshot_stem(snapshot.index, snapshot.epoch))
            meta = await transfer.fetch_meta(session, url, sign_headers=self.sign_headers)
            if (meta.epoch, meta.index) != (snapshot.epoch, snapshot.index):
                raise transfer.TransferError(f"{source} answered snapshot {meta.stem} for {snapshot}")
            if self.cluster and meta.cluster != self.cluster:
                raise transfer.TransferError(f"snapshot of another cluster ({meta.cluster}) from {source}")
            if meta.sqlite_version != self.sqlite_version:
                raise transfer.TransferError(
                    f"snapshot written by SQLite {meta.sqlite_version}, this node runs {self.sqlite_version}"
                )
            self.progress = transfer.TransferProgress(peer=source, stem=meta.stem, total_bytes=meta.size_bytes)
            await transfer.download(
                session, url, meta, self.store.incoming_part(meta), sign_headers=self.sign_headers,
                log=self.log, rate=self.rate, progress=self.progress,
            )  # fmt: skip
            await asyncio.to_thread(self.store.finish_incoming, meta)
            self.stats["fetched"] += 1
        try:
            config = msg.Config.decode(meta.config)
        except (ValueError, KeyError, TypeError) as exc:
            raise transfer.TransferError(f"snapshot {meta.stem} names an unreadable configuration") from exc
        return msg.SnapshotFetched(source, snapshot, config)
