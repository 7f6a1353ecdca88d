"""``python -m node recover`` with real node processes: a 3-node cluster loses two nodes' data for good, one
survivor is recovered, leads alone with every committed row, and two empty nodes join it as voters.

Also what guards the command: it refuses without its confirmation flag and on the directory of a running
node (the DATA_DIR lock, which also keeps a second node off a directory in use). Every wait is bounded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from node.core.replication.recovery import RECOVERED_PREFIX
from node.recover import CONFIRM_FLAG
from node.storage.dirlock import LOCK_FILE_NAME
from tests.integration.test_replication import (
    ENV,
    base,
    call,
    form,
    local_values,
    token,
    voters_everywhere,
    writable_node,
)
from tests.support.cluster import REPO, Cluster, clean_env
from tests.support.wait import wait_until

ROWS = set(range(1, 31))


def recover_cmd(data_dir: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """The documented command line, as an operator runs it (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "node", "recover", "--data-dir", data_dir, *flags],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def files(path: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock file's (it names the last holder's pid)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE_NAME
    }


def test_one_survivor_of_a_lost_majority_is_recovered_and_empty_nodes_rejoin_it(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    survivor, *lost = c.ips  # the lowest ID: the recovered node need not be the one that leads later
    leader = wait_until(lambda: writable_node(c, c.ips), 15, what="a writable leader")
    assert call(f"{base(c, leader)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    for v in sorted(ROWS):
        status, _, body = call(f"{base(c, leader)}/db/execute", [["INSERT INTO t VALUES (?)", v]], tok)
        assert status == 200, body
    wait_until(lambda: local_values(c, survivor, tok) == ROWS, 15, what="every row on the survivor")
    old_name = c.nodes[survivor].status()["cluster_name"]
    data_dir = c.nodes[survivor].env["DATA_DIR"]

    # While the node runs, its DATA_DIR is locked: recover refuses, and so does a second node.
    busy = recover_cmd(data_dir, CONFIRM_FLAG)
    assert busy.returncode == 2 and "in use by process" in busy.stderr, busy.stderr
    second = c.add_node(c.spare_ip(), DATA_DIR=data_dir).start()
    assert second.wait_exit(30) == 2
    assert any(e.get("event") == "startup_failed" and "in use" in e.get("reason", "") for e in second.events())

    for ip in c.ips:  # the whole cluster stops; two of its nodes never come back with their data
        c.nodes[ip].stop(timeout_s=10)
    c.publish_dns()

    before = files(Path(data_dir))
    dry = recover_cmd(data_dir)
    assert dry.returncode == 2 and "Dry run: nothing was changed" in dry.stdout, dry.stdout + dry.stderr
    assert files(Path(data_dir)) == before
    done = recover_cmd(data_dir, CONFIRM_FLAG)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Recovered:" in done.stdout and "EMPTY DATA_DIR" in done.stdout

    # Alone, the survivor leads a new cluster holding every committed row, and takes writes.
    c.start(survivor)
    wait_until(lambda: writable_node(c, [survivor]), 30, what="the recovered node to lead", describe=c.describe)
    status = c.nodes[survivor].status()
    assert status["cluster_name"].startswith(RECOVERED_PREFIX) and status["cluster_name"] != old_name
    # Applied in the background once committed in its new cluster: its own copy may trail for a moment.
    wait_until(lambda: local_values(c, survivor, tok) == ROWS, 10, what="every committed row on the survivor")
    status, _, body = call(f"{base(c, survivor)}/db/execute", [["INSERT INTO t VALUES (100)"]], tok)
    assert status == 200, body

    # The lost nodes come back with empty DATA_DIRs: learners, then voters, with the same rows.
    for ip in lost:
        shutil.rmtree(c.nodes[ip].env["DATA_DIR"])
        c.start(ip)
    wait_until(
        lambda: voters_everywhere(c, c.ips, 3), 60, what="three voters on every node", describe=c.describe
    )
    for ip in c.ips:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == ROWS | {100}, 30, what=f"the rows on {ip}")
    names = {c.nodes[ip].status()["cluster_name"] for ip in c.ips}
    assert len(names) == 1 and names.pop().startswith(RECOVERED_PREFIX)
    wait_until(lambda: writable_node(c, c.ips), 30, what="a writable leader of the three")
    writer = writable_node(c, c.ips)
    status, _, body = call(f"{base(c, writer)}/db/execute", [["INSERT INTO t VALUES (101)"]], tok)
    assert status == 200, body
    for ip in c.ips:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == ROWS | {100, 101}, 30, what=f"the last row on {ip}")
