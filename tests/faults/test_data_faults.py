"""Faults of a node's data, on real containers, judged by the same checkers as tests/faults/test_faults.py:
a follower's disk filling up, a follower restarted with a corrupted database, a follower whose DATA_DIR was
wiped. Snapshots are frequent here (every 400 entries, 64 KiB log segments), so a node that lost its data
comes back by snapshot, under the workload.

Slot 1 keeps DATA_DIR on a 96 MiB tmpfs: it can be filled to the last byte, and a restart of its container
starts it with an empty directory (a wiped disk). Slots 2 and 3 use volumes.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from node.check.checkers import Isolation
from node.check.workload import Recorder
from tests.faults.conftest import docker, image  # noqa: F401 - fixtures
from tests.faults.harness import FaultCluster, wait_for
from tests.faults.test_faults import HEAL_S, WORKLOAD_S, _assert_valid, run_fault

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(int(3 * HEAL_S + 900))]

SNAPSHOT_ENV = {
    "SNAPSHOT_ENTRIES": "400",
    "SNAPSHOT_TRAILING": "50",
    "LOG_SEGMENT_BYTES": "65536",
    "LOG_RESERVE_BYTES": "1048576",
}
TMPFS_MB = 96


@pytest.fixture(scope="module")
def disks(docker, image) -> Iterator[FaultCluster]:  # noqa: F811 - the imported fixtures
    cluster = FaultCluster(docker, image, env=SNAPSHOT_ENV)
    try:
        cluster.create_network()
        cluster.run(1, tmpfs_mb=TMPFS_MB)
        cluster.run(2)
        cluster.run(3)
        wait_for(lambda: cluster.healthy([1, 2, 3]) is None, 90, "three voters, the highest writable")
        yield cluster
    finally:
        cluster.destroy()


def readyz(cluster: FaultCluster, slot: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{cluster.url(slot)}/readyz", timeout=2) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except OSError as exc:
        return 0, str(exc)


def events(cluster: FaultCluster, slot: int, name: str) -> int:
    out = cluster.docker("logs", cluster.slots[slot], check=False).stdout
    return out.count(f'"event":"{name}"') + out.count(f'"event": "{name}"')


def test_a_followers_disk_fills_up_and_space_returns(disks: FaultCluster) -> None:
    """The follower acknowledges nothing it could not write (the checkers find no lost write, and its
    /readyz says why meanwhile); once space returns it is caught up by itself."""

    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        disks.fill_disk(1)
        rec.mark("fault: slot 1 disk full")
        wait_for(
            lambda: "log write failed" in readyz(disks, 1)[1] or "disk full" in readyz(disks, 1)[1], 30,
            "the full follower to say it cannot write",
        )  # fmt: skip
        time.sleep(WORKLOAD_S / 2)
        disks.free_disk(1)
        rec.mark("healed: space freed")
        return []

    _assert_valid("follower disk full", run_fault(disks, [1, 2, 3], "follower-disk-full", inject))
    assert events(disks, 1, "replication_log_write_failed") >= 1


def test_a_follower_restarted_with_a_corrupted_database(disks: FaultCluster) -> None:
    """The damaged database is detected at start, moved aside, and the node comes back whole from the
    cluster (under a new identity: it lost what it had acknowledged, so it counts toward no quorum until
    it has caught up)."""

    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        disks.stop(2)
        what = disks.corrupt_database(2)
        rec.mark(f"fault: slot 2 restarted with its database corrupted ({what})")
        disks.start(2)
        wait_for(lambda: disks.healthy([1, 2, 3]) is None, HEAL_S, "the corrupted node back as a voter")
        rec.mark("healed: slot 2 back")
        return []

    _assert_valid("corrupted database", run_fault(disks, [1, 2, 3], "corrupted-db-restart", inject))
    assert events(disks, 2, "data_quarantined") >= 1


def test_a_follower_whose_data_directory_was_wiped(disks: FaultCluster) -> None:
    """Slot 1's DATA_DIR is a tmpfs: stopping and starting its container wipes it. It rejoins as a new, empty
    node and, the leader's log being compacted by now, gets a snapshot, then the log tail."""

    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        disks.stop(1)
        rec.mark("fault: slot 1 wiped")
        disks.start(1)
        wait_for(lambda: disks.healthy([1, 2, 3]) is None, HEAL_S, "the wiped node back as a voter")
        rec.mark("healed: slot 1 back")
        return []

    _assert_valid("wiped data directory", run_fault(disks, [1, 2, 3], "wiped-data-dir", inject))
    assert events(disks, 1, "snapshot_installed") >= 1
