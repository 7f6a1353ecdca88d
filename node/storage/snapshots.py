"""Snapshots: consistent copies of the replicated SQLite database, tagged with the log position they hold.

A snapshot is what lets the log be compacted (entries at or below its index are no longer needed to build
the database) and what a follower too far behind receives instead of those entries.

Layout (one directory, ``DATA_DIR/snapshots``)
----------------------------------------------
* ``<index, 20 digits>-<epoch, 20 digits>.db``: the SQLite file (rollback journal mode, no ``-wal``),
  holding every entry up to and including ``index`` (its ``_talentnest_state`` applied index is ``index``).
* ``<same stem>.json``: its :class:`SnapshotMeta`. Written only after the ``.db`` is durable (temp file,
  fsync, rename, directory fsync), so **a snapshot exists only if its ``.json`` exists**; a ``.db`` without
  one is a leftover of a crash and is removed when the directory is opened.
* ``incoming/``: transfers in progress (``<stem>.part``), resumable; a complete, verified one is renamed into
  the directory above and becomes a local snapshot like one this node took itself.
* ``loads/``: staged files of replicated ``/db/load`` (:mod:`node.replication.staged_loads`); not
  snapshots, and left alone by this store.

Only the newest few complete snapshots are kept (``KEEP_SNAPSHOTS``).

The store (:class:`SnapshotStore`)
----------------------------------
Every method that touches the disk blocks (hashing reads the whole file): callers run them with
``asyncio.to_thread``. :meth:`SnapshotStore.newest` and :meth:`SnapshotStore.snapshots` only read memory.
Concurrent calls from several threads are safe (one lock around the directory changes; hashing runs outside
it).

What a crash leaves, step by step (``add`` and ``finish_incoming`` alike): the file is hashed and fsynced
(a crash leaves a temp file or a ``.part``: removed, resp. kept for resuming), renamed to ``<stem>.db`` and
the directory fsynced (a crash leaves a ``.db`` without ``.json``: removed at open), then the ``.json``
written atomically (from then on the snapshot exists), then older snapshots pruned, each ``.json`` first
(a crash leaves a ``.db`` without ``.json``: removed at open; more than ``KEEP_SNAPSHOTS``: pruned at open).

A snapshot being served or installed while it is pruned stays readable through the descriptor already open
(POSIX unlink); open the file once and read through that descriptor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from node import errors
from node.storage.durable import (
    FILE_CHUNK_BYTES,
    TEMP_SUFFIX,
    crash_point,
    fsync_dir,
    is_disk_full,
    write_atomic,
)

SNAPSHOT_DIR_NAME = "snapshots"
INCOMING_DIR_NAME = "incoming"
KEEP_SNAPSHOTS = 2  # the newest is served; the one before covers a transfer that started just before it
META_VERSION = 1
DB_SUFFIX = ".db"
META_SUFFIX = ".json"
PART_SUFFIX = ".part"
# Temp files the store itself hands out (SnapshotStore.temp_path); removed at open.
TEMP_PREFIX = ".tmp-"
_STEM = re.compile(r"^(\d{20})-(\d{20})$")


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """What a snapshot file holds and how to verify it (the ``.json`` beside it, and the headers of a
    transfer)."""

    cluster: str  # the cluster name (HardState.cluster): a snapshot is never taken from another cluster
    epoch: int  # epoch of the entry at ``index``
    index: int  # the last log entry the database holds (its applied index)
    config: bytes  # Config.encode() of the configuration in effect at ``index``
    sha256: str  # hex digest of the whole ``.db`` file
    size_bytes: int
    sqlite_version: str  # the SQLite that wrote it (replicas must run the same one: deterministic replay)

    @property
    def stem(self) -> str:
        return snapshot_stem(self.index, self.epoch)

    def encode(self) -> bytes:
        body = dataclasses.asdict(self)
        body["config"] = self.config.decode()
        body["v"] = META_VERSION
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes) -> SnapshotMeta:
        """Raises ``ValueError`` for anything that is not a version-1 meta document."""
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"snapshot meta is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("v") != META_VERSION:
            raise ValueError("unknown snapshot meta version")
        try:
            meta = SnapshotMeta(
                cluster=str(body["cluster"]),
                epoch=int(body["epoch"]),
                index=int(body["index"]),
                config=str(body["config"]).encode(),
                sha256=str(body["sha256"]),
                size_bytes=int(body["size_bytes"]),
                sqlite_version=str(body["sqlite_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"snapshot meta field missing or wrong: {exc}") from None
        if meta.index < 1 or meta.epoch < 0 or meta.size_bytes < 0 or len(meta.sha256) != 64:
            raise ValueError("snapshot meta values out of range")
        return meta


def snapshot_stem(index: int, epoch: int) -> str:
    return f"{index:020d}-{epoch:020d}"


def snapshot_dir(data_dir: Path) -> Path:
    return data_dir / SNAPSHOT_DIR_NAME


class SnapshotInvalid(ValueError):
    """A received snapshot does not match its meta (size or sha256): the part was deleted; fetch it again."""


@dataclass(frozen=True, slots=True)
class StoreContents:
    """What :meth:`SnapshotStore.open` found: the complete snapshots (oldest first) and, for the caller to log,
    one line per thing it removed because it was damaged (leftovers of a crash are removed silently)."""

    snapshots: tuple[SnapshotMeta, ...]
    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FileDigest:
    size_bytes: int
    sha256: str


def digest_file(path: Path) -> FileDigest:
    """Size and sha256 of the file at ``path`` (read in 1 MiB pieces, then fsynced through the same
    descriptor, so the bytes hashed are the bytes made durable). Blocking."""
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        # Each round reads one piece or ends at end of file: bounded by the file size.
        while chunk := os.read(fd, FILE_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileDigest(size, h.hexdigest())


def _sort_key(meta: SnapshotMeta) -> tuple[int, int]:
    return meta.index, meta.epoch


class SnapshotStore:
    """The snapshot directory of one node (layout and crash states in the module doc)."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = snapshot_dir(data_dir)
        self.incoming = self.directory / INCOMING_DIR_NAME
        self._lock = threading.Lock()
        self._snapshots: list[SnapshotMeta] = []  # oldest first
        self._temp_seq = itertools.count(1)

    # --- queries (memory only: callable from the event loop) ------------------------------------------------

    def snapshots(self) -> list[SnapshotMeta]:
        """The complete snapshots, oldest first."""
        with self._lock:
            return list(self._snapshots)

    def newest(self) -> SnapshotMeta | None:
        with self._lock:
            return self._snapshots[-1] if self._snapshots else None

    def path_of(self, meta: SnapshotMeta) -> Path:
        return self.directory / (meta.stem + DB_SUFFIX)

    def meta_path(self, meta: SnapshotMeta) -> Path:
        return self.directory / (meta.stem + META_SUFFIX)

    def incoming_part(self, meta: SnapshotMeta) -> Path:
        """Where a transfer of ``meta``'s snapshot writes (append to resume; kept across restarts)."""
        return self.incoming / (meta.stem + PART_SUFFIX)

    def temp_path(self) -> Path:
        """A fresh temp file name inside the store (same filesystem, so :meth:`add` renames it); a crash
        leaves it behind and :meth:`open` removes it."""
        return self.directory / f"{TEMP_PREFIX}{os.getpid()}-{next(self._temp_seq)}"

    # --- blocking operations --------------------------------------------------------------------------------

    def open(self) -> StoreContents:
        """Create the directories, remove crash leftovers and damaged snapshots, prune to KEEP_SNAPSHOTS.

        Removed silently: temp files, a ``.db`` without ``.json`` (a crash before the meta was written),
        files in ``incoming/`` that are not ``<stem>.part``, and parts for snapshots no newer than the newest
        complete one (never needed again). Removed and reported in ``problems``: a ``.json`` that does not
        decode, names another stem, or whose ``.db`` is missing or of another size (the sha256 is checked
        only when a snapshot is received; hashing every snapshot at each start would read them whole).
        """
        self.incoming.mkdir(parents=True, exist_ok=True)
        problems: list[str] = []
        found: list[SnapshotMeta] = []
        with self._lock:
            entries = sorted(self.directory.iterdir())
            names = {p.name for p in entries}
            for path in entries:
                if path.name.startswith(TEMP_PREFIX) or path.name.endswith(TEMP_SUFFIX):
                    path.unlink(missing_ok=True)
                    continue
                stem, suffix = path.name[: -len(path.suffix) or None], path.suffix
                if not _STEM.match(stem):
                    continue  # not ours: left alone
                if suffix == DB_SUFFIX and stem + META_SUFFIX not in names:
                    path.unlink(missing_ok=True)
                elif suffix == META_SUFFIX:
                    meta, problem = self._check_meta(path, stem)
                    if meta is None:
                        problems.append(problem)
                        path.unlink(missing_ok=True)
                        (self.directory / (stem + DB_SUFFIX)).unlink(missing_ok=True)
                    else:
                        found.append(meta)
            found.sort(key=_sort_key)
            self._snapshots = found
            newest = found[-1] if found else None
            for path in sorted(self.incoming.iterdir()):
                stem = path.name[: -len(PART_SUFFIX)] if path.name.endswith(PART_SUFFIX) else ""
                match = _STEM.match(stem)
                if match is None or (newest is not None and int(match.group(1)) <= newest.index):
                    path.unlink(missing_ok=True)
            self._prune(keep=None)
            fsync_dir(self.incoming)
            fsync_dir(self.directory)
            return StoreContents(tuple(self._snapshots), tuple(problems))

    def add(
        self, tmp_db: Path, *, cluster: str, epoch: int, index: int, config: bytes, sqlite_version: str
    ) -> SnapshotMeta:
        """Make the database copy at ``tmp_db`` (a :meth:`temp_path`, or any file on the same filesystem)
        this node's snapshot of ``index``; it is moved, not copied. Durable when it returns. If a snapshot
        of the same index and epoch exists already, ``tmp_db`` is deleted and that one returned. A full disk
        raises :class:`node.errors.InsufficientStorage` (``tmp_db`` deleted, nothing added)."""
        try:
            digest = digest_file(tmp_db)
            meta = SnapshotMeta(
                cluster, epoch, index, config, digest.sha256, digest.size_bytes, sqlite_version
            )
            SnapshotMeta.decode(meta.encode())  # the same range checks a reader applies
            crash_point("snapshot-add-synced")
            return self._install(tmp_db, meta, "snapshot-add")
        except BaseException as exc:
            tmp_db.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise errors.InsufficientStorage(
                    "not enough disk space in DATA_DIR for the snapshot"
                ) from exc
            raise

    def finish_incoming(self, meta: SnapshotMeta) -> Path:
        """Verify a complete transfer (``incoming_part(meta)``: size and sha256 equal ``meta``'s) and make it
        a local snapshot; returns its ``.db`` path. A mismatch deletes the part and raises
        :class:`SnapshotInvalid`; a missing part raises ``FileNotFoundError``. Durable when it returns."""
        SnapshotMeta.decode(meta.encode())  # a meta that came over the network: refuse impossible values
        part = self.incoming_part(meta)
        size = part.stat().st_size
        if size != meta.size_bytes:
            part.unlink(missing_ok=True)
            raise SnapshotInvalid(
                f"received snapshot {meta.stem} is {size} bytes, its meta says {meta.size_bytes}: discarded"
            )
        digest = digest_file(part)
        if digest != FileDigest(meta.size_bytes, meta.sha256):
            part.unlink(missing_ok=True)
            raise SnapshotInvalid(
                f"received snapshot {meta.stem} has sha256 {digest.sha256}, its meta says {meta.sha256}: "
                "discarded"
            )
        crash_point("snapshot-incoming-verified")
        try:
            self._install(part, meta, "snapshot-incoming")
        except OSError as exc:
            if is_disk_full(exc):
                raise errors.InsufficientStorage(
                    "not enough disk space in DATA_DIR for the snapshot"
                ) from exc
            raise
        return self.path_of(meta)

    def remove(self, meta: SnapshotMeta) -> None:
        """Delete a snapshot (its ``.json`` first: it stops existing at once)."""
        with self._lock:
            self._remove(meta)
            fsync_dir(self.directory)

    # --- internals ------------------------------------------------------------------------------------------

    def _check_meta(self, path: Path, stem: str) -> tuple[SnapshotMeta | None, str]:
        try:
            meta = SnapshotMeta.decode(path.read_bytes())
        except ValueError as exc:
            return None, f"snapshot {stem}: {exc}; removed"
        if meta.stem != stem:
            return None, f"snapshot {stem}: its meta names {meta.stem}; removed"
        try:
            size = self.path_of(meta).stat().st_size
        except FileNotFoundError:
            return None, f"snapshot {stem}: the database file is missing; removed"
        if size != meta.size_bytes:
            return (
                None,
                f"snapshot {stem}: the database file is {size} bytes, its meta says {meta.size_bytes}",
            )
        return meta, ""

    def _install(self, source: Path, meta: SnapshotMeta, step: str) -> SnapshotMeta:
        """Rename the verified, fsynced ``source`` to ``<stem>.db``, then write the meta (module doc)."""
        with self._lock:
            existing = next((m for m in self._snapshots if m.stem == meta.stem), None)
            if existing is not None:
                source.unlink(missing_ok=True)
                return existing
            target = self.path_of(meta)
            os.replace(source, target)
            fsync_dir(self.directory)
            crash_point(f"{step}-renamed")
            try:
                write_atomic(self.meta_path(meta), meta.encode())
            except BaseException:
                target.unlink(missing_ok=True)  # a .db without .json is no snapshot; do not leave it
                raise
            crash_point(f"{step}-meta-written")
            self._snapshots.append(meta)
            self._snapshots.sort(key=_sort_key)
            self._prune(keep=meta)
            fsync_dir(self.directory)
            return meta

    def _prune(self, keep: SnapshotMeta | None) -> None:
        """Under the lock: drop the oldest snapshots beyond KEEP_SNAPSHOTS, never ``keep``."""
        # Each round removes one snapshot: bounded by their number.
        while len(self._snapshots) > KEEP_SNAPSHOTS:
            victim = next(m for m in self._snapshots if m != keep)
            self._remove(victim)
            crash_point("snapshot-pruned")

    def _remove(self, meta: SnapshotMeta) -> None:
        self.meta_path(meta).unlink(missing_ok=True)
        self.path_of(meta).unlink(missing_ok=True)
        self._snapshots = [m for m in self._snapshots if m.stem != meta.stem]
