"""This process's peer-message incarnation (see node.core.peerauth), persisted in DATA_DIR.

Receivers refuse messages from an older incarnation of a sender, so a node's incarnation must be strictly
greater at every start than at any start before it. The new value is ``max(stored + 1, wall-clock ms)``:

* the stored counter makes it increase even if this host's clock steps back between two starts;
* the wall-clock floor keeps it increasing when DATA_DIR was lost or is fresh (a replaced container with
  the same address): peers still remember the old incarnation, and a counter restarting at 1 would be
  refused by all of them. Only this host's own clock is used, never compared with another host's.

The value is written to a temporary file, fsynced, renamed over the old one and the directory fsynced, all
before the node sends its first peer message: a crash right after start cannot hand out the same number
twice. Blocking: call it from a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import os
from pathlib import Path

from node.core.peerauth import MAX_NUMBER

FILE_NAME = "peer-incarnation"
_MAX_FILE_BYTES = 64


def read_stored(path: Path) -> int:
    """The stored incarnation, or 0 if there is none or it is unreadable (the clock floor then applies)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return 0
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _MAX_FILE_BYTES or not text or not all("0" <= c <= "9" for c in text):
        return 0
    value = int(text)
    return value if value <= MAX_NUMBER else 0


def next_incarnation(data_dir: Path, now_ms: int) -> int:
    """Allocate, persist (fsynced) and return the incarnation for this process start.

    Raises OSError naming DATA_DIR (the node reports it as a start-up failure, exit 2).
    """
    try:
        return _next_incarnation(data_dir, now_ms)
    except OSError as exc:
        raise OSError(
            f"cannot keep the peer incarnation in {data_dir / FILE_NAME} (DATA_DIR): {exc}"
        ) from exc


def _next_incarnation(data_dir: Path, now_ms: int) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / FILE_NAME
    incarnation = max(read_stored(path) + 1, now_ms, 1)
    if incarnation > MAX_NUMBER:
        raise OSError("incarnation counter exhausted; remove the file to restart from the clock")
    temporary = data_dir / f".{FILE_NAME}.{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(f"{incarnation}\n".encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return incarnation
