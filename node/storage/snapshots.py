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

Only the newest few complete snapshots are kept (``KEEP_SNAPSHOTS``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SNAPSHOT_DIR_NAME = "snapshots"
INCOMING_DIR_NAME = "incoming"
KEEP_SNAPSHOTS = 2  # the newest is served; the one before covers a transfer that started just before it
META_VERSION = 1


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
