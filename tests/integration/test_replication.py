"""REPLICATION=on with real node processes: formation, follower writes, kill -9 of the leader, lost quorum.

Short timings (probe every 0.1 s, formation window 1 s) keep each test within seconds; every wait has a
deadline and says what it waited for. Timing bounds here are liveness bounds (a write must not hang), never
speed assertions.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from node import auth
from tests.support.cluster import Cluster
from tests.support.http import call_json
from tests.support.wait import wait_until

ENV = {
    "REPLICATION": "on",
    "FORMATION_WINDOW": "1",
    "PROBE_INTERVAL": "0.1",
    "PROBE_TIMEOUT": "0.2",
    "DISCOVERY_INTERVAL": "1",
}


def call(url: str, body: Any = None, token: str | None = None, timeout_s: float = 5.0):
    """(status, headers, JSON body) of one request; connection failures give status 0."""
    return call_json(url, body, token, timeout_s)


def token(c: Cluster) -> str:
    return auth.mint_jwt(c.jwt_secret, auth.Role.ADMIN, now=time.time(), ttl_s=3600)


def base(c: Cluster, ip: str) -> str:
    return f"http://{ip}:{c.port}"


def voters_everywhere(c: Cluster, ips: list[str], count: int) -> bool:
    for ip in ips:
        s = c.nodes[ip].status()
        if not s or "commit_index" not in s:
            return False
        if sum(1 for n in s["nodes"] if n.get("voter")) != count:
            return False
    return True


def form(c: Cluster) -> None:
    c.start_all()
    wait_until(
        lambda: voters_everywhere(c, c.ips, 3),
        30,
        what="three voters on every node",
        describe=lambda: c.describe(),
    )


def writable_node(c: Cluster, ips: list[str]) -> str | None:
    for ip in ips:
        s = c.nodes[ip].status()
        if s and s.get("writable"):
            return ip
    return None


def local_values(c: Cluster, ip: str, tok: str) -> set[int] | None:
    status, _, body = call(f"{base(c, ip)}/db/query?level=none&q=SELECT+v+FROM+t", token=tok)
    if status != 200 or "error" in body["results"][0]:
        return None
    return {row[0] for row in body["results"][0].get("values", [])}


def test_three_nodes_form_one_cluster_and_a_write_through_a_follower_reaches_every_node(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    highest, lowest = c.ips[-1], c.ips[0]
    assert wait_until(lambda: writable_node(c, c.ips), 10, what="a writable leader") == highest
    status, headers, body = call(f"{base(c, lowest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)
    assert status == 200, body
    status, headers, body = call(f"{base(c, lowest)}/db/execute", [["INSERT INTO t VALUES (42)"]], tok)
    assert status == 200, body
    assert body["results"][0]["rows_affected"] == 1
    # Executed by the leader, not by the follower that took the request.
    assert headers["X-TalentNest-Node"] == str(c.nodes[highest].node_id)
    assert int(headers["X-TalentNest-Index"]) > 0 and int(headers["X-TalentNest-Epoch"]) >= 1
    for ip in c.ips:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == {42}, 10, what=f"the row on {ip}")
    # Every node reports the same cluster epoch and the replication fields.
    statuses = [c.nodes[ip].status() for ip in c.ips]
    assert len({s["epoch"] for s in statuses}) == 1
    for s in statuses:
        assert {"commit_index", "applied_index", "writable"} <= set(s)
        assert all("voter" in n and "lag" in n for n in s["nodes"])
    # With redirect, the follower answers 301 to the leader instead of forwarding.
    status, headers, _ = call(f"{base(c, lowest)}/db/execute?redirect", [["INSERT INTO t VALUES (1)"]], tok)
    assert status == 301 and headers["Location"].startswith(base(c, highest))


def run_clients(client, count: int) -> None:
    """``client(k)`` for k in range(count), each on its own thread, all at once; every one must end within
    60 s (the clients' loops are bounded in count)."""
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)


def led_by_highest(c: Cluster, create: str) -> tuple[str, str, str]:
    """Form the cluster, wait for its highest node to lead, create a table through it: (token, highest, its
    base URL)."""
    form(c)
    tok = token(c)
    highest = c.ips[-1]
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    leader = base(c, highest)
    assert call(f"{leader}/db/execute", [[create]], tok)[0] == 200
    return tok, highest, leader


def test_concurrent_writes_through_the_leader_are_staged_and_every_node_ends_identical(make_cluster):
    """The leader runs its own writes while their Append travels (staged) and commits them after the log
    did; each client gets its own statement's result, and every node holds the same rows, including values
    only the leader's stamp decides (random())."""
    c: Cluster = make_cluster(env=ENV)
    tok, highest, leader = led_by_highest(c, "CREATE TABLE t (v INTEGER UNIQUE, r INTEGER)")
    answers: dict[int, tuple[int, dict, Any]] = {}

    def client(k: int) -> None:
        for n in range(25):  # bounded: 8 clients x 25 writes, one duplicate each
            v = k * 100 + n
            status, headers, body = call(
                f"{leader}/db/execute", [["INSERT INTO t VALUES (?, random())", v]], tok
            )
            answers[v] = (status, body, headers)
        status, headers, body = call(f"{leader}/db/execute", [["INSERT INTO t VALUES (?, 0)", k * 100]], tok)
        answers[-1 - k] = (status, body, headers)

    run_clients(client, 8)
    for v, (status, body, _) in answers.items():
        assert status == 200, (v, body)
        result = body["results"][0]
        if v >= 0:
            assert result.get("rows_affected") == 1 and "error" not in result, (v, result)
        else:
            assert "UNIQUE constraint failed" in result["error"], (
                v,
                result,
            )  # its own failure, no one else's
    # Each write names the index of its own log entry: 208 writes, 208 indices.
    assert len({int(headers["X-TalentNest-Index"]) for _, _, headers in answers.values()}) == len(answers)
    stats = c.nodes[highest].status()["replication_stats"]
    assert stats["staged_committed"] > 0, stats

    def rows(ip: str) -> list | None:
        status, _, body = call(f"{base(c, ip)}/db/query?level=none&q=SELECT+v,r+FROM+t+ORDER+BY+v", token=tok)
        return body["results"][0].get("values") if status == 200 else None

    wait_until(lambda: len(rows(highest) or []) == 200, 10, what="200 rows on the leader")
    for ip in c.ips:
        wait_until(lambda ip=ip: rows(ip) == rows(highest), 10, what=f"the leader's rows on {ip}")


def test_concurrent_writes_are_gathered_into_shared_rounds_and_a_lone_client_never_waits(make_cluster):
    """Group commit (WRITE_GATHER): with many writes under way the leader lets the held ones into the log
    together, so they share rounds; a lone client's writes each enter at once, never held."""
    c: Cluster = make_cluster(env={**ENV, "WRITE_GATHER": "0.05"})  # long, so grouping cannot be chance
    tok, highest, leader = led_by_highest(c, "CREATE TABLE t (v INTEGER PRIMARY KEY)")

    def groups() -> tuple[int, int]:
        stats = c.nodes[highest].status()["replication_stats"]
        return stats["write_groups"], stats["write_groups_gathered"]

    before = groups()
    for v in range(20):  # one client, one write at a time: nothing else under way
        assert call(f"{leader}/db/execute", [["INSERT INTO t VALUES (?)", v]], tok)[0] == 200
    alone = groups()
    assert alone == (before[0] + 20, before[1]), (before, alone)  # each its own group, none held

    statuses: list[int] = []

    def client(k: int) -> None:
        for n in range(10):  # bounded: 32 clients x 10 writes
            statuses.append(call(f"{leader}/db/execute", [["INSERT INTO t VALUES (?)", 1000 + k * 10 + n]], tok)[0])

    run_clients(client, 32)
    assert statuses == [200] * 320
    together = groups()
    # 320 writes in far fewer groups (one at a time they would take 320), and some groups were held.
    assert together[0] - alone[0] <= 80 and together[1] > alone[1], (alone, together)


def test_kill_9_of_the_leader_under_writes_loses_no_acknowledged_write(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    lowest, middle, highest = c.ips
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, lowest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200

    acknowledged: list[int] = []
    after_kill: list[int] = []
    killed = threading.Event()
    done = threading.Event()

    def load() -> None:
        for v in range(1, 5000):  # bounded in count; stopped by `done` long before
            if done.is_set():
                return
            status, _, _ = call(
                f"{base(c, lowest)}/db/execute", [["INSERT INTO t VALUES (?)", v]], tok, timeout_s=15
            )
            if status == 200:
                acknowledged.append(v)
                if killed.is_set():
                    after_kill.append(v)
            else:
                time.sleep(0.02)

    writer = threading.Thread(target=load, daemon=True)
    writer.start()
    try:
        wait_until(lambda: len(acknowledged) >= 20, 15, what="writes before the kill")
        c.kill9(highest)
        killed.set()
        wait_until(lambda: len(after_kill) >= 5, 30, what="writes acknowledged after the failover")
    finally:
        done.set()
        writer.join(timeout=20)
    assert not writer.is_alive()
    assert writable_node(c, [lowest, middle]) == middle  # the next-highest leads
    expected = set(acknowledged)
    for ip in (lowest, middle):
        wait_until(
            lambda ip=ip: (local_values(c, ip, tok) or set()) >= expected,
            10,
            what=f"every acknowledged write on {ip}",
            describe=lambda ip=ip: sorted(expected - (local_values(c, ip, tok) or set()))[:20],
        )
    # Equal once both applied what was committed (a write committed but not acknowledged before the writer
    # stopped may be applied on one a moment before the other).
    wait_until(
        lambda: local_values(c, lowest, tok) == local_values(c, middle, tok), 10, what="the same rows on both",
    )  # fmt: skip


def test_two_of_three_down_writes_get_503_no_quorum_fast_and_resume(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    lowest, middle, highest = c.ips
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, lowest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    # The survivor learns that the table is committed from the leader's next heartbeat; wait for it.
    wait_until(lambda: local_values(c, lowest, tok) == set(), 10, what="the table on the survivor")
    c.kill9(highest)
    c.kill9(middle)
    wait_until(
        lambda: (c.nodes[lowest].status() or {}).get("healthy_nodes") == 1,
        15,
        what="the survivor to see itself alone",
    )
    started = time.monotonic()
    status, _, body = call(f"{base(c, lowest)}/db/execute", [["INSERT INTO t VALUES (1)"]], tok)
    took_s = time.monotonic() - started
    assert status == 503, body
    assert body["code"] == "no_quorum" and "no quorum" in body["error"], body
    assert took_s < 2.0  # liveness: answered, not hung
    # Reads of the local copy still work.
    assert local_values(c, lowest, tok) == set()
    c.start(middle)

    def write_ok() -> bool:
        return call(f"{base(c, lowest)}/db/execute", [["INSERT INTO t VALUES (7)"]], tok)[0] == 200

    wait_until(write_ok, 30, interval_s=0.2, what="writes to resume with two of three", describe=c.describe)
    wait_until(
        lambda: 7 in (local_values(c, middle, tok) or set()), 10, what="the write on the restarted node"
    )


def test_sigterm_of_the_leader_hands_over_and_exits_in_time(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    lowest, middle, highest = c.ips
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, lowest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    code, took_s = c.nodes[highest].stop()
    c.publish_dns()
    assert code == 0
    assert took_s < 2.0  # the documented shutdown bound, handover included
    wait_until(lambda: writable_node(c, [lowest, middle]) == middle, 10, what="the next-highest to lead")
    status, headers, body = call(f"{base(c, lowest)}/db/execute", [["INSERT INTO t VALUES (5)"]], tok)
    assert status == 200, body
    assert headers["X-TalentNest-Node"] == str(c.nodes[middle].node_id)


def test_a_single_node_is_a_cluster_of_one_and_keeps_its_writes_across_a_restart(make_cluster):
    c: Cluster = make_cluster(size=1, env={**ENV, "FORMATION_WINDOW": "0"})
    c.start_all()
    tok = token(c)
    (ip,) = c.ips

    def create() -> bool:
        return (
            call(f"{base(c, ip)}/db/execute", [["CREATE TABLE IF NOT EXISTS t (v INTEGER)"]], tok)[0] == 200
        )

    wait_until(create, 10, what="the lone node to accept writes")
    assert call(f"{base(c, ip)}/db/execute", [["INSERT INTO t VALUES (3)"]], tok)[0] == 200
    c.kill9(ip)
    c.start(ip)
    wait_until(lambda: local_values(c, ip, tok) == {3}, 15, what="the row after the restart")
    wait_until(
        lambda: call(f"{base(c, ip)}/db/execute", [["INSERT INTO t VALUES (4)"]], tok)[0] == 200,
        15,
        what="writes after the restart",
    )
    assert local_values(c, ip, tok) == {3, 4}
    assert c.nodes[ip].events("replication_restored")


def test_a_write_caught_by_the_loss_of_quorum_answers_and_its_retry_applies_once(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    lowest, middle, highest = c.ips
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, highest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    c.kill9(lowest)
    c.kill9(middle)
    url = f"{base(c, highest)}/db/execute"
    once = {"X-Request-Id": "once-9"}
    started = time.monotonic()
    status, _, body = call_json(url, [["INSERT INTO t VALUES (9)"]], tok, 15, headers=once)
    took_s = time.monotonic() - started
    # Accepted before the leader noticed (outcome unknown) or refused after (no quorum): either way an
    # answer, not a hang (liveness bound, not a speed assertion).
    assert status == 503 and body["code"] in ("no_quorum", "outcome_unknown"), body
    assert took_s < 5.0
    c.start(middle)

    def retried() -> bool:
        return call_json(url, [["INSERT INTO t VALUES (9)"]], tok, 15, headers=once)[0] == 200

    wait_until(retried, 30, interval_s=0.2, what="the retry to succeed with two of three")
    status, _, body = call(
        f"{base(c, highest)}/db/query?level=linearizable&q=SELECT+count(*)+FROM+t", token=tok
    )
    assert status == 200 and body["results"][0]["values"] == [[1]], body
