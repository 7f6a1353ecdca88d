"""Recovery at open: a torn tail is cut silently, anything else that fails validation is reported with its offset.

The rule under test: only the final record may be partial. A file cut anywhere inside the last record (or
followed by zero-filled blocks) reopens with every complete record before it; a flipped byte anywhere else is
:class:`LogCorrupt` naming the segment and the offset of the damaged record, and the file is left untouched
for the caller to quarantine.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.storage.log import DurableLog, LogCorrupt, LogEntry, segment_name


def make_entries(count: int, start: int = 1) -> list[LogEntry]:
    # Varied sizes and epochs, so lengths and epoch checks are all exercised.
    return [
        LogEntry(1 + i // 4, i, i % 3, bytes((i * 7 + k) % 256 for k in range(i % 5 * 9)))
        for i in range(start, start + count)
    ]


def build(directory: Path, batches: list[list[LogEntry]], segment_bytes: int = 1 << 20) -> None:
    log = DurableLog.open(directory, segment_bytes=segment_bytes, sqlite_version="3.54.1")
    for batch in batches:
        log.append(batch)
    log.sync()
    log.close()


def record_offsets(path: Path) -> tuple[int, list[int]]:
    """(header length, offset of each record) of a segment file, read by its framing."""
    data = path.read_bytes()
    (hlen,) = struct.unpack_from("<H", data, 10)
    offsets = []
    off = hlen
    while off < len(data):
        offsets.append(off)
        (length,) = struct.unpack_from("<I", data, off + 4)
        off += 8 + length
    assert off == len(data)
    return hlen, offsets


def read_all(directory: Path) -> list[LogEntry]:
    log = DurableLog.open(directory, sqlite_version="3.54.1")
    try:
        return log.read(log.first_index, 1 << 30)
    finally:
        log.close()


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


@pytest.mark.parametrize("segments", [1, 2], ids=["one-segment", "last-record-alone-in-second-segment"])
def test_torn_tail_at_every_byte_offset_of_the_last_record(tmp_path, segments):
    original = tmp_path / "original"
    entries = make_entries(9)
    if segments == 1:
        build(original, [entries])
    else:
        build(original, [entries[:8], entries[8:]], segment_bytes=64)
    last = segment_files(original)[-1]
    assert len(segment_files(original)) == segments
    _, offsets = record_offsets(last)
    start, size = offsets[-1], last.stat().st_size
    assert size - start == entries[-1].size_bytes
    for cut in range(start, size):
        trial = tmp_path / f"cut-{cut}"
        shutil.copytree(original, trial)
        with open(segment_files(trial)[-1], "r+b") as f:
            f.truncate(cut)
        log = DurableLog.open(trial, sqlite_version="3.54.1")
        assert log.read(1, 1 << 20) == entries[:-1], cut
        assert log.last() == (entries[-2].epoch, 8)
        assert segment_files(trial)[-1].stat().st_size == start  # the torn bytes are gone from disk
        log.append(entries[-1:])  # and the log goes on where it stopped
        log.sync()
        log.close()
        assert read_all(trial) == entries
        shutil.rmtree(trial)


def test_zero_filled_tail_is_cut(tmp_path):
    entries = make_entries(6)
    build(tmp_path, [entries])
    (path,) = segment_files(tmp_path)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(4096))
    assert read_all(tmp_path) == entries
    assert path.stat().st_size == size
    _, offsets = record_offsets(path)
    with open(path, "r+b") as f:  # the last record's blocks never written: zeros from its start
        f.seek(offsets[-1])
        f.write(bytes(size - offsets[-1]))
    assert read_all(tmp_path) == entries[:-1]


def test_flipped_byte_in_any_middle_record_is_corruption_with_its_offset(tmp_path):
    entries = make_entries(8)
    build(tmp_path, [entries])
    (path,) = segment_files(tmp_path)
    pristine = path.read_bytes()
    _, offsets = record_offsets(path)
    for record, start in enumerate(offsets[:-1]):
        end = offsets[record + 1]
        for position in range(start, end):
            for bit in (0x01, 0x80):
                damaged = bytearray(pristine)
                damaged[position] ^= bit
                path.write_bytes(bytes(damaged))
                with pytest.raises(LogCorrupt) as caught:
                    DurableLog.open(tmp_path, sqlite_version="3.54.1")
                assert caught.value.offset == start, (position, caught.value)
                assert caught.value.segment == path
                assert path.read_bytes() == bytes(damaged)  # nothing cut, nothing rewritten
    path.write_bytes(pristine)
    assert read_all(tmp_path) == entries


def test_complete_final_record_with_a_bad_checksum_is_corruption(tmp_path):
    entries = make_entries(5)
    build(tmp_path, [entries])
    (path,) = segment_files(tmp_path)
    _, offsets = record_offsets(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt) as caught:
        DurableLog.open(tmp_path)
    assert caught.value.offset == offsets[-1]


def test_damaged_length_hiding_valid_records_is_corruption(tmp_path):
    entries = make_entries(8)
    build(tmp_path, [entries])
    (path,) = segment_files(tmp_path)
    _, offsets = record_offsets(path)
    data = bytearray(path.read_bytes())
    # The fourth record claims to run past the end of the file: it would look torn but for what follows it.
    struct.pack_into("<I", data, offsets[3] + 4, len(data))
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt, match="followed by a valid one") as caught:
        DurableLog.open(tmp_path)
    assert caught.value.offset == offsets[3]


def test_damage_in_a_sealed_segment_is_corruption_even_at_its_end(tmp_path):
    entries = make_entries(12)
    build(tmp_path, [entries[:6], entries[6:]], segment_bytes=64)
    first, second = segment_files(tmp_path)
    _, offsets = record_offsets(first)
    pristine = first.read_bytes()
    for cut in (offsets[-1] + 3, len(pristine) - 1):  # truncation is torn only in the LAST segment
        first.write_bytes(pristine[:cut])
        with pytest.raises(LogCorrupt) as caught:
            DurableLog.open(tmp_path)
        assert caught.value.segment == first and caught.value.offset == offsets[-1]
    damaged = bytearray(pristine)
    damaged[offsets[2] + 30] ^= 0x10
    first.write_bytes(bytes(damaged))
    with pytest.raises(LogCorrupt) as caught:
        DurableLog.open(tmp_path)
    assert caught.value.offset == offsets[2]
    first.write_bytes(pristine)
    assert read_all(tmp_path) == entries
    assert second.exists()


def test_gap_between_segments_is_corruption(tmp_path):
    entries = make_entries(12)
    build(tmp_path, [entries[:4], entries[4:8], entries[8:]], segment_bytes=64)
    files = segment_files(tmp_path)
    assert len(files) == 3
    files[1].unlink()
    with pytest.raises(LogCorrupt, match="after a segment ending at 4"):
        DurableLog.open(tmp_path)


@pytest.mark.parametrize("keep", [0, 1, 7, 8, 20, 28, 35, 50, 63])
def test_segment_torn_while_being_created_is_removed(tmp_path, keep):
    entries = make_entries(8)
    build(tmp_path, [entries[:4], entries[4:]], segment_bytes=64)
    files = segment_files(tmp_path)
    header = files[-1].read_bytes()[: record_offsets(files[-1])[0]]
    assert keep < len(header)
    torn = tmp_path / segment_name(9)
    torn.write_bytes(header[:keep])  # the node stopped before this header was fsynced
    assert read_all(tmp_path) == entries
    assert not torn.exists()
    torn.write_bytes(bytes(len(header)))
    assert read_all(tmp_path) == entries and not torn.exists()


def test_only_segment_torn_while_being_created_is_recreated(tmp_path):
    (tmp_path / segment_name(1)).write_bytes(b"TNLOG")
    log = DurableLog.open(tmp_path)
    assert log.last() == (0, 0)
    log.append(make_entries(2))
    log.close()
    assert len(read_all(tmp_path)) == 2


def test_full_header_with_a_bad_checksum_is_corruption(tmp_path):
    build(tmp_path, [make_entries(3)])
    (path,) = segment_files(tmp_path)
    hlen, _ = record_offsets(path)
    data = bytearray(path.read_bytes())
    data[hlen - 6] ^= 0x01  # inside the SQLite version
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt) as caught:
        DurableLog.open(tmp_path)
    assert caught.value.offset == 0


def test_read_verifies_checksums_of_entries_damaged_after_open(tmp_path):
    entries = make_entries(6)
    build(tmp_path, [entries])
    log = DurableLog.open(tmp_path)
    (path,) = segment_files(tmp_path)
    _, offsets = record_offsets(path)
    assert entries[3].payload  # damage lands inside a payload
    with open(path, "r+b") as f:
        f.seek(offsets[3] + 27)
        f.write(b"\xff")
    assert log.read(1, offsets[3] - offsets[0]) == entries[:3]
    with pytest.raises(LogCorrupt) as caught:
        log.read(1, 1 << 20)
    assert caught.value.offset == offsets[3]
    log.close()


# ---------------------------------------------------------------- every kind of damage, generated


@st.composite
def damaged_logs(draw):
    count = draw(st.integers(1, 14))
    sizes = draw(st.lists(st.integers(0, 40), min_size=count, max_size=count))
    entries = [LogEntry(1 + i // 3, i, i % 4, bytes([i % 256]) * sizes[i - 1]) for i in range(1, count + 1)]
    split = draw(st.integers(1, count))
    damage = draw(st.sampled_from(["cut", "flip", "zeros"]))
    return entries, split, damage, draw(st.randoms(use_true_random=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=damaged_logs())
def test_any_damage_is_cut_as_a_torn_tail_or_reported_never_misread(tmp_path_factory, case):
    entries, split, damage, rnd = case
    directory = tmp_path_factory.mktemp("log")
    build(
        directory, [entries[:split], entries[split:]] if split < len(entries) else [entries], segment_bytes=64
    )
    files = segment_files(directory)
    target = rnd.choice(files)
    data = bytearray(target.read_bytes())
    hlen, offsets = record_offsets(target)
    is_last = target == files[-1]
    last_record_start = offsets[-1] if offsets else len(data)
    if damage == "cut":
        if not is_last:
            target = files[-1]
            data = bytearray(target.read_bytes())
            hlen, offsets = record_offsets(target)
            is_last = True
        position = rnd.randrange(0, len(data) + 1)
        target.write_bytes(bytes(data[:position]))
    elif damage == "flip":
        position = rnd.randrange(0, len(data))
        data[position] ^= 1 << rnd.randrange(8)
        target.write_bytes(bytes(data))
    else:
        position = len(data)
        target.write_bytes(bytes(data) + bytes(rnd.randrange(1, 600)))
    before = [e for e in entries if e.index < (int(target.name[:20]))]
    try:
        got = read_all(directory)
    except LogCorrupt as exc:
        assert damage == "flip" or not is_last, (damage, position)
        assert exc.segment.exists()
        return
    # Recovered: the result is exactly a prefix, and it loses only what lay at or after the damage in the
    # last segment (a cut, zero fill, or a flip inside the final record).
    assert got == entries[: len(got)]
    if damage == "flip":
        assert is_last and position >= (last_record_start if offsets else 0), (position, len(got))
        assert len(got) >= len(entries) - 1
    else:
        kept_in_target = [o for o in offsets if o < position]
        complete = sum(1 for i, o in enumerate(offsets) if (offsets + [len(data)])[i + 1] <= position)
        assert len(got) == len(before) + complete, (position, kept_in_target)
