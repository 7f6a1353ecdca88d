"""A follower whose data was damaged or wiped rejoins as a new member and is resynced by its cluster.

Real node processes (tests/support/cluster.py). A follower is stopped, its database page, log record or whole
DATA_DIR is damaged, and it is started again: it must come back under a new identity, be added as a learner
and promoted to voter only once caught up, hold exactly the leader's rows, keep the damaged files in
DATA_DIR/quarantine/<time>/, and no acknowledged write may be lost. Every wait has a deadline; the bounds
are liveness bounds, never speed assertions.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import apsw

from node.storage.log import SEGMENT_SUFFIX
from tests.integration.test_replication import ENV, base, call, form, local_values, token, writable_node
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

ROWS_BEFORE = 240  # enough rows (about 60 KB) for a database file of many pages
ROWS_WHILE_AWAY = 40
PAGE_BYTES = 4096


def _write_rows(c: Cluster, leader: str, tok: str, first: int, count: int) -> set[int]:
    """Insert ``count`` rows in batches of 20; return the values acknowledged (200)."""
    acknowledged: set[int] = set()
    for start in range(first, first + count, 20):
        values = list(range(start, min(start + 20, first + count)))
        statements = [["INSERT INTO t(v, pad) VALUES(?, ?)", v, "p" * 200] for v in values]
        status, _, body = call(f"{base(c, leader)}/db/execute?transaction", statements, tok)
        assert status == 200, body
        acknowledged.update(values)
    return acknowledged


def _prepare(c: Cluster) -> tuple[str, str, str, set[int]]:
    """A formed cluster with rows on every node: (leader, follower, token, acknowledged values)."""
    form(c)
    tok = token(c)
    leader = wait_until(lambda: writable_node(c, c.ips), 15, what="a writable leader", describe=c.describe)
    follower = c.ips[0] if c.ips[0] != leader else c.ips[1]
    status, _, body = call(f"{base(c, leader)}/db/execute", [["CREATE TABLE t (v INTEGER, pad TEXT)"]], tok)
    assert status == 200, body
    acknowledged = _write_rows(c, leader, tok, 0, ROWS_BEFORE)
    wait_until(lambda: local_values(c, follower, tok) == acknowledged, 15, what="the rows on the follower")
    return leader, follower, tok, acknowledged


def _identity(c: Cluster, ip: str) -> str | None:
    s = c.nodes[ip].status()
    return None if s is None else s.get("identity")


def _stop(c: Cluster, ip: str) -> None:
    code, _ = c.nodes[ip].stop()
    assert code == 0
    c.publish_dns()


def _rejoins_whole(
    c: Cluster, leader: str, follower: str, tok: str, old_identity: str, acknowledged: set[int]
) -> str:
    """Start the follower again and wait until it is a voter under a new identity with the leader's rows.
    Returns the new identity."""
    c.start(follower)
    new = wait_until(
        lambda: (i := _identity(c, follower)) and i != old_identity and i,
        30, what="the follower under a new identity", describe=c.describe,
    )  # fmt: skip

    def voter_everywhere() -> bool:
        for ip in c.ips:
            s = c.nodes[ip].status()
            if not s or "nodes" not in s:
                return False
            entry = next((n for n in s["nodes"] if n.get("address") == c.nodes[follower].url), None)
            if entry is None or not entry.get("voter"):
                return False
        return True

    wait_until(voter_everywhere, 40, what="the follower to be a voter again", describe=c.describe)
    # Caught up: every acknowledged write, and nothing else, on the follower and the leader alike.
    wait_until(
        lambda: local_values(c, follower, tok) == acknowledged, 20, what="the follower to hold every row",
        describe=c.describe,
    )  # fmt: skip
    assert local_values(c, leader, tok) == acknowledged
    # It was a learner first, and promoted once caught up (the leader's configuration changes, in order).
    changes = c.nodes[leader].wait_events(
        "replication_config_proposed", lambda e: new in e.get("voters", []), timeout_s=5
    )
    learner_at = min(
        i
        for i, e in enumerate(c.nodes[leader].events("replication_config_proposed"))
        if new in e.get("learners", [])
    )
    voter_at = min(
        i
        for i, e in enumerate(c.nodes[leader].events("replication_config_proposed"))
        if new in e.get("voters", [])
    )
    assert changes and learner_at < voter_at
    return new


def _write_while_away_and_rejoin(c: Cluster, damage) -> tuple[str, Path, dict]:
    leader, follower, tok, acknowledged = _prepare(c)
    old_identity = _identity(c, follower)
    assert old_identity
    _stop(c, follower)
    data_dir = Path(c.nodes[follower].env["DATA_DIR"])
    damage(data_dir)
    # Writes the follower misses while it is away are acknowledged by the other two.
    acknowledged |= _write_rows(c, leader, tok, ROWS_BEFORE, ROWS_WHILE_AWAY)
    new = _rejoins_whole(c, leader, follower, tok, old_identity, acknowledged)
    (event,) = c.nodes[follower].wait_events("data_quarantined", timeout_s=5)
    assert event["level"] == "error" and event["old_identity"] == old_identity
    assert "learner" in event["advice"]
    assert new != old_identity
    return follower, data_dir, event


def _checkpoint(db: Path) -> None:
    """Fold a WAL left behind into the file, so the damaged page is the one SQLite reads."""
    conn = apsw.Connection(str(db))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    conn.close()


def test_a_follower_with_a_corrupt_database_page_rejoins_as_a_new_member_and_catches_up(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    sizes: dict[str, int] = {}

    def damage(data_dir: Path) -> None:
        db = data_dir / "node.db"
        _checkpoint(db)
        size = db.stat().st_size
        pages = size // PAGE_BYTES
        assert pages >= 8, size
        sizes["node.db"] = size
        with open(db, "r+b") as f:  # one page in the middle, not the header
            f.seek((pages // 2) * PAGE_BYTES)
            f.write(random.Random(7).randbytes(PAGE_BYTES))

    follower, data_dir, event = _write_while_away_and_rejoin(c, damage)
    assert event["damaged"].startswith("database")
    where = Path(event["path"])
    assert where.parent == data_dir / "quarantine"
    assert (where / "node.db").stat().st_size == sizes["node.db"]
    assert (where / "node-identity").exists() and list((where / "log").glob(f"*{SEGMENT_SUFFIX}"))
    assert (where / "reason.json").exists()


def test_a_follower_with_a_corrupt_sealed_log_record_rejoins_as_a_new_member_and_catches_up(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    damaged: dict[str, int] = {}

    def damage(data_dir: Path) -> None:
        (segment,) = sorted((data_dir / "log").glob(f"*{SEGMENT_SUFFIX}"))
        data = bytearray(segment.read_bytes())
        # A byte of a record in the first half of the log: complete records follow it, so it is damage that
        # recovery must report, never a torn tail it may cut.
        offset = len(data) // 3
        data[offset] ^= 0x5A
        segment.write_bytes(bytes(data))
        damaged["offset"] = offset

    follower, data_dir, event = _write_while_away_and_rejoin(c, damage)
    assert event["damaged"].startswith("log")
    where = Path(event["path"])
    assert where.parent == data_dir / "quarantine"
    (kept,) = list((where / "log").glob(f"*{SEGMENT_SUFFIX}"))
    assert kept.read_bytes()[damaged["offset"]] != 0  # the damaged copy, as it was found
    assert (where / "node.db").exists() and (where / "node-identity").exists()


def test_a_follower_whose_data_dir_was_wiped_rejoins_whole(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    leader, follower, tok, acknowledged = _prepare(c)
    old_identity = _identity(c, follower)
    assert old_identity
    _stop(c, follower)
    data_dir = Path(c.nodes[follower].env["DATA_DIR"])
    shutil.rmtree(data_dir)
    acknowledged |= _write_rows(c, leader, tok, ROWS_BEFORE, ROWS_WHILE_AWAY)
    _rejoins_whole(c, leader, follower, tok, old_identity, acknowledged)
    # Nothing was damaged, so nothing was quarantined: a wiped node is simply a new one.
    assert c.nodes[follower].events("data_quarantined") == []
    assert not (data_dir / "quarantine").exists()


def test_a_leader_with_a_corrupt_database_rejoins_as_a_new_member_and_loses_no_acknowledged_write(
    make_cluster,
):
    """The highest node (the leader) is the damaged one: the others elect a leader and take writes while it
    is away; it comes back empty under a new identity, joins (never bootstraps: it sees their cluster), and
    catches up before it counts toward any quorum."""
    c: Cluster = make_cluster(env=ENV)
    old_leader, _, tok, acknowledged = _prepare(c)
    old_identity = _identity(c, old_leader)
    assert old_identity
    _stop(c, old_leader)
    rest = [ip for ip in c.ips if ip != old_leader]
    new_leader = wait_until(
        lambda: writable_node(c, rest), 15, what="a leader among the others", describe=c.describe
    )
    data_dir = Path(c.nodes[old_leader].env["DATA_DIR"])
    db = data_dir / "node.db"
    _checkpoint(db)
    pages = db.stat().st_size // PAGE_BYTES
    with open(db, "r+b") as f:
        f.seek((pages // 2) * PAGE_BYTES)
        f.write(random.Random(11).randbytes(PAGE_BYTES))
    acknowledged |= _write_rows(c, new_leader, tok, ROWS_BEFORE, ROWS_WHILE_AWAY)
    _rejoins_whole(c, new_leader, old_leader, tok, old_identity, acknowledged)
    (event,) = c.nodes[old_leader].wait_events("data_quarantined", timeout_s=5)
    assert event["damaged"].startswith("database") and c.nodes[old_leader].events(
        "replication_bootstrapped"
    ) == [
        e
        for e in c.nodes[old_leader].events("replication_bootstrapped")
        if e["timestamp"] < event["timestamp"]
    ]
    for ip in c.ips:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == acknowledged, 20, what=f"every row on {ip}")
