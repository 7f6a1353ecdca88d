"""A full disk: appends and syncs fail with a clear error, leave the log consistent, and work again later.

The real case runs on a 1 MiB tmpfs (root can mount one; CI runs as root); without permission to mount, it
is skipped with the reason, except under CI=true, where that is a failure. Failures of fsync itself (which a
tmpfs never reports) and of the undo after them are injected.
"""

from __future__ import annotations

import errno
import os

import pytest

from node.storage import log as logmod
from node.storage.hardstate import HardState, load_hard_state, save_hard_state
from node.storage.log import (
    DurableLog,
    LogDiskFull,
    LogEntry,
    LogFailed,
    LogIOError,
    LogSpaceLow,
)
from tests.support.tmpfs import small_tmpfs

PAYLOAD_BYTES = 8 << 10
_REAL_FDATASYNC = os.fdatasync
BALLAST_BYTES = 200 << 10


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, "1m") as mount:
        yield mount


def batch(start: int, count: int, epoch: int = 1) -> list[LogEntry]:
    return [LogEntry(epoch, i, 1, bytes([i % 256]) * PAYLOAD_BYTES) for i in range(start, start + count)]


def test_append_on_a_full_disk_fails_cleanly_and_retries_once_space_returns(small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(BALLAST_BYTES))
    directory = small_disk / "log"
    log = DurableLog.open(directory, segment_bytes=128 << 10)
    synced = 0
    failure = None
    # 1 MiB holds at most ~128 entries of 8 KiB: the disk fills well within this bound.
    for _ in range(400):
        entries = batch(synced + 1, 3)
        try:
            log.append(entries)
            synced = log.sync()
        except LogDiskFull as exc:
            failure = exc
            break
    assert failure is not None and "disk full" in str(failure)
    assert log.last() == (1, synced) and log.synced_index == synced
    assert log.read(1, 1 << 30) == [e for start in range(1, synced + 1, 3) for e in batch(start, 3)][:synced]
    assert log.free_bytes() < BALLAST_BYTES
    # Still consistent on disk: a fresh open sees exactly the synced entries.
    log.close()
    log = DurableLog.open(directory, segment_bytes=128 << 10)
    assert log.last() == (1, synced)
    with pytest.raises(LogDiskFull):
        log.append(batch(synced + 1, 3))
        log.sync()
    assert log.last() == (1, synced)
    ballast.unlink()
    log.append(batch(synced + 1, 3))
    assert log.sync() == synced + 3
    log.close()
    log = DurableLog.open(directory)
    assert log.last() == (1, synced + 3)
    assert log.read(synced + 1, 1 << 30) == batch(synced + 1, 3)
    log.close()


def test_reserve_refuses_before_the_disk_fills(small_disk):
    directory = small_disk / "log"
    log = DurableLog.open(directory, reserve_bytes=600 << 10)
    log.append(batch(1, 10))  # 80 KiB: leaves more than the reserve
    log.sync()
    with pytest.raises(LogSpaceLow, match="reserve"):
        log.append(batch(11, 50))  # 400 KiB more would cut into it
    assert log.last() == (1, 10)
    assert log.free_bytes() > 600 << 10
    log.close()


def test_hard_state_save_on_a_full_disk_keeps_the_old_state(small_disk):
    save_hard_state(small_disk, HardState("me", 1, 1))
    fd = os.open(small_disk / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as filled:
            for _ in range(1024):  # 1 MiB disk, 4 KiB a round: full within the bound
                os.write(fd, bytes(4096))
        assert filled.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    big = HardState("me", 2, 2, voters=tuple(f"voter-{i:06d}" for i in range(40000)))
    with pytest.raises(OSError) as caught:
        save_hard_state(small_disk, big)
    assert caught.value.errno == errno.ENOSPC
    assert load_hard_state(small_disk, "me") == HardState("me", 1, 1)
    assert not list(small_disk.glob("*.tmp"))


# ---------------------------------------------------------------- injected fsync failures


class FlakyFsync:
    """Stands in for os.fdatasync in the log module: fails the next ``failures`` calls with ``code``."""

    def __init__(self, failures: int, code: int) -> None:
        self.failures = failures
        self.code = code

    def __call__(self, fd: int) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(self.code, os.strerror(self.code))
        _REAL_FDATASYNC(fd)


@pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, LogDiskFull), (errno.EIO, LogIOError)])
def test_failed_fsync_cuts_the_unsynced_suffix_and_acknowledges_nothing(tmp_path, monkeypatch, code, error):
    log = DurableLog.open(tmp_path)
    log.append(batch(1, 4))
    assert log.sync() == 4
    size = next(tmp_path.glob("*.seg")).stat().st_size
    log.append(batch(5, 4))
    monkeypatch.setattr(logmod.os, "fdatasync", FlakyFsync(1, code))
    with pytest.raises(error):
        log.sync()
    assert log.last() == (1, 4) and log.synced_index == 4
    assert next(tmp_path.glob("*.seg")).stat().st_size == size  # nothing unsynced left behind
    log.append(batch(5, 4))  # the same entries again: the caller's retry
    assert log.sync() == 8
    log.close()
    log = DurableLog.open(tmp_path)
    assert log.read(1, 1 << 30) == batch(1, 8)
    log.close()


def test_failed_undo_makes_the_log_refuse_until_reopened(tmp_path, monkeypatch):
    log = DurableLog.open(tmp_path)
    log.append(batch(1, 2))
    log.sync()
    log.append(batch(3, 2))
    monkeypatch.setattr(logmod.os, "fdatasync", FlakyFsync(2, errno.EIO))
    with pytest.raises(LogFailed):
        log.sync()
    for call in (lambda: log.append(batch(3, 1)), log.sync, lambda: log.read(1, 100)):
        with pytest.raises(LogFailed, match="reopened"):
            call()
    log.close()
    monkeypatch.undo()
    log = DurableLog.open(tmp_path)
    assert log.last()[1] in (2, 4)  # recovery decides from what reached the disk
    assert log.read(1, 1 << 30) == batch(1, log.last()[1])
    log.close()


def test_failed_write_is_undone(tmp_path, monkeypatch):
    log = DurableLog.open(tmp_path)
    log.append(batch(1, 2))
    size = next(tmp_path.glob("*.seg")).stat().st_size
    real_pwrite = os.pwrite

    def short_then_full(fd: int, data, offset: int) -> int:
        if len(data) > 100:
            real_pwrite(fd, bytes(data[:100]), offset)
            return 100
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("node.storage.durable.os.pwrite", short_then_full)
    with pytest.raises(LogDiskFull):
        log.append(batch(3, 2))
    monkeypatch.undo()
    assert next(tmp_path.glob("*.seg")).stat().st_size == size
    assert log.last() == (1, 2) and log.sync() == 2
    log.append(batch(3, 2))
    log.close()
    log = DurableLog.open(tmp_path)
    assert log.read(1, 1 << 30) == batch(1, 4)
    log.close()
