"""/db/load of an SQLite *file* with REPLICATION=on, on real 3-node clusters of node processes.

The file is staged on a majority before one LoadFile entry is proposed; every node then swaps it in at that
entry's index. Checked here: a backup of one cluster loads into a fresh cluster and every node's own copy
(level=none) gives identical rows; with one follower stopped the load is acknowledged (leader + one of two
followers staged it) and the stopped follower, started again, fetches the file and ends identical; with
both followers down the load answers 503 and nothing changes; a bad file answers 400 and nothing changes.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import apsw
import pytest

from node.storage.sqlite import SQLITE_MAGIC
from tests.integration.test_replicated_load import LOAD_ENV, formed, local, post_raw, same_everywhere
from tests.integration.test_replication import base, call, token, writable_node
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

ROWS_SQL = "SELECT id, name, hex(data), score FROM people ORDER BY id"


def backup(c: Cluster, ip: str, tok: str) -> bytes:
    request = urllib.request.Request(f"{base(c, ip)}/db/backup", headers={"Authorization": f"Bearer {tok}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.read()


def sqlite_file(path: Path, rows: int, name: str) -> bytes:
    """An SQLite file as a client would upload it (rollback journal, made outside any node)."""
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, data BLOB, score REAL)")
    with conn:
        for i in range(1, rows + 1):
            conn.execute("INSERT INTO people VALUES (?, ?, ?, ?)", (i, f"{name}-{i}", bytes([i % 256]) * 3, i / 7))
    conn.close()
    return path.read_bytes()


def rows_of(c: Cluster, ip: str, tok: str) -> Any:
    return local(c, ip, ROWS_SQL, tok)


def test_a_backup_of_one_cluster_loads_into_a_fresh_cluster_with_identical_rows_everywhere(make_cluster):
    source: Cluster = make_cluster(env=LOAD_ENV)
    leader, follower = formed(source)
    tok = token(source)
    assert call(
        f"{base(source, leader)}/db/execute",
        [["CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, data BLOB, score REAL)"]]
        + [["INSERT INTO people VALUES (?, ?, x'00ff', ?)", i, f"n{i}", i * 1.5] for i in range(1, 201)],
        tok,
    )[0] == 200  # fmt: skip
    expected = same_everywhere(source, ROWS_SQL, tok)
    assert len(expected) == 200
    copy = backup(source, follower, tok)
    assert copy.startswith(SQLITE_MAGIC)
    source.close()  # two clusters at once would only slow this shared machine

    fresh: Cluster = make_cluster(env=LOAD_ENV)
    leader, follower = formed(fresh)
    tok = token(fresh)
    # Through a follower: forwarded to the leader like a dump.
    status, headers, body = post_raw(f"{base(fresh, follower)}/db/load", copy, tok, {"X-Request-Id": "restore-1"})
    assert status == 200, body
    index = int(headers["X-TalentNest-Index"])
    assert int(headers["X-TalentNest-Epoch"]) >= 1
    assert same_everywhere(fresh, ROWS_SQL, tok) == expected
    wait_until(
        lambda: all((fresh.nodes[ip].status() or {}).get("applied_index", 0) >= index for ip in fresh.ips), 20,
        what="the load's index applied everywhere",
    )  # fmt: skip
    # A retry with the same request ID answers the first outcome; nothing is loaded again.
    status, headers, body = post_raw(f"{base(fresh, leader)}/db/load", copy, tok, {"X-Request-Id": "restore-1"})
    assert status == 200, body
    assert int(headers["X-TalentNest-Index"]) == index
    # The cluster goes on writing on top of the loaded data, on every node.
    assert call(f"{base(fresh, follower)}/db/execute", [["INSERT INTO people(id, name) VALUES (999, 'after')"]],
                tok)[0] == 200  # fmt: skip
    assert same_everywhere(fresh, "SELECT count(*) FROM people", tok) == [[201]]
    for ip in fresh.ips:
        assert fresh.nodes[ip].events("replicated_load_applied"), ip
        # Every node keeps the staged file (its entry is still in the log): /cluster/status shows it.
        assert (fresh.nodes[ip].status() or {}).get("staged_load_bytes") == len(copy), ip


def test_a_load_with_a_follower_down_is_acknowledged_and_the_follower_catches_up(make_cluster, tmp_path):
    c: Cluster = make_cluster(env=LOAD_ENV)
    leader, _ = formed(c)
    tok = token(c)
    assert call(f"{base(c, leader)}/db/execute", [["CREATE TABLE old (x)"], ["INSERT INTO old VALUES (1)"]],
                tok)[0] == 200  # fmt: skip
    same_everywhere(c, "SELECT x FROM old", tok)
    down, up = [ip for ip in c.ips if ip != leader]
    c.nodes[down].stop()
    c.publish_dns()

    # A bad file: 400, nothing staged or proposed, nothing changed.
    status, _, body = post_raw(f"{base(c, leader)}/db/load", SQLITE_MAGIC + b"\x00" * 300, tok)
    assert status == 400 and body["code"] and "invalid SQLite data" in body["error"], body
    assert local(c, leader, "SELECT x FROM old", tok) == [[1]]

    # Leader + one of two followers hold it: a majority, so the load is acknowledged.
    data = sqlite_file(tmp_path / "load.db", 300, "one-down")
    wait_until(lambda: writable_node(c, [leader, up]), 30, what="a writable leader with one follower down")
    status, headers, body = post_raw(f"{base(c, leader)}/db/load", data, tok, {"X-Request-Id": "one-down"})
    assert status == 200, body
    expected = wait_until(lambda: rows_of(c, leader, tok), 10, what="the loaded rows on the leader")
    assert len(expected) == 300 and expected[0][1] == "one-down-1"
    wait_until(lambda: rows_of(c, up, tok) == expected, 20, what="the loaded rows on the running follower")
    assert local(c, leader, "SELECT x FROM old", tok) is None, "the old database is gone, not merged"

    # The stopped follower starts, fetches the file it missed and ends identical.
    c.start(down)
    wait_until(lambda: rows_of(c, down, tok) == expected, 60, what="the loaded rows on the restarted follower",
               describe=c.describe)  # fmt: skip
    assert c.nodes[down].events("staged_load_fetched"), "it fetched the file it missed while down"
    assert same_everywhere(c, ROWS_SQL, tok) == expected


def test_a_load_with_both_followers_down_answers_503_and_changes_nothing(make_cluster, tmp_path):
    c: Cluster = make_cluster(env=LOAD_ENV)
    leader, _ = formed(c)
    tok = token(c)
    assert call(f"{base(c, leader)}/db/execute", [["CREATE TABLE old (x)"], ["INSERT INTO old VALUES (1)"]],
                tok)[0] == 200  # fmt: skip
    same_everywhere(c, "SELECT x FROM old", tok)
    followers = [ip for ip in c.ips if ip != leader]
    for ip in followers:
        c.nodes[ip].kill()
    c.publish_dns()
    data = sqlite_file(tmp_path / "load.db", 50, "nobody")
    status, _, body = post_raw(f"{base(c, leader)}/db/load", data, tok, timeout_s=90)
    assert status == 503, body
    # Staging finds no majority (load_not_staged) or, if the lease ran out first, the leader refuses.
    assert body["code"] in ("load_not_staged", "no_quorum", "not_leader", "not_writable"), body
    assert local(c, leader, "SELECT x FROM old", tok) == [[1]]
    assert local(c, leader, "SELECT count(*) FROM people", tok) is None

    # The followers come back: still the old data everywhere, nothing was proposed.
    for ip in followers:
        c.start(ip)
    wait_until(lambda: writable_node(c, c.ips), 60, what="a writable leader again", describe=c.describe)
    assert call(f"{base(c, leader)}/db/execute", [["INSERT INTO old VALUES (2)"]], tok)[0] == 200
    assert same_everywhere(c, "SELECT x FROM old ORDER BY x", tok) == [[1], [2]]
    for ip in c.ips:
        assert local(c, ip, "SELECT count(*) FROM people", tok) is None, ip
        assert not c.nodes[ip].events("replicated_load_applied"), ip


def test_a_follower_back_after_compaction_gets_the_load_by_snapshot_and_the_staged_file_goes(
    make_cluster, tmp_path
):
    """The log compacted past the load's entry: the returning follower is sent a snapshot (which holds the
    loaded data), and the staged file is removed from the nodes whose log no longer holds the entry."""
    from tests.integration.test_snapshots import SNAP_ENV

    c: Cluster = make_cluster(env={**SNAP_ENV, "PROBE_TIMEOUT": "0.75", "PROBE_INTERVAL": "0.25"})
    leader, _ = formed(c)
    tok = token(c)
    down = next(ip for ip in c.ips if ip != leader)
    c.nodes[down].stop()
    c.publish_dns()
    data = sqlite_file(tmp_path / "load.db", 20, "compacted")
    wait_until(lambda: writable_node(c, c.ips), 30, what="a writable leader with one follower down")
    status, _, body = post_raw(f"{base(c, leader)}/db/load", data, tok)
    assert status == 200, body
    # More entries than the core keeps in memory (256) and than the log keeps after compaction.
    for i in range(100, 400):
        status, _, body = call(f"{base(c, leader)}/db/execute", [["INSERT INTO people(id, name) VALUES (?, 'w')", i]],
                               tok)  # fmt: skip
        assert status == 200, body
    wait_until(lambda: c.nodes[leader].events("staged_load_removed"), 30,
               what="the staged file removed once the log dropped its entry")  # fmt: skip
    c.start(down)
    expected = wait_until(lambda: rows_of(c, leader, tok), 10, what="rows on the leader")
    assert len(expected) == 320
    wait_until(lambda: rows_of(c, down, tok) == expected, 60, what="the rows on the returning follower",
               describe=c.describe)  # fmt: skip
    names = [e["event"] for e in c.nodes[down].events(all_runs=False)]
    assert "snapshot_installed" in names and "staged_load_fetched" not in names, names[-40:]
