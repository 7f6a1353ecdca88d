"""Crashes for real: a child process appending and syncing (or replacing the hard state) is killed with SIGKILL.

Every index the child reported as synced before the kill must be there after reopening, with its content; the
hard state must be the last one reported or the one being written, never a mix. Rounds continue the same
log, so recovery after a kill is itself tested again by the next round.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

from node.storage.hardstate import HardState, load_hard_state
from node.storage.log import DurableLog

LOG_CHILD = r"""
import random, sys
from pathlib import Path
from node.storage.log import DurableLog, LogEntry

def payload(index):
    return (b"%d:" % index) * (index % 97 + 1)

directory, seed = Path(sys.argv[1]), int(sys.argv[2])
log = DurableLog.open(directory, segment_bytes=16 << 10)
epoch, index = log.last()
rnd = random.Random(seed)
print("ready", index, flush=True)
while True:
    batch = []
    for _ in range(rnd.randint(1, 30)):
        index += 1
        if rnd.random() < 0.03:
            epoch += 1
        batch.append(LogEntry(epoch, index, index % 5, payload(index)))
    log.append(batch)
    print(log.sync(), flush=True)
"""

HARD_STATE_CHILD = r"""
import sys
from pathlib import Path
from node.storage.hardstate import HardState, load_hard_state, save_hard_state

directory = Path(sys.argv[1])
epoch = load_hard_state(directory, "node-a").epoch
print("ready", epoch, flush=True)
while True:
    epoch += 1
    voters = tuple("voter-%d-%d" % (epoch, i) for i in range(200))
    save_hard_state(directory, HardState("node-a", epoch, epoch + 1, "node-b", epoch * 3, voters))
    print(epoch, flush=True)
"""

MAX_LINES = 5000  # a child prints one line per durable step; the parent never reads more than this


def payload(index: int) -> bytes:
    return (b"%d:" % index) * (index % 97 + 1)


def run_and_kill(
    code: str, args: list[str], lines_before_kill: int, timeout_s: float = 60
) -> tuple[str, list[str]]:
    """Start the child, read ``lines_before_kill`` lines after its ready line, SIGKILL it mid-stream. The
    lines returned include those still in the pipe at the kill: the child may have run ahead of the reader
    (on a loaded machine, many steps), and every line it printed was printed after its step was durable."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("ready"), proc.stderr.read()
        for _ in range(min(lines_before_kill, MAX_LINES)):
            line = proc.stdout.readline()
            assert line, f"child ended early: {proc.stderr.read()}"
            lines.append(line.strip())
            assert time.monotonic() < deadline, "child too slow"
    finally:
        proc.kill()  # SIGKILL: no cleanup, no flush, no close
        proc.wait(timeout=30)
        rest = proc.stdout.read()  # what it printed before it died, not read yet
        lines.extend(line.strip() for line in rest.splitlines() if line.strip())
        proc.stdout.close()
        proc.stderr.close()
    return ready, lines


def test_every_entry_reported_synced_survives_sigkill(tmp_path):
    rnd = random.Random(20261126)
    reported = 0
    for round_ in range(6):
        ready, lines = run_and_kill(LOG_CHILD, [str(tmp_path), str(round_)], rnd.randint(1, 120))
        assert int(ready.split()[1]) >= reported  # what the previous round saw synced is still there
        reported = max(int(line) for line in lines)
        log = DurableLog.open(tmp_path)
        epoch, last = log.last()
        assert last >= reported, (round_, last, reported)
        previous_epoch = 0
        index = 1
        # Bounded: the log holds at most a few thousand entries after six rounds.
        while index <= last:
            chunk = log.read(index, 1 << 20)
            assert chunk
            for entry in chunk:
                assert entry.index == index and entry.payload == payload(index) and entry.kind == index % 5
                assert entry.epoch >= previous_epoch
                previous_epoch = entry.epoch
                index += 1
        assert epoch == previous_epoch
        log.close()
    assert len(list(tmp_path.glob("*.seg"))) > 1  # the crashes also hit segment roll-overs


def test_hard_state_replace_killed_mid_write_is_old_or_new_never_a_mix(tmp_path):
    rnd = random.Random(7)
    for _ in range(8):
        _, lines = run_and_kill(HARD_STATE_CHILD, [str(tmp_path)], rnd.randint(1, 60))
        last_reported = int(lines[-1])
        state = load_hard_state(tmp_path, "node-a")
        assert state.epoch in (last_reported, last_reported + 1)
        assert state == HardState(
            "node-a",
            state.epoch,
            state.epoch + 1,
            "node-b",
            state.epoch * 3,
            tuple(f"voter-{state.epoch}-{i}" for i in range(200)),
        )
