"""DurableLog.reset: after a snapshot install the log continues right after it, whatever a crash interrupts.

The property test crashes reset at every one of its steps (the durable.crash_point hook raising, which leaves
the files exactly as a killed process would: every step writes through to the kernel before the hook runs)
over random segment layouts, then reopens: the log must be the old one, a contiguous suffix of it, an empty
log, or the new empty log. The SIGKILL version of the same runs in test_snapshot_crash.py.
"""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.storage import durable
from node.storage.asynclog import AsyncLog
from node.storage.log import DurableLog, LogEntry


class Crash(BaseException):
    """Raised by the crash hook: the process 'dies' here (nothing after this step runs)."""


def payload(index: int) -> bytes:
    return b"%d;" % index * (index % 7 + 1)


def build(directory, count: int, segment_bytes: int, epoch_every: int) -> list[LogEntry]:
    log = DurableLog.open(directory, segment_bytes=segment_bytes)
    entries = [LogEntry(1 + i // epoch_every, i, i % 3, payload(i)) for i in range(1, count + 1)]
    # One append per entry, so segments roll over at segment_bytes.
    for e in entries:
        log.append([e])
    log.sync()
    log.close()
    return entries


def read_all(log: DurableLog) -> list[LogEntry]:
    out: list[LogEntry] = []
    index = log.first_index
    last = log.last()[1]
    for _ in range(last - index + 2):  # bounded: at least one entry per read
        if index > last:
            break
        chunk = log.read(index, 1 << 20)
        out.extend(chunk)
        index = chunk[-1].index + 1
    return out


def test_reset_empties_the_log_after_the_snapshot_and_appends_continue(tmp_path):
    build(tmp_path, 200, 512, 30)
    log = DurableLog.open(tmp_path, segment_bytes=512)
    assert len(log.segments()) > 3
    log.reset(150, 9)
    assert log.first_index == 151 and log.last() == (9, 150) and log.synced_index == 150
    assert log.epoch_at(150) == 9 and log.read(151, 1 << 20) == []
    assert [p.name for p in tmp_path.iterdir()] == ["00000000000000000151.seg"]
    with pytest.raises(ValueError):
        log.append([LogEntry(8, 151, 0, b"older epoch than the snapshot's")])
    kept = [LogEntry(9, 151, 0, b"a"), LogEntry(10, 152, 1, b"b")]
    log.append(kept)
    assert log.sync() == 152
    log.close()
    again = DurableLog.open(tmp_path, segment_bytes=512)
    assert again.first_index == 151 and again.last() == (10, 152) and again.epoch_at(150) == 9
    assert read_all(again) == kept
    again.close()


def test_reset_beyond_and_below_the_old_log(tmp_path):
    build(tmp_path, 50, 256, 10)
    log = DurableLog.open(tmp_path)
    log.reset(10_000, 4)  # a follower far behind
    assert log.last() == (4, 10_000)
    log.reset(0, 0)  # back to an empty log from the start: allowed (first index 1)
    assert log.first_index == 1 and log.last() == (0, 0)
    with pytest.raises(ValueError):
        log.reset(-1, 0)
    log.close()


async def test_async_log_reset(tmp_path):
    build(tmp_path, 30, 256, 10)
    async with AsyncLog(lambda: DurableLog.open(tmp_path)) as alog:
        await alog.reset(77, 5)
        assert alog.last == (5, 77) and alog.first_index == 78 and alog.synced_index == 77
        assert await alog.append_and_sync([LogEntry(5, 78, 0, b"x")]) == 78
        assert await alog.epoch_at(77) == 5


def classify(log: DurableLog, old: list[LogEntry], base_index: int, base_epoch: int) -> str:
    """Which of the allowed states the reopened log is in (an AssertionError if none)."""
    entries = read_all(log)
    first, (last_epoch, last) = log.first_index, log.last()
    if first == base_index + 1 and not entries and last_epoch == base_epoch:
        return "new"
    if not entries:
        return "empty"
    assert entries == old[first - 1 :], "not a contiguous suffix of the old log"
    assert (last_epoch, last) == (old[-1].epoch, old[-1].index)
    return "old" if first == 1 else "suffix"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    count=st.integers(1, 60),
    segment_bytes=st.sampled_from([64, 200, 700, 4096]),
    epoch_every=st.integers(1, 50),
    base_index=st.integers(0, 200),
    base_epoch=st.integers(0, 9),
    crash_at=st.integers(0, 30),
)
def test_property_reset_crashed_at_any_step_opens_as_an_allowed_state(
    tmp_path, count, segment_bytes, epoch_every, base_index, base_epoch, crash_at
):
    directory = tmp_path / "log"
    shutil.rmtree(directory, ignore_errors=True)
    old = build(directory, count, segment_bytes, epoch_every)
    seen: list[str] = []

    def hook(step: str) -> None:
        seen.append(step)
        if len(seen) > crash_at:
            raise Crash(step)

    log = DurableLog.open(directory, segment_bytes=segment_bytes)
    segments = len(log.segments())
    durable._crash_point = hook
    try:
        log.reset(base_index, base_epoch)
        crashed = False
    except Crash:
        crashed = True
    finally:
        durable._crash_point = None
        log.close()
    # Steps: one per unlinked segment, then temp written, renamed.
    steps = ["log-reset-unlinked"] * segments + ["log-reset-temp-written", "log-reset-renamed"]
    assert seen == steps[: len(seen)] and (crashed or seen == steps)
    reopened = DurableLog.open(directory, segment_bytes=segment_bytes)
    try:
        state = classify(reopened, old, base_index, base_epoch)
        if not crashed:
            assert state == "new"
        elif crash_at == 0:
            assert state != "old"  # one segment was unlinked before the first step
        # Whatever state it is in, the caller's repair (reset again) gives the new log, and appends work.
        reopened.reset(base_index, base_epoch)
        reopened.append([LogEntry(base_epoch, base_index + 1, 0, b"after")])
        assert reopened.sync() == base_index + 1
    finally:
        reopened.close()
    assert not list(directory.glob("*.tmp"))
