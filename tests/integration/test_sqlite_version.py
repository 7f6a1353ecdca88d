"""A replica running another SQLite than the leader never applies the leader's writes (REPLICATION=on).

Real node processes; one follower is made to report another SQLite version by a ``sitecustomize`` on its
PYTHONPATH (the only way to run "another SQLite" without a second build). It must stop applying, say why in
/readyz and in a rate-limited log line, keep running, keep its copy unchanged, and catch up once restarted
on the leader's SQLite.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from tests.integration.test_replication import ENV, base, call, form, token, writable_node
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

FAKE_VERSION = "3.0.0-test"


def readyz(c: Cluster, ip: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{base(c, ip)}/readyz?noleader", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def local_count(c: Cluster, ip: str, tok: str) -> int | None:
    status, _, body = call(f"{base(c, ip)}/db/query?level=none&q=SELECT+count(*)+FROM+t", token=tok)
    if status != 200 or "error" in body["results"][0]:
        return None
    return body["results"][0]["values"][0][0]


def test_a_follower_on_another_sqlite_refuses_to_apply_and_resumes_on_the_same(make_cluster, tmp_path):
    patch = tmp_path / "fake-sqlite"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        f"import apsw\napsw.sqlite_lib_version = lambda: {FAKE_VERSION!r}\n", encoding="utf-8"
    )
    c: Cluster = make_cluster(env=ENV)
    odd = c.ips[0]  # the lowest ID: never the one that bootstraps and leads
    normal_env = dict(c.nodes[odd].env)
    c.nodes[odd].env["PYTHONPATH"] = str(patch)
    form(c)
    tok = token(c)
    leader = wait_until(lambda: writable_node(c, c.ips), 10, what="a writable leader")
    assert leader != odd
    assert call(f"{base(c, leader)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    for n in range(5):
        assert call(f"{base(c, leader)}/db/execute", [[f"INSERT INTO t VALUES ({n})"]], tok)[0] == 200
    others = [ip for ip in c.ips if ip != odd]
    for ip in others:
        wait_until(lambda ip=ip: local_count(c, ip, tok) == 5, 10, what=f"the rows on {ip}")

    # The odd follower: not ready, saying why; its copy has nothing of the leader's writes; it runs on.
    status, text = wait_until(
        lambda: (r := readyz(c, odd))[0] == 503 and "apply refused" in r[1] and r, 10,
        what="/readyz of the odd follower to report the refusal", describe=lambda: readyz(c, odd),
    )  # fmt: skip
    assert FAKE_VERSION in text
    assert local_count(c, odd, tok) is None  # no table t at all: nothing applied, nothing diverged
    observed_from = time.monotonic()
    wait_until(lambda: time.monotonic() - observed_from > 2.0, 5, what="a few apply retries (0.5 s apart)")
    assert c.nodes[odd].running
    lines = [e for e in c.nodes[odd].events("replication_apply_failed") if FAKE_VERSION in e.get("reason", "")]
    assert len(lines) == 1, lines  # rate-limited: one line per reason per 30 s, not one per retry
    assert lines[0]["code"] == "sqlite_version_mismatch"
    for ip in others:
        assert readyz(c, ip)[0] == 200, readyz(c, ip)

    # Restarted on the leader's SQLite, it applies what it held back and is ready again.
    c.nodes[odd].stop()
    c.nodes[odd].env = normal_env
    c.start(odd)
    # A restarted follower learns the commit index with the next Append (the core verifies its log
    # first), so one more write lets it apply the entries it held back and that one.
    wait_until(lambda: readyz(c, odd)[0] != 0, 10, what="the odd follower to answer again")
    assert call(f"{base(c, leader)}/db/execute", [["INSERT INTO t VALUES (5)"]], tok)[0] == 200
    wait_until(lambda: local_count(c, odd, tok) == 6, 20, what="the odd follower to catch up",
               describe=lambda: c.nodes[odd].status())  # fmt: skip
    wait_until(lambda: readyz(c, odd)[0] == 200, 10, what="the odd follower ready",
               describe=lambda: readyz(c, odd))  # fmt: skip
