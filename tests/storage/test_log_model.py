"""Random sequences of append / sync / truncate / compact / reopen / crash against a plain in-memory model.

The model is a list of entries plus the synced length. A "crash" cuts the last segment file anywhere after
the synced part (what a killed process or a power cut may leave of unsynced writes) and reopens: the log
must then hold the synced entries plus some prefix of the unsynced ones, never anything else.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from node.storage.log import DurableLog, LogCompacted, LogEntry

SEGMENT_BYTES = 300


def record_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    (hlen,) = struct.unpack_from("<H", data, 10)
    offsets, off = [], hlen
    while off < len(data):
        offsets.append(off)
        off += 8 + struct.unpack_from("<I", data, off + 4)[0]
    return offsets


class LogModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="log-model-"))
        self.log = DurableLog.open(self.dir, segment_bytes=SEGMENT_BYTES, sqlite_version="3.54.1")
        self.entries: list[LogEntry] = []  # the model: entries from first_index on
        self.first = 1
        self.prev_epoch = 0  # epoch of entry first - 1
        self.synced = 0  # highest index known durable

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def last_index(self) -> int:
        return self.first - 1 + len(self.entries)

    @property
    def last_epoch(self) -> int:
        return self.entries[-1].epoch if self.entries else self.prev_epoch

    @rule(
        sizes=st.lists(st.integers(0, 120), min_size=0, max_size=6),
        bumps=st.lists(st.integers(0, 2), min_size=6, max_size=6),
    )
    def append(self, sizes, bumps):
        epoch, batch = self.last_epoch, []
        for i, size in enumerate(sizes):
            epoch += bumps[i]
            index = self.last_index + 1 + i
            batch.append(LogEntry(epoch, index, index % 9, bytes([index % 256]) * size))
        assert self.log.append(batch) == self.last_index + len(batch)
        self.entries += batch
        # Starting a new segment syncs the one it seals: the durable point may move forward, never back.
        assert self.synced <= self.log.synced_index <= self.last_index
        self.synced = self.log.synced_index

    @rule()
    def sync(self):
        assert self.log.sync() == self.last_index
        self.synced = self.last_index

    @rule(back=st.integers(0, 20))
    def truncate(self, back):
        index = self.last_index - back
        if index < self.first - 1:
            try:
                self.log.truncate_after(index)
            except LogCompacted:
                return
            raise AssertionError("truncating compacted entries must fail")
        self.log.truncate_after(index)
        if index < self.last_index:
            del self.entries[index - self.first + 1 :]
            self.synced = index  # truncation is durable, and so is everything before it

    @rule(upto=st.integers(0, 60))
    def compact(self, upto):
        new_first = self.log.compact(upto)
        assert self.first <= new_first <= max(self.first, upto + 1)
        if new_first > self.first:
            self.prev_epoch = self.entries[new_first - self.first - 1].epoch
            del self.entries[: new_first - self.first]
            self.first = new_first

    @rule()
    def reopen(self):
        self.log.close()
        self.log = DurableLog.open(self.dir, segment_bytes=SEGMENT_BYTES, sqlite_version="3.54.1")
        # A clean close keeps what reached the page cache; all of it is there after reopening.
        self.synced = self.last_index

    @precondition(lambda self: self.last_index > self.synced)
    @rule(data=st.data())
    def crash(self, data):
        last_segment = sorted(self.dir.glob("*.seg"))[-1]
        first_in_segment = int(last_segment.name[:20])
        offsets = record_offsets(last_segment)
        size = last_segment.stat().st_size
        synced_end = offsets[self.synced + 1 - first_in_segment] if self.synced + 1 >= first_in_segment else 0
        assert self.synced + 1 >= first_in_segment, "unsynced entries only ever sit in the last segment"
        cut = data.draw(st.integers(synced_end, size), label="cut")
        self.log.close()
        with open(last_segment, "r+b") as f:
            f.truncate(cut)
        self.log = DurableLog.open(self.dir, segment_bytes=SEGMENT_BYTES, sqlite_version="3.54.1")
        survivors = sum(1 for o, end in zip(offsets, [*offsets[1:], size], strict=True) if end <= cut)
        kept = first_in_segment - 1 + survivors
        assert kept >= self.synced
        del self.entries[kept - self.first + 1 :]
        self.synced = kept

    @rule(offset=st.integers(0, 40), budget=st.integers(0, 700))
    def read(self, offset, budget):
        start = self.first + offset
        got = self.log.read(start, budget)
        expected = self.entries[offset:]
        if not expected:
            assert got == []
            return
        assert got == expected[: len(got)] and got
        assert sum(e.size_bytes for e in got) <= max(budget, got[0].size_bytes)
        if len(got) < len(expected):
            assert sum(e.size_bytes for e in expected[: len(got) + 1]) > budget

    @invariant()
    def agrees_with_model(self):
        assert self.log.last() == (self.last_epoch, self.last_index)
        assert self.log.first_index == self.first
        assert self.log.epoch_at(self.first - 1) == self.prev_epoch
        for entry in self.entries[-3:]:
            assert self.log.epoch_at(entry.index) == entry.epoch
        assert self.log.synced_index == self.synced


LogModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestLogModel = LogModel.TestCase


def test_model_reads_everything_after_many_segments():
    """A deterministic long run through the same machine's rules (roll-over, compaction, reopen)."""
    machine = LogModel()
    try:
        for round_ in range(30):
            machine.append([round_ % 50 + 10] * 5, [round_ % 2, 0, 0, 1, 0, 0])
            if round_ % 4 == 0:
                machine.sync()
            if round_ % 7 == 3:
                machine.truncate(2)
            if round_ % 9 == 8:
                machine.compact(machine.first + 10)
            if round_ % 5 == 4:
                machine.reopen()
            machine.agrees_with_model()
        assert len(machine.log.segments()) > 3 and machine.first > 1
        machine.read(0, 1 << 20)
    finally:
        machine.teardown()
