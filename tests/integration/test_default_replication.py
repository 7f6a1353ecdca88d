"""REPLICATION=on is the default; REPLICATION=off stays an explicit opt-out. Real node processes.

* A node started with no replication setting is a replicated cluster of one: /readyz says not ready while
  it forms (FORMATION_WINDOW) and, once it says ready, the first write is accepted at once.
* REPLICATION=off: every node serves its own database, as before (the opt-out stays covered).
* A DATA_DIR written with REPLICATION=off is refused by a node started with the default, naming the way out
  (an upgrade must not turn it into a follower that never accepts a write), and opens again with the opt-out.
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import pytest

from tests.integration.test_replication import base, call, token
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

FAST = {"PROBE_INTERVAL": "0.1", "PROBE_TIMEOUT": "0.2", "DISCOVERY_INTERVAL": "1"}


def readyz(c: Cluster, ip: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{base(c, ip)}/readyz", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_a_node_with_default_settings_is_ready_once_formed_and_then_accepts_writes(make_cluster):
    # The documented window, shortened: long enough to be seen from outside, short for the test.
    c: Cluster = make_cluster(size=1, env={**FAST, "FORMATION_WINDOW": "3"})
    ip = c.ips[0]
    assert "REPLICATION" not in c.nodes[ip].env  # the default, not a setting
    c.start(ip)
    seen: list[tuple[int, str]] = []

    def ready() -> bool:
        seen.append(readyz(c, ip))
        return seen[-1][0] == 200

    wait_until(ready, 30, 0.05, what="/readyz 200", describe=c.describe)
    assert any(s == 503 and "[-]replication starting" in text for s, text in seen), seen[-3:]
    tok = token(c)
    status, headers, body = call(f"{base(c, ip)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)
    assert status == 200, body  # ready means ready: no 503 "replication is starting"
    assert int(headers["X-TalentNest-Epoch"]) >= 1 and int(headers["X-TalentNest-Index"]) >= 1
    assert call(f"{base(c, ip)}/db/execute", [["INSERT INTO t VALUES (1)"]], tok)[0] == 200
    st = c.nodes[ip].status()
    assert st["writable"] and st["replication"] == "leader" and sum(n["voter"] for n in st["nodes"]) == 1


def test_replication_off_is_an_opt_out_every_node_serves_its_own_database(make_cluster):
    c: Cluster = make_cluster(size=2, env={**FAST, "REPLICATION": "off"})
    c.start_all()
    a, b = c.ips
    for ip in (a, b):
        wait_until(lambda ip=ip: readyz(c, ip)[0] == 200, 30, what=f"{ip} ready", describe=c.describe)
    tok = token(c)
    for ip, value in ((a, 1), (b, 2)):  # the follower accepts writes too: nothing is forwarded
        status, headers, _ = call(f"{base(c, ip)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)
        assert status == 200 and "X-TalentNest-Node" not in headers
        assert call(f"{base(c, ip)}/db/execute", [[f"INSERT INTO t VALUES ({value})"]], tok)[0] == 200
    for ip, value in ((a, 1), (b, 2)):
        _, _, body = call(f"{base(c, ip)}/db/query?q=SELECT+v+FROM+t", token=tok)
        assert body["results"][0]["values"] == [[value]]
    assert all("commit_index" not in c.nodes[ip].status() for ip in (a, b))


def test_data_written_with_replication_off_is_refused_by_the_default_and_kept(make_cluster):
    c: Cluster = make_cluster(size=1, env={**FAST, "REPLICATION": "off"})
    ip = c.ips[0]
    node = c.start(ip)
    wait_until(lambda: readyz(c, ip)[0] == 200, 30, what="ready with REPLICATION=off", describe=c.describe)
    tok = token(c)
    assert (
        call(
            f"{base(c, ip)}/db/execute", [["CREATE TABLE t (v INTEGER)"], ["INSERT INTO t VALUES (7)"]], tok
        )[0]
        == 200
    )
    assert node.stop()[0] == 0

    # The upgrade: same DATA_DIR, no REPLICATION setting any more.
    node.env.pop("REPLICATION")
    node.start()
    try:
        code = node.wait_exit(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the node kept running on data written without replication:\n{node.tail()}")
    assert code != 0
    crashed = node.wait_events("node_crashed", all_runs=False)
    assert "written without replication" in crashed[-1]["error"]
    assert "REPLICATION=off" in crashed[-1]["error"]  # names the way out

    # The opt-out opens it again, every row there.
    node.env["REPLICATION"] = "off"
    node.start()
    wait_until(
        lambda: readyz(c, ip)[0] == 200, 30, what="ready again with REPLICATION=off", describe=c.describe
    )
    _, _, body = call(f"{base(c, ip)}/db/query?q=SELECT+v+FROM+t", token=tok)
    assert body["results"][0]["values"] == [[7]]
