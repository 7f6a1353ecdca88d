"""One process at a time in a DATA_DIR: an exclusive ``flock`` on ``DATA_DIR/lock``, held while a node runs.

Why: two processes writing one log, hard state and database (a second node started on the same volume, or
``python -m node recover`` run while the node still serves) would interleave appends and atomic replaces
and leave a replica that contradicts what it acknowledged. The node takes the lock before it touches
anything in DATA_DIR and keeps it until its run ends (a node restarted in the same process after a failure,
node.runtime.restart, releases it and takes it again: ``flock`` locks belong to an open file, so even the
same process could not take it twice); ``recover`` takes the same lock and refuses to run while
the node holds it.

``flock`` rather than a pid file: the kernel releases it when the process ends however it ends (SIGKILL,
crash, power cut), so a stale lock never needs an operator; it works between containers sharing a volume
on one host. The file also carries the holder's pid, for the error message only (never for the decision).
Blocking calls: at start, before the event loop serves anything, or from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE_NAME = "lock"
_MAX_PID_BYTES = 32


class DataDirInUse(OSError):
    """Another process holds the DATA_DIR lock (a running node, or a recover command)."""


class DataDirLock:
    """The held lock; :meth:`release` (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of this open file releases the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_data_dir(data_dir: Path, *, create: bool = True) -> DataDirLock:
    """Take the exclusive lock on ``data_dir`` (created if missing and ``create``) without waiting.

    Raises :class:`DataDirInUse` naming the holder's pid when another process holds it, ``OSError`` when
    the directory cannot be created or the lock file not opened (a read-only or foreign-owned volume).
    """
    path = data_dir / LOCK_FILE_NAME
    try:
        if create:
            data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # Name the variable: the operator fixes DATA_DIR (a path, a volume's owner), not "lock".
        raise type(exc)(exc.errno, f"cannot lock DATA_DIR {data_dir} ({path}): {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_pid(fd)
            who = f"process {holder}" if holder else "another process"
            raise DataDirInUse(
                errno.EBUSY,
                f"DATA_DIR {data_dir} is in use by {who} (a running node or a recover command); stop it first",
            ) from None
        # Informational only: the pid of the holder, for the message above. Not fsynced: after a crash the
        # lock is free whatever the file says.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return DataDirLock(path, fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, _MAX_PID_BYTES, 0).decode("ascii").strip()
        if text.isdigit():
            return int(text)
    return None
