"""A running node that fails (an error none of its actors handles) is restarted in the same process, and its
start-up quarantines what is damaged: the cluster heals by itself, with no container restart policy.

Real node processes (tests/support/cluster.py), a realistic failure and no hook in the node: a follower is
stopped, the leader takes more writes than it keeps in memory (``keep_applied``), and one byte of the
record the follower needs next is damaged in the leader's log segment on disk. When the follower comes
back, the leader reads those entries from the disk to send them (``ReadLog``: every read verifies the
checksums), gets LogCorrupt, and fails. Before: the process exited 1 and, run the documented way (``docker
run`` without ``--restart``), stayed down. Now it logs ``node_crashed`` and ``node_restarting``, starts again
in the same process, finds the damaged log at start, quarantines it and rejoins as a new member; every
acknowledged row ends up on every node. Every wait has a deadline; the bounds are liveness bounds.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from node.core.replication.machine import Options
from node.storage.log import SEGMENT_SUFFIX
from tests.integration.test_integrity_resync import _identity, _write_rows
from tests.integration.test_replication import ENV, base, call, form, local_values, token, writable_node
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

ROWS_BEFORE = 40
# Single-row writes (one log entry each) while the follower is away: more than the leader keeps in memory
# past its applied index, so the entries the follower needs next are read back from the disk.
ENTRIES_WHILE_AWAY = Options().keep_applied + 200
ROWS_AFTER = 20

_HEADER_LENGTH = struct.Struct("<H")  # at byte 10 of a segment header (node/storage/log.py, format v1)
_RECORD_PREFIX = struct.Struct("<II")  # crc32c, body length
_RECORD_IDS = struct.Struct("<QQ")  # epoch, index: the start of the body


def _record_span(log_dir: Path, index: int) -> tuple[Path, int, int]:
    """(segment, offset, length) of the record of entry ``index`` in a log directory, by walking the records
    of each segment as the format describes them (node/storage/log.py)."""
    for segment in sorted(log_dir.glob(f"*{SEGMENT_SUFFIX}")):
        data = segment.read_bytes()
        (offset,) = _HEADER_LENGTH.unpack_from(data, 10)
        while offset + _RECORD_PREFIX.size + _RECORD_IDS.size <= len(data):
            _, body = _RECORD_PREFIX.unpack_from(data, offset)
            _, found = _RECORD_IDS.unpack_from(data, offset + _RECORD_PREFIX.size)
            if found == index:
                return segment, offset, _RECORD_PREFIX.size + body
            if found > index:
                break
            offset += _RECORD_PREFIX.size + body
    raise AssertionError(f"entry {index} is in no segment of {log_dir}")


def _single_row_writes(c: Cluster, leader: str, tok: str, first: int, count: int) -> set[int]:
    acknowledged: set[int] = set()
    for v in range(first, first + count):
        status, _, body = call(
            f"{base(c, leader)}/db/execute", [["INSERT INTO t(v, pad) VALUES(?, 'x')", v]], tok
        )
        assert status == 200, body
        acknowledged.add(v)
    return acknowledged


def _voter_everywhere(c: Cluster, ip: str) -> bool:
    for other in c.ips:
        s = c.nodes[other].status()
        if not s or "nodes" not in s:
            return False
        entry = next((n for n in s["nodes"] if n.get("address") == c.nodes[ip].url), None)
        if entry is None or not entry.get("voter"):
            return False
    return True


def test_a_leader_that_fails_on_a_damaged_log_record_restarts_in_process_quarantines_and_rejoins(
    make_cluster,
):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    leader = wait_until(lambda: writable_node(c, c.ips), 15, what="a writable leader", describe=c.describe)
    away = next(ip for ip in c.ips if ip != leader)
    status, _, body = call(f"{base(c, leader)}/db/execute", [["CREATE TABLE t (v INTEGER, pad TEXT)"]], tok)
    assert status == 200, body
    acknowledged = _write_rows(c, leader, tok, 0, ROWS_BEFORE)

    # The follower holds the leader's whole log when it stops: the next entry is the first it will need.
    def caught_up() -> int | None:
        mine, theirs = c.nodes[away].status(), c.nodes[leader].status()
        if not mine or not theirs or mine.get("last_index") != theirs.get("last_index"):
            return None
        return mine.get("last_index")

    follower_last = wait_until(
        caught_up, 15, what="the follower to hold the leader's log", describe=c.describe
    )
    code, _ = c.nodes[away].stop()
    assert code == 0
    c.publish_dns()
    acknowledged |= _single_row_writes(c, leader, tok, ROWS_BEFORE, ENTRIES_WHILE_AWAY)
    leader_status = c.nodes[leader].status()
    assert leader_status and leader_status["applied_index"] - Options().keep_applied > follower_last + 1

    # One byte of that entry's record in the leader's segment: it is no longer in the leader's memory, so
    # the leader will read it from the disk, where every read verifies the checksums.
    old_identity = _identity(c, leader)
    assert old_identity
    data_dir = Path(c.nodes[leader].env["DATA_DIR"])
    segment, offset, length = _record_span(data_dir / "log", follower_last + 1)
    with open(segment, "r+b") as f:
        f.seek(offset + length - 1)
        last = f.read(1)
        f.seek(offset + length - 1)
        f.write(bytes([last[0] ^ 0x5A]))
    c.start(away)

    node = c.nodes[leader]
    (crash,) = node.wait_events("node_crashed", timeout_s=30)[:1]
    assert crash["level"] == "error" and "LogCorrupt" in crash["error"], crash
    (restarting,) = node.wait_events("node_restarting", timeout_s=10)[:1]
    assert restarting["attempt"] == 1 and restarting["delay_s"] == 1.0, restarting
    assert restarting["timestamp"] >= crash["timestamp"]
    # The same process starts again: start-up finds the damaged log and quarantines the replicated state.
    (quarantined,) = node.wait_events("data_quarantined", timeout_s=30)
    assert quarantined["damaged"].startswith("log") and quarantined["old_identity"] == old_identity
    assert Path(quarantined["path"]).parent == data_dir / "quarantine"
    assert node.running and node.starts == 1, "the process must not have exited"
    assert len(node.events("node_started")) == 2

    # It rejoins as a new member and becomes a voter once caught up; every acknowledged row is everywhere.
    new_identity = wait_until(
        lambda: (i := _identity(c, leader)) and i != old_identity and i,
        30, what="the restarted node under a new identity", describe=c.describe,
    )  # fmt: skip
    assert new_identity != old_identity
    wait_until(
        lambda: _voter_everywhere(c, leader), 60, what="the restarted node to be a voter", describe=c.describe
    )
    writer = wait_until(
        lambda: writable_node(c, c.ips), 15, what="a writable leader again", describe=c.describe
    )
    acknowledged |= _write_rows(c, writer, tok, ROWS_BEFORE + ENTRIES_WHILE_AWAY, ROWS_AFTER)
    for ip in c.ips:
        wait_until(
            lambda ip=ip: local_values(c, ip, tok) == acknowledged, 30, what=f"every row on {ip}",
            describe=c.describe,
        )  # fmt: skip
    assert node.running and node.events("node_crashed") == [crash]
    assert c.all_log_problems() == []
