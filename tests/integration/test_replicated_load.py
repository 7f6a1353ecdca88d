"""/db/load of an SQL dump with REPLICATION=on, on a real 3-node cluster of node processes.

A dump sent to a follower is forwarded to the leader, shipped as chunk entries and applied by one end
entry on every node: every node's own copy (level=none) must then hold the same rows; a dump that fails in
a later chunk must leave nothing anywhere; a retry with the same X-Request-Id applies once; the leader keeps
its lease (no election) while a dump of many chunks is shipped and applied, with writes going on.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from node.storage.sqlite import SQLITE_MAGIC
from tests.integration.test_replication import ENV, base, call, form, token, writable_node
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

# Membership probes more patient than ENV's (0.2 s): this machine's cores are shared, and a node busy applying
# a dump of tens of MiB next to its peers must not be taken for dead by a probe timing out. The replication
# layer's own heartbeats and lease are unchanged, and they are what the no-election assertion is about.
LOAD_ENV = {**ENV, "PROBE_TIMEOUT": "0.75", "PROBE_INTERVAL": "0.25"}
ELECTION_EVENTS = (
    "replication_campaign_started", "replication_leader_stepped_down", "replication_epoch_adopted",
)  # fmt: skip


def post_raw(
    url: str, data: bytes, tok: str, headers: dict[str, str] | None = None, timeout_s: float = 60.0
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Authorization", f"Bearer {tok}")
    request.add_header("Content-Type", "application/octet-stream")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def load_with_retries(
    c: Cluster, ip: str, dump: bytes, tok: str, request_id: str, attempts: int = 5
) -> tuple[int, dict[str, str], Any, list[Any]]:
    """POST the dump until it is answered other than 503, retrying with the same X-Request-Id as a client
    should (this machine's shared cores can make a follower lose sight of its leader for a moment, which
    answers 503 outcome_unknown); returns the last answer and every earlier 503 body."""
    earlier = []
    for _ in range(attempts):
        # Generous: on this shared machine two survivors of a kill may need many campaigns to elect.
        wait_until(lambda: writable_node(c, c.ips), 60, what="a writable leader")
        status, headers, body = post_raw(f"{base(c, ip)}/db/load", dump, tok, {"X-Request-Id": request_id})
        if status != 503:
            return status, headers, body, earlier
        earlier.append(body)
    return status, headers, body, earlier


def local(c: Cluster, ip: str, sql: str, tok: str) -> list[list[Any]] | None:
    status, _, body = call(f"{base(c, ip)}/db/query?level=none&q={urllib.request.quote(sql)}", token=tok)
    if status != 200 or "error" in body["results"][0]:
        return None
    return body["results"][0].get("values", [])


def same_everywhere(c: Cluster, sql: str, tok: str) -> list[list[Any]]:
    """Wait until every node's own copy answers ``sql`` alike (and not with an error); return the answer."""

    def check() -> list[list[Any]] | None:
        answers = [local(c, ip, sql, tok) for ip in c.ips]
        if answers[0] is None or any(a != answers[0] for a in answers):
            return None
        return answers[0]

    return wait_until(check, 20, what=f"{sql!r} alike on every node", describe=lambda: [
        local(c, ip, sql, tok) for ip in c.ips])  # fmt: skip


def big_dump(rows: int) -> bytes:
    pad = "p" * 100
    lines = [
        "PRAGMA foreign_keys=OFF;",
        "BEGIN TRANSACTION;",
        "CREATE TABLE big (id INTEGER PRIMARY KEY, pad TEXT, note TEXT, at TEXT DEFAULT CURRENT_TIMESTAMP);",
    ]
    lines += [f"INSERT INTO big(id, pad, note) VALUES ({i}, '{pad}', 'row;{i}');" for i in range(1, rows + 1)]
    lines.append("COMMIT;")
    return ("\n".join(lines) + "\n").encode()


def formed(c: Cluster) -> tuple[str, str]:
    form(c)
    leader = wait_until(lambda: writable_node(c, c.ips), 10, what="a writable leader")
    follower = next(ip for ip in c.ips if ip != leader)
    return leader, follower


def test_a_large_dump_through_a_follower_applies_alike_everywhere_without_an_election(make_cluster):
    c: Cluster = make_cluster(env=LOAD_ENV)
    leader, follower = formed(c)
    tok = token(c)
    assert call(f"{base(c, follower)}/db/execute", [["CREATE TABLE w (n INTEGER)"]], tok)[0] == 200
    epochs = {c.nodes[ip].status()["epoch"] for ip in c.ips}
    assert len(epochs) == 1
    dump = big_dump(40_000)
    assert len(dump) > 5 * (1 << 20), "the dump must span several chunks"

    # Writes go on, through the follower, while the load is shipped and applied.
    acknowledged: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        for n in range(100_000):
            if stop.is_set():
                return
            status, _, _ = call(f"{base(c, follower)}/db/execute", [[f"INSERT INTO w VALUES ({n})"]], tok)
            if status == 200:
                acknowledged.append(n)

    thread = threading.Thread(target=writer, daemon=True)
    started = time.time()
    thread.start()
    try:
        status, headers, body, earlier = load_with_retries(c, follower, dump, tok, "big-1")
    finally:
        stop.set()
        thread.join(30)
    assert status == 200, (body, earlier)
    assert body["results"] == [{"statements": 40_002}]  # the pragma, CREATE and the rows
    assert headers["X-TalentNest-Node"] == str(c.nodes[leader].node_id)
    load_index = int(headers["X-TalentNest-Index"])
    assert acknowledged, "writes kept being acknowledged during the load"

    summary = same_everywhere(c, "SELECT count(*), sum(id), min(at), max(at), count(DISTINCT note) FROM big", tok)
    assert summary[0][0] == 40_000 and summary[0][1] == 40_000 * 40_001 // 2 and summary[0][4] == 40_000
    assert summary[0][2] == summary[0][3], "one stamped time for the whole load"
    written = same_everywhere(c, "SELECT n FROM w ORDER BY n", tok)
    assert set(acknowledged) <= {row[0] for row in written}

    # No election while the load ran: same epoch, same leader, no campaign anywhere.
    assert {c.nodes[ip].status()["epoch"] for ip in c.ips} == epochs
    assert writable_node(c, c.ips) == leader
    for ip in c.ips:
        events = [e for e in c.nodes[ip].events() if e.get("event") in ELECTION_EVENTS]
        late = [e for e in events if e.get("timestamp") and _after(e["timestamp"], started)]
        assert not late, (ip, late)

    # A retry with the same request ID answers the first outcome and applies nothing again.
    status, headers, body = post_raw(f"{base(c, follower)}/db/load", dump, tok, {"X-Request-Id": "big-1"})
    assert status == 200, body
    assert int(headers["X-TalentNest-Index"]) == load_index
    assert same_everywhere(c, "SELECT count(*) FROM big", tok) == [[40_000]]

    # /db/backup answers from the node asked, naming the applied index its copy reflects.
    request = urllib.request.Request(f"{base(c, follower)}/db/backup", headers={"Authorization": f"Bearer {tok}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        copy = resp.read()
        applied = int(resp.headers["X-TalentNest-Applied-Index"])
        node = resp.headers.get("X-TalentNest-Node")
    assert copy.startswith(SQLITE_MAGIC) and applied >= load_index
    assert node in (None, str(c.nodes[follower].node_id))


def _after(timestamp: str, started: float) -> bool:
    from tests.support.cluster import parse_timestamp

    return parse_timestamp(timestamp) >= started


def test_a_dump_failing_in_a_later_chunk_leaves_nothing_anywhere(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    leader, follower = formed(c)
    tok = token(c)
    assert call(f"{base(c, leader)}/db/execute", [["CREATE TABLE keep (x)"]], tok)[0] == 200
    good = big_dump(12_000)
    bad = good + b"INSERT INTO nowhere VALUES (1);\n"
    assert len(good) > 1 << 20
    status, _, body = post_raw(f"{base(c, follower)}/db/load", bad, tok)
    assert status == 400, body
    assert "nothing was loaded" in body["error"] and "no such table: nowhere" in body["error"]
    # Every copy: no table of the dump, the earlier table kept, the same applied index.
    tables = same_everywhere(c, "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE '\\_%' "
                                "ESCAPE '\\' ORDER BY name", tok)  # fmt: skip
    assert tables == [["keep"]]
    wait_until(
        lambda: len({c.nodes[ip].status()["applied_index"] for ip in c.ips}) == 1, 10,
        what="the same applied index everywhere",
    )  # fmt: skip
    # The same dump without the bad statement then loads (nothing of the failed one was left staged).
    status, _, body = post_raw(f"{base(c, leader)}/db/load", good, tok)
    assert status == 200, body
    assert same_everywhere(c, "SELECT count(*) FROM big", tok) == [[12_000]]

    # A damaged SQLite file: a clear JSON refusal (through a follower too), nothing changed anywhere.
    status, _, body = post_raw(f"{base(c, follower)}/db/load", SQLITE_MAGIC + b"\x00" * 200, tok)
    assert status == 400 and body["code"] and "invalid SQLite data" in body["error"], body
    assert same_everywhere(c, "SELECT count(*) FROM big", tok) == [[12_000]]


def test_load_limits_hold_through_a_follower(make_cluster):
    """Body limit (413) and disk reserve (507) answer as JSON, through a follower too; nothing applied."""
    c: Cluster = make_cluster(env={**ENV, "DB_MAX_LOAD_BYTES": str(1 << 20), "LOG_RESERVE_BYTES": str(1 << 50)})
    leader, follower = formed(c)
    tok = token(c)
    for ip in (follower, leader):
        status, _, body = post_raw(f"{base(c, ip)}/db/load", big_dump(20_000), tok)
        assert status == 413 and body["code"], (ip, body)
        # Within the body limit, but no node can keep LOG_RESERVE_BYTES free after it: 507 before shipping.
        status, _, body = post_raw(f"{base(c, ip)}/db/load", big_dump(10), tok)
        assert status == 507 and "LOG_RESERVE_BYTES" in body["error"], (ip, body)
    # Every node ends at one applied index (read one node after another, so waited for: a follower may
    # still be applying what the cluster committed before, up to its apply delay later), and no node's copy
    # holds the table either load would have made.
    def one_applied_index() -> bool:
        return len({c.nodes[ip].status()["applied_index"] for ip in c.ips}) == 1

    wait_until(one_applied_index, 10, what="every node at one applied index",
               describe=lambda: {ip: c.nodes[ip].status()["applied_index"] for ip in c.ips})  # fmt: skip
    for ip in c.ips:
        status, _, body = call(f"{base(c, ip)}/db/query?level=none&q=SELECT+1+FROM+big", token=tok)
        assert "no such table" in body["results"][0]["error"], (ip, body)


def test_a_load_caught_by_the_leaders_death_is_all_or_nothing_and_its_retry_applies_once(make_cluster):
    c: Cluster = make_cluster(env=LOAD_ENV)
    leader, _ = formed(c)
    tok = token(c)
    survivors = [ip for ip in c.ips if ip != leader]
    follower = survivors[0]
    dump = big_dump(50_000)  # about 8 chunks: the kill lands while they are shipped or applied
    baseline = c.nodes[leader].status()["last_index"]
    answer: dict[str, Any] = {}

    def load() -> None:
        answer["first"] = post_raw(f"{base(c, follower)}/db/load", dump, tok, {"X-Request-Id": "die-1"})

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    wait_until(
        lambda: ((c.nodes[leader].status() or {}).get("last_index") or 0) >= baseline + 3, 30,
        what="chunk entries reaching the leader's log",
    )  # fmt: skip
    c.kill9(leader)
    thread.join(60)
    status, _, body = answer["first"]
    assert status == 503 and body["code"] in ("outcome_unknown", "load_not_applied", "unavailable"), body
    wait_until(lambda: writable_node(c, survivors), 60, what="a new leader among the survivors")

    # All or nothing, and alike on both survivors.
    def count(ip: str) -> int | None:
        status, _, body = call(f"{base(c, ip)}/db/query?level=none&q=SELECT+count(*)+FROM+big", token=tok)
        if status != 200:
            return None
        result = body["results"][0]
        return 0 if "no such table" in result.get("error", "") else result.get("values", [[None]])[0][0]

    states = wait_until(
        lambda: (s := [count(ip) for ip in survivors])[0] == s[1] and s[0] in (0, 50_000) and s, 30,
        what="the survivors to agree on all or nothing", describe=lambda: [count(ip) for ip in survivors],
    )  # fmt: skip
    assert states[0] in (0, 50_000)
    # Retries with the same request ID (a busy machine may make one of them end in 503 again) apply the
    # load at most once: exactly one application in the end.
    status, _, body, earlier = load_with_retries(c, follower, dump, tok, "die-1", attempts=6)
    assert status == 200, (body, earlier)
    for ip in survivors:
        wait_until(lambda ip=ip: count(ip) == 50_000, 30, what=f"one application of the load on {ip}")
