"""Records are written as the format defines them whichever way they are built: the batched encoder an
append uses writes byte for byte the format the module documents, and a log appended in groups
with epochs that change inside them keeps every offset and epoch run it would have kept entry by entry."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from node.storage import log as logmod
from node.storage.durable import crc32c
from node.storage.log import DurableLog, LogEntry

u63 = st.integers(0, 2**63 - 1)
log_entry = st.builds(LogEntry, u63, u63, st.integers(0, logmod.MAX_KIND), st.binary(max_size=300))


def reference_record(entry: LogEntry) -> bytes:
    """The format as the module doc states it: crc | length | epoch | index | kind | payload."""
    body = struct.pack("<QQH", entry.epoch, entry.index, entry.kind) + entry.payload
    length = struct.pack("<I", len(body))
    return struct.pack("<I", crc32c(length + body)) + length + body


@given(st.lists(log_entry, max_size=12))
def test_records_built_together_are_the_documented_records_one_after_another(entries):
    want = b"".join(reference_record(e) for e in entries)
    assert logmod.encode_records(entries) == want


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=40)), max_size=5), max_size=6))
def test_groups_keep_the_offsets_and_epoch_runs_of_single_appends(tmp_path_factory, groups):
    """Two logs: one appended in groups, one entry by entry; the same files, offsets and epochs."""
    root = tmp_path_factory.mktemp("logs")
    grouped, single = DurableLog.open(root / "g"), DurableLog.open(root / "s")
    try:
        index, epoch = 0, 1
        for group in groups:
            entries = []
            for bump, payload in group:
                index, epoch = index + 1, epoch + bump
                entries.append(LogEntry(epoch, index, 1, payload))
            assert grouped.append_groups([entries]) == [None]
            for e in entries:
                single.append([e])
        grouped.sync()
        single.sync()
        assert grouped._segments[-1].offsets == single._segments[-1].offsets
        assert grouped._runs == single._runs
        for i in range(1, index + 1):
            assert grouped.epoch_at(i) == single.epoch_at(i)
    finally:
        grouped.close()
        single.close()
    (g_seg,) = (root / "g").glob("*.seg")
    (s_seg,) = (root / "s").glob("*.seg")
    assert g_seg.read_bytes() == s_seg.read_bytes()
    reopened = DurableLog.open(root / "g")
    try:
        assert reopened.read(1, 1 << 20) == single_entries(root / "s", index)
    finally:
        reopened.close()


def single_entries(directory, last: int) -> list[LogEntry]:
    log = DurableLog.open(directory)
    try:
        return log.read(1, 1 << 20) if last else []
    finally:
        log.close()
