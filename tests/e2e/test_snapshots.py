"""Snapshots on real containers: a fresh node with the highest address joins a cluster holding 100,000 rows
whose log was compacted. It must end with the same database as every other node, and never lead before it
has caught up (it is a learner until then, and takes the lead only by handover).

"Same database": every node's `/db/backup` is read back and dumped (`iterdump`, every table, our internal
ones included), and the dumps must be equal byte for byte. Every wait has a deadline; nothing is timed.
"""

from __future__ import annotations

import hashlib
import http.client
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import Timings, node_id, wait_until
from tests.e2e.test_replication import ENV, ReplicatedCluster, call, form, token, writable

pytestmark = pytest.mark.e2e

SNAP_ENV = {**ENV, "SNAPSHOT_ENTRIES": "50", "SNAPSHOT_TRAILING": "10", "LOG_SEGMENT_BYTES": "65536"}
ROWS = 100_000
BATCH = 2_000  # rows per INSERT statement (one request each): 50 requests


@pytest.fixture
def scluster(docker: Any, image: str):
    cluster = ReplicatedCluster(docker, image, env=SNAP_ENV)
    try:
        cluster.create_network()
        yield cluster
    finally:
        cluster.destroy()


def dump_digest(port: int, tok: str) -> tuple[str, int]:
    """sha256 of the iterdump of the node's /db/backup, and its applied index."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/db/backup", headers={"Authorization": f"Bearer {tok}"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        applied = int(resp.headers["X-TalentNest-Applied-Index"])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "copy.db"
            with open(path, "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
            db = sqlite3.connect(path)
            try:
                h = hashlib.sha256()
                for line in db.iterdump():
                    h.update(line.encode())
                return h.hexdigest(), applied
            finally:
                db.close()
    finally:
        conn.close()


def test_a_fresh_highest_node_joins_100k_rows_by_snapshot_ends_identical_and_leads_only_after(
    scluster: ReplicatedCluster, timings: Timings
) -> None:
    names, ids = form(scluster)
    tok = token(scluster)
    leader = names[-1]
    port = scluster.port(leader)
    assert (
        call(
            port, "/db/execute", [["CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, bio TEXT)"]], tok
        )[0]
        == 200
    )
    for first in range(0, ROWS, BATCH):
        values = ",".join(f"({i}, 'person {i}', '{'x' * 40} {i}')" for i in range(first, first + BATCH))
        status, _, body = call(
            port, "/db/execute", [[f"INSERT INTO people VALUES {values}"]], tok, timeout_s=30
        )
        assert status == 200, body
    filled = (scluster.status(leader) or {}).get("commit_index", 0)  # the last entry holding those rows
    # Enough entries after the rows that the leader's log no longer holds them (nor its memory window).
    for i in range(300):
        assert (
            call(port, "/db/execute", [["INSERT INTO people (name) VALUES (?)", f"later {i}"]], tok)[0] == 200
        )
    try:
        wait_until(
            lambda: (scluster.status(leader) or {}).get("log_first_index", 1) > filled, 30, 0.5,
            what="the leader's log compacted past the rows",
        )  # fmt: skip
    except AssertionError:
        logs = scluster.docker("logs", leader, check=False).stdout
        lines = [x for x in logs.splitlines() if "snapshot" in x or '"error"' in x or "warning" in x]
        raise AssertionError(f"{scluster.status(leader)}\n" + "\n".join(lines[-30:])) from None

    # Small writes go on while the newcomer joins: every one is acknowledged or refused, none lost.
    acked: list[int] = []
    done = threading.Event()

    def writer() -> None:
        for i in range(100_000):  # bounded; stopped by `done` long before
            if done.is_set():
                return
            target = writable(scluster, names + [newcomer]) or leader
            status, _, _ = call(
                scluster.port(target), "/db/execute", [["INSERT INTO people (name) VALUES (?)", f"w{i}"]], tok
            )
            if status == 200:
                acked.append(i)
            time.sleep(0.02)

    loaded_index = (scluster.status(leader) or {}).get("commit_index", 0)  # every row is at or below it
    assert loaded_index > 0
    newcomer = scluster.run(4)
    ids[newcomer] = node_id(scluster.ip(newcomer))
    assert ids[newcomer] > max(ids[n] for n in names)
    thread = threading.Thread(target=writer, name="writes-during-join")
    thread.start()
    led_early: list[dict] = []
    started = time.monotonic()
    try:

        def leads() -> bool:
            view = scluster.status(newcomer, timeout=1.0) or {}
            if view.get("writable"):
                # When it leads it must hold every row loaded before it started (committed in its log).
                if view.get("commit_index", 0) < loaded_index:
                    led_early.append(view)
                return True
            return False

        wait_until(leads, 180, 0.5, what="the newcomer to catch up, become a voter and lead")
    finally:
        done.set()
        thread.join(30)
    timings.record("snapshot join", "100k-row newcomer leads after", round(time.monotonic() - started, 1))
    assert not led_early, led_early
    logs = scluster.docker("logs", newcomer, check=False).stdout
    installed = logs.find('"event":"snapshot_installed"')
    became = logs.find('"event":"replication_became_leader"')
    assert installed != -1 and became != -1 and installed < became, "it led before it installed the snapshot"
    assert acked, "no write was acknowledged during the join"

    everyone = names + [newcomer]
    digests: dict[str, tuple[str, int]] = {}

    def same() -> bool:
        digests.clear()
        for name in everyone:
            digests[name] = dump_digest(scluster.port(name), tok)
        return len({d for d, _ in digests.values()}) == 1

    wait_until(same, 60, 1.0, what="every node's database identical")
    status, _, body = call(
        scluster.port(newcomer), "/db/query?q=SELECT+count(*)+FROM+people+WHERE+id+<+100000", tok=tok
    )
    assert status == 200 and body["results"][0]["values"] == [[ROWS]]
