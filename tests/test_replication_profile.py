"""The context-switch counts that ``bench/replication_profile.py`` prints per write: parsed from /proc, summed
over a process's threads, and moving when a thread really blocks."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from bench import replication_profile as rp

STATUS = """Name:\tpython
State:\tS (sleeping)
Threads:\t4
voluntary_ctxt_switches:\t1523
nonvoluntary_ctxt_switches:\t87
"""


def test_the_counts_are_read_from_a_status_text():
    assert rp.switch_counts(STATUS) == (1523, 87)


def test_a_status_without_the_counts_reads_as_none():
    assert rp.switch_counts("Name:\tpython\nvoluntary_ctxt_switches:\tmany\n") == (0, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc: Linux only")
def test_a_thread_that_blocks_adds_voluntary_switches_to_its_process():
    before = rp.context_switches(os.getpid())
    done, release = threading.Event(), threading.Event()

    def blocker() -> None:
        for _ in range(20):  # each sleep takes the thread off the CPU: one voluntary switch at least
            time.sleep(0.001)
        done.set()
        release.wait(10)  # alive (and counted) until the second reading is taken

    thread = threading.Thread(target=blocker)
    thread.start()
    assert done.wait(10)
    after = rp.context_switches(os.getpid())  # read while the thread still exists: its counts are in
    release.set()
    thread.join(10)
    assert after[0] - before[0] >= 20
    assert after[1] >= before[1]
