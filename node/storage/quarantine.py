"""Moving damaged state aside: one directory per event under ``DATA_DIR/quarantine``, durable, resumable.

Why: a damaged database or log must neither be served nor be deleted. It is the operator's data (the only
copy of anything that never reached another node), so it is moved, never removed, and the node starts
without it. With replication the node then resyncs from its cluster (see :mod:`node.actors.replicator`).

**One event, one directory.** ``DATA_DIR/quarantine/<UTC time>/`` gets every file of the event and a
``reason.json`` (what was damaged, when). Everything is renamed, never copied: a quarantine costs no extra
space at the moment it happens (the moved files keep the space they held), and the resync then writes a
new copy beside it, so while the quarantined copy is kept DATA_DIR needs about one database plus one log
more than usual.

**Crash in the middle.** Before the first rename a marker ``DATA_DIR/quarantine/pending`` is written
atomically, naming the event directory and every name to move; it is removed only after the last rename
and the directory fsyncs. :func:`finish_pending` (run at every start before anything opens those files)
moves whatever the marker names that is still in DATA_DIR. A rename is atomic, so each file is either in
DATA_DIR or in the event directory, never lost and never in both; a name already taken in the event
directory is never overwritten (the later file gets a numbered name).

Blocking file I/O throughout: call from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from node.storage.durable import fsync_dir, write_atomic

QUARANTINE_DIR = "quarantine"
PENDING_FILE_NAME = "pending"  # in DATA_DIR/quarantine while an event's renames may be unfinished
REASON_FILE_NAME = "reason.json"
# Bounds on what :func:`usage` walks (a quarantine holds a few files per event; this only bounds a directory
# an operator filled with something else).
MAX_USAGE_ENTRIES = 100_000
# Name variants tried when a name is already taken in the event directory (only after an operator put a
# file there by hand, or a crash between two starts of the same event).
MAX_NAME_VARIANTS = 1000


@dataclass(frozen=True, slots=True)
class Quarantined:
    """What one event moved: its directory, the names moved (as they are now in it) and their size."""

    path: Path
    moved: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What DATA_DIR/quarantine holds: event directories and bytes of every file under it."""

    events: int
    size_bytes: int


def event_stamp(now: dt.datetime | None = None) -> str:
    """The event directory's name: UTC time to the microsecond (sorts in time order)."""
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S.%fZ")


def quarantine(
    data_dir: Path, names: Sequence[str], damage: str, *, now: dt.datetime | None = None
) -> Quarantined:
    """Move every one of ``names`` (files or directories directly in ``data_dir``) that exists into a new
    event directory, durably. Finishes an earlier unfinished event first (its files go to its own
    directory). Names that do not exist are skipped; the event directory is created even if none does, so
    the operator always finds the ``reason.json`` of an event that was logged."""
    finish_pending(data_dir)
    for name in names:
        _check_name(name)
    root = data_dir / QUARANTINE_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = _new_event_dir(root, event_stamp(now))
    write_atomic(
        target / REASON_FILE_NAME,
        orjson.dumps({"damage": damage, "names": list(names), "time": event_stamp(now)}),
    )
    fsync_dir(root)
    fsync_dir(data_dir)
    # From here the marker makes the event resumable: a crash leaves it for finish_pending.
    write_atomic(root / PENDING_FILE_NAME, orjson.dumps({"dir": target.name, "names": list(names)}))
    return _move_all(data_dir, target, names)


def finish_pending(data_dir: Path) -> Quarantined | None:
    """Finish an event a crash interrupted (see the module docstring); None if there is none."""
    marker = data_dir / QUARANTINE_DIR / PENDING_FILE_NAME
    try:
        pending = orjson.loads(marker.read_bytes())
        target = data_dir / QUARANTINE_DIR / str(pending["dir"])
        names = [str(n) for n in pending["names"]]
        for name in names:
            _check_name(name)
        _check_name(target.name)
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        # write_atomic never leaves a torn marker; a foreign one is not ours to act on.
        raise RuntimeError(f"{marker} is unreadable ({exc}); an operator must look") from exc
    target.mkdir(parents=True, exist_ok=True)
    return _move_all(data_dir, target, names)


def usage(data_dir: Path) -> Usage:
    """Event directories and bytes under DATA_DIR/quarantine (Usage(0, 0) if there is none). Bounded."""
    root = data_dir / QUARANTINE_DIR
    if not root.is_dir():
        return Usage(0, 0)
    events = sum(1 for p in root.iterdir() if p.is_dir())
    return Usage(events, _size_of([root]))


def _move_all(data_dir: Path, target: Path, names: Iterable[str]) -> Quarantined:
    moved: list[str] = []
    for name in names:
        source = data_dir / name
        if not os.path.lexists(source):
            continue  # absent, or moved before a crash
        destination = _free_name(target, name)
        os.replace(source, destination)
        moved.append(destination.name)
    # Renames change both directories: both are fsynced before the marker goes.
    fsync_dir(target)
    fsync_dir(data_dir)
    marker = data_dir / QUARANTINE_DIR / PENDING_FILE_NAME
    marker.unlink(missing_ok=True)
    fsync_dir(marker.parent)
    return Quarantined(target, tuple(moved), _size_of(target / n for n in moved))


def _new_event_dir(root: Path, stamp: str) -> Path:
    for attempt in range(MAX_NAME_VARIANTS):
        path = root / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free event directory name under {root} for {stamp}")


def _free_name(directory: Path, name: str) -> Path:
    for attempt in range(MAX_NAME_VARIANTS):
        path = directory / (name if attempt == 0 else f"{name}.{attempt}")
        if not os.path.lexists(path):
            return path
    raise RuntimeError(f"no free name for {name} in {directory}")


def _check_name(name: str) -> None:
    """Only plain names directly in DATA_DIR: a marker can never make this move anything else."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or name == QUARANTINE_DIR:
        raise ValueError(f"not a name directly in DATA_DIR: {name!r}")


def _size_of(paths: Iterable[Path]) -> int:
    total = 0
    seen = 0
    stack = list(paths)
    while stack and seen < MAX_USAGE_ENTRIES:
        path = stack.pop()
        seen += 1
        try:
            if path.is_dir() and not path.is_symlink():
                stack.extend(path.iterdir())
            else:
                total += path.lstat().st_size
        except FileNotFoundError:
            continue
    return total
