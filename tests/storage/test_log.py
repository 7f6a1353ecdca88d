"""The durable log's contract: round trip, reopen, truncate, bounded reads, epochs, compaction, versions.

Recovery from torn and damaged files is in test_log_recovery.py, crashes in test_log_crash.py, a full disk in
test_log_disk_full.py, random operation sequences against a model in test_log_model.py.
"""

from __future__ import annotations

import os
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.storage import log as logmod
from node.storage.durable import FramedFileError
from node.storage.hardstate import (
    HardState,
    HardStateError,
    decode_hard_state,
    encode_hard_state,
    load_hard_state,
    save_hard_state,
)
from node.storage.identity import IDENTITY_FILE_NAME, IdentityError, load_or_create_identity
from node.storage.log import DurableLog, LogCompacted, LogEntry, LogVersionError


def entries(start: int, count: int, epoch: int = 1, size: int = 10) -> list[LogEntry]:
    return [LogEntry(epoch, i, i % 7, bytes([i % 251]) * size) for i in range(start, start + count)]


@pytest.fixture
def log_dir(tmp_path):
    return tmp_path / "log"


def test_round_trip_and_reopen(log_dir):
    log = DurableLog.open(log_dir, sqlite_version="3.54.1")
    assert log.last() == (0, 0) and log.first_index == 1
    first = entries(1, 5, epoch=1) + entries(6, 5, epoch=3)
    assert log.append(first) == 10
    assert log.synced_index == 0
    assert log.sync() == 10 and log.synced_index == 10
    assert log.read(1, 1 << 20) == first
    assert log.last() == (3, 10)
    assert [log.epoch_at(i) for i in (0, 1, 5, 6, 10)] == [0, 1, 1, 3, 3]
    log.close()
    again = DurableLog.open(log_dir, sqlite_version="3.54.1")
    assert again.read(1, 1 << 20) == first
    assert again.last() == (3, 10)
    assert again.epoch_at(7) == 3 and again.term_at(2) == 1
    again.close()


def test_empty_payload_and_every_kind_survive(log_dir):
    log = DurableLog.open(log_dir)
    batch = [LogEntry(0, 1, 0, b""), LogEntry(0, 2, 0xFFFF, b"\x00" * 3), LogEntry(2**63 - 1, 3, 5, b"z")]
    log.append(batch)
    log.sync()
    log.close()
    log = DurableLog.open(log_dir)
    assert log.read(1, 1 << 20) == batch
    assert log.read(1, 10) == batch[:1]  # a budget below one entry still returns one
    log.close()


def test_read_is_bounded_by_bytes_but_returns_at_least_one(log_dir):
    log = DurableLog.open(log_dir, segment_bytes=400)
    all_entries = []
    for start in range(1, 60, 6):  # several segments
        batch = entries(start, 6, size=20)
        log.append(batch)
        all_entries += batch
    log.sync()
    assert len(log.segments()) > 3
    size = all_entries[0].size_bytes  # 46 bytes each
    for from_index in (1, 5, 6, 7, 30, 59):
        for budget in (0, 1, size - 1, size, size + 1, 3 * size, 7 * size + 5, 1 << 20):
            got = log.read(from_index, budget)
            expected_count = max(1, budget // size)
            assert got == all_entries[from_index - 1 : from_index - 1 + expected_count], (from_index, budget)
            assert sum(e.size_bytes for e in got) <= max(budget, size)
    assert log.read(61, 100) == []
    big = LogEntry(1, 61, 1, b"b" * 5000)
    log.append([big])
    assert log.read(61, 10) == [big]
    log.close()


def test_truncate_after_drops_suffix_durably_across_segments(log_dir):
    log = DurableLog.open(log_dir, segment_bytes=300)
    for start in range(1, 40, 5):
        log.append(entries(start, 5, epoch=start))
    log.sync()
    segments_before = len(log.segments())
    log.truncate_after(12)
    assert log.last() == (11, 12) and log.synced_index == 12
    assert len(log.segments()) < segments_before
    log.truncate_after(12)  # nothing after it: no-op
    log.truncate_after(100)
    log.append([LogEntry(50, 13, 0, b"new")])
    log.sync()
    log.close()
    log = DurableLog.open(log_dir, segment_bytes=300)
    got = log.read(1, 1 << 20)
    assert [e.index for e in got] == list(range(1, 14))
    assert got[-1] == LogEntry(50, 13, 0, b"new")
    assert log.epoch_at(12) == 11 and log.epoch_at(13) == 50
    log.truncate_after(0)
    assert log.last() == (0, 0)
    log.close()
    log = DurableLog.open(log_dir)
    assert log.last() == (0, 0) and log.read(1, 100) == []
    assert len(log.segments()) == 1
    log.close()


def test_truncate_keeps_unsynced_prefix_durable(log_dir):
    log = DurableLog.open(log_dir)
    log.append(entries(1, 10))
    log.truncate_after(4)
    assert log.synced_index == 4 and log.sync() == 4
    log.close()


def test_append_refuses_what_does_not_follow(log_dir):
    log = DurableLog.open(log_dir)
    log.append(entries(1, 3, epoch=2))
    bad = [
        [LogEntry(2, 5, 0, b"")],  # gap
        [LogEntry(2, 3, 0, b"")],  # repeat
        [LogEntry(1, 4, 0, b"")],  # epoch goes back
        [LogEntry(2, 4, 0x10000, b"")],  # kind out of range
        [LogEntry(2, 4, 0, "text")],  # payload not bytes
        [LogEntry(2, 4, 0, b""), LogEntry(2, 6, 0, b"")],  # gap inside the batch
    ]
    for batch in bad:
        with pytest.raises(ValueError):
            log.append(batch)
        assert log.last() == (2, 3)
    small = DurableLog.open(log_dir.parent / "small", max_payload_bytes=10)
    with pytest.raises(ValueError):
        small.append([LogEntry(0, 1, 0, b"x" * 11)])
    small.close()
    log.close()


def test_append_groups_fails_a_bad_group_alone(log_dir):
    log = DurableLog.open(log_dir)
    results = log.append_groups([entries(1, 2), entries(5, 1), entries(3, 2), [], entries(5, 1)])
    assert [type(r) for r in results] == [type(None), ValueError, type(None), type(None), type(None)]
    assert log.sync() == 5
    assert [e.index for e in log.read(1, 1 << 20)] == [1, 2, 3, 4, 5]
    assert log.stats["appends"] == 1
    log.close()


def test_compact_drops_whole_old_segments_only(log_dir):
    log = DurableLog.open(log_dir, segment_bytes=250)
    for start in range(1, 50, 5):
        log.append(entries(start, 5, epoch=start))
    log.sync()
    spans = [(s.first_index, s.last_index) for s in log.segments()]
    assert len(spans) > 3
    epoch_before = {first: log.epoch_at(first - 1) for first, _ in spans}
    upto = spans[2][1] + 2  # inside the fourth segment: that one stays
    assert log.compact(upto) == spans[3][0]
    assert log.first_index == spans[3][0]
    assert log.epoch_at(log.first_index - 1) == epoch_before[spans[3][0]]
    with pytest.raises(LogCompacted):
        log.read(1, 100)
    with pytest.raises(LogCompacted):
        log.epoch_at(1)
    with pytest.raises(LogCompacted):
        log.truncate_after(log.first_index - 2)
    assert log.compact(10**6) == spans[-1][0]  # never the last segment
    kept = log.read(log.first_index, 1 << 20)
    prev_epoch = log.epoch_at(log.first_index - 1)
    log.close()
    log = DurableLog.open(log_dir, segment_bytes=250)
    assert log.first_index == spans[-1][0] and log.read(log.first_index, 1 << 20) == kept
    assert log.epoch_at(log.first_index - 1) == prev_epoch == epoch_before[spans[-1][0]]
    log.truncate_after(log.first_index - 1)  # everything after the snapshot point: empty, first index kept
    assert log.last() == (prev_epoch, log.first_index - 1)
    log.close()
    log = DurableLog.open(log_dir)
    assert log.last() == (prev_epoch, spans[-1][0] - 1)
    log.append([LogEntry(prev_epoch, spans[-1][0], 0, b"again")])
    log.close()


def test_new_log_may_start_after_a_snapshot_index(log_dir):
    log = DurableLog.open(log_dir, first_index=101)
    assert log.last() == (0, 100)
    log.append([LogEntry(3, 101, 0, b"a")])
    log.close()
    log = DurableLog.open(log_dir, first_index=1)  # an existing log keeps its own first index
    assert log.first_index == 101 and log.last() == (3, 101)
    log.close()


def test_sqlite_version_is_recorded_per_segment(log_dir):
    log = DurableLog.open(log_dir, sqlite_version="3.54.1")
    log.append(entries(1, 3))
    log.close()
    log = DurableLog.open(log_dir, sqlite_version="3.99.0")
    assert log.sqlite_version_at(3) == "3.54.1"
    log.append(entries(4, 2))
    assert log.sqlite_version_at(4) == "3.99.0"
    assert [(s.sqlite_version, s.first_index, s.last_index) for s in log.segments()] == [
        ("3.54.1", 1, 3),
        ("3.99.0", 4, 5),
    ]
    log.close()
    # Truncating the newer segment away makes the older one the last: appends continue there.
    log = DurableLog.open(log_dir, sqlite_version="3.54.1")
    log.truncate_after(3)
    log.append(entries(4, 1))
    assert [s.sqlite_version for s in log.segments()] == ["3.54.1"]
    log.close()
    # An empty last segment of another version is replaced, not followed by a second one.
    fresh = log_dir.parent / "fresh"
    DurableLog.open(fresh, sqlite_version="3.54.1").close()
    log = DurableLog.open(fresh, sqlite_version="3.99.0")
    log.append(entries(1, 1))
    assert [(s.sqlite_version, s.first_index) for s in log.segments()] == [("3.99.0", 1)]
    log.close()


def test_default_sqlite_version_is_the_linked_library(log_dir):
    import apsw

    log = DurableLog.open(log_dir)
    log.append(entries(1, 1))
    assert log.sqlite_version_at(1) == apsw.sqlite_lib_version()
    log.close()


def test_unknown_format_version_is_refused_explicitly(log_dir):
    log = DurableLog.open(log_dir)
    log.append(entries(1, 2))
    log.close()
    (path,) = log_dir.glob("*.seg")
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 2)  # format version 2, header checksum recomputed
    hlen = struct.unpack_from("<H", data, 10)[0]
    struct.pack_into("<I", data, hlen - 4, logmod.crc32c(bytes(data[: hlen - 4])))
    path.write_bytes(bytes(data))
    with pytest.raises(LogVersionError, match="format version 2"):
        DurableLog.open(log_dir)


def test_log_is_confined_to_its_thread(log_dir):
    log = DurableLog.open(log_dir)
    errors = []

    def other() -> None:
        try:
            log.append(entries(1, 1))
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert errors and "confined" in str(errors[0])
    assert log.last() == (0, 0)
    log.close()


def test_free_bytes_reports_the_filesystem(log_dir):
    log = DurableLog.open(log_dir)
    st = os.statvfs(log_dir)
    assert abs(log.free_bytes() - st.f_bavail * st.f_frsize) < (64 << 20)
    log.close()


# ---------------------------------------------------------------- hard state and identity


def test_hard_state_round_trip_and_refusals(tmp_path):
    assert load_hard_state(tmp_path, "me") == HardState(node_id="me")
    state = HardState(
        node_id="me", epoch=4, promised_epoch=5, promised_to="you", commit_index=9, voters=("a", "b")
    )
    save_hard_state(tmp_path, state)
    assert load_hard_state(tmp_path, "me") == state
    with pytest.raises(HardStateError, match="belongs to node me"):
        load_hard_state(tmp_path, "someone-else")
    path = tmp_path / "hard-state"
    data = bytearray(path.read_bytes())
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x20
        path.write_bytes(bytes(damaged))
        with pytest.raises(HardStateError):
            load_hard_state(tmp_path, "me")
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(HardStateError):
        load_hard_state(tmp_path, "me")
    with pytest.raises(ValueError):
        HardState(node_id="me", epoch=3, promised_epoch=2)
    with pytest.raises(ValueError):
        HardState(node_id="me", epoch=-1)


def test_hard_state_leftover_temp_file_is_ignored(tmp_path):
    save_hard_state(tmp_path, HardState(node_id="me", epoch=1, promised_epoch=1))
    (tmp_path / "hard-state.tmp").write_bytes(b"half a write")
    assert load_hard_state(tmp_path, "me").epoch == 1
    save_hard_state(tmp_path, HardState(node_id="me", epoch=2, promised_epoch=2))
    assert load_hard_state(tmp_path, "me").epoch == 2
    assert not (tmp_path / "hard-state.tmp").exists()


def test_identity_is_created_once_and_kept(tmp_path):
    first = load_or_create_identity(tmp_path / "data")
    assert load_or_create_identity(tmp_path / "data") == first
    assert load_or_create_identity(tmp_path / "other") != first
    path = tmp_path / "data" / IDENTITY_FILE_NAME
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path / "data")
    assert path.exists()  # never replaced by a new identity behind the operator's back


def test_open_makes_what_it_recovered_durable(log_dir, monkeypatch):
    """Entries a killed process appended but never synced may sit only in the page cache: once reopened they
    count as synced (and may be acked), so open must fsync them first."""
    log = DurableLog.open(log_dir)
    log.append(entries(1, 3))
    log.close()  # never synced
    synced_paths = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        synced_paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(logmod.os, "fdatasync", recording)
    log = DurableLog.open(log_dir)
    assert log.synced_index == 3
    assert any(p.endswith(".seg") for p in synced_paths)
    log.close()


_ids = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    node_id=_ids,
    epoch=st.integers(0, 2**63 - 1),
    extra=st.integers(0, 2**20),
    promised_to=st.none() | _ids,
    commit_index=st.integers(0, 2**63 - 1),
    voters=st.lists(_ids, max_size=8),
    flip=st.integers(0, 10_000),
    bit=st.integers(0, 7),
)
def test_any_hard_state_round_trips_and_any_flipped_bit_is_refused(
    node_id, epoch, extra, promised_to, commit_index, voters, flip, bit
):
    state = HardState(node_id, epoch, min(epoch + extra, 2**63 - 1), promised_to, commit_index, tuple(voters))
    data = encode_hard_state(state)
    assert decode_hard_state(data) == state
    damaged = bytearray(data)
    damaged[flip % len(data)] ^= 1 << bit
    with pytest.raises((FramedFileError, ValueError, KeyError, TypeError)):
        decode_hard_state(bytes(damaged))


def open_segment_descriptors() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd") if _readlink(fd).endswith(".seg"))


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_only_the_last_segment_holds_a_descriptor(log_dir):
    """A log that grows until snapshots exist must not run into the descriptor limit: one per segment would."""
    before = open_segment_descriptors()
    log = DurableLog.open(log_dir, segment_bytes=100)
    for start in range(1, 120, 3):
        log.append(entries(start, 3))
    assert len(log.segments()) >= 30
    assert open_segment_descriptors() - before == 1
    assert [e.index for e in log.read(1, 1 << 20)] == list(range(1, 121))
    log.truncate_after(50)  # a sealed segment becomes the last one and is written again
    log.append(entries(51, 2))
    log.sync()
    assert open_segment_descriptors() - before == 1
    log.close()
    log = DurableLog.open(log_dir, segment_bytes=100)
    assert open_segment_descriptors() - before == 1 and log.last()[1] == 52
    log.close()
    assert open_segment_descriptors() == before
