"""Snapshots with real node processes: compaction, catch-up of a returning follower by snapshot, a new node
(the highest ID) joining a cluster whose log no longer starts at entry 1.

Snapshots are made frequent (every 40 entries, 5 kept below, 4 KiB log segments) so a few hundred writes
compact the log. A leader also keeps its last 256 applied entries in memory and sends those from there, so
a member must be more than that behind to need a snapshot. Every wait has a deadline; nothing here
measures speed.
"""

from __future__ import annotations

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
from tests.support.cluster import Cluster
from tests.support.http import call_json
from tests.support.wait import wait_until

SNAP_ENV = {
    **ENV,
    "SNAPSHOT_ENTRIES": "40",
    "SNAPSHOT_TRAILING": "5",
    "LOG_SEGMENT_BYTES": "4096",
}
ROWS = 400  # more than the 256 entries a leader keeps in memory


def write_rows(c: Cluster, ip: str, tok: str, first: int, count: int) -> None:
    for v in range(first, first + count):
        status, _, body = call(f"{base(c, ip)}/db/execute", [["INSERT INTO t VALUES (?)", v]], tok)
        assert status == 200, body


def status_of(c: Cluster, ip: str) -> dict:
    return c.nodes[ip].status() or {}


def test_a_follower_back_after_compaction_installs_a_snapshot_and_ends_identical(make_cluster):
    c: Cluster = make_cluster(env=SNAP_ENV)
    form(c)
    tok = token(c)
    lowest, _, highest = c.ips
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, highest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    c.nodes[lowest].stop()
    c.publish_dns()
    write_rows(c, highest, tok, 1, ROWS)
    wait_until(
        lambda: status_of(c, highest).get("log_first_index", 1) > 10, 20,
        what="the leader's log compacted", describe=lambda: str(status_of(c, highest)),
    )  # fmt: skip
    c.start(lowest)
    expected = set(range(1, ROWS + 1))
    wait_until(
        lambda: local_values(c, lowest, tok) == expected, 30,
        what="every row on the returning follower", describe=lambda: c.describe(),
    )  # fmt: skip
    events = [e["event"] for e in c.nodes[lowest].events(all_runs=False)]
    assert "snapshot_installed" in events, events[-40:]
    assert "snapshot_transfer_end" in events
    # And it keeps following: a later write reaches it through the log.
    write_rows(c, highest, tok, ROWS + 1, 3)
    wait_until(lambda: local_values(c, lowest, tok) == set(range(1, ROWS + 4)), 10, what="later rows")
    # Every node restarts from its compacted log and installed snapshot (the leader last: it hands over).
    for ip in c.ips:
        c.nodes[ip].stop()
        c.start(ip)
        wait_until(
            lambda ip=ip: local_values(c, ip, tok) == set(range(1, ROWS + 4)), 30,
            what=f"{ip} back with every row", describe=lambda: c.describe(),
        )  # fmt: skip
        wait_until(lambda: voters_everywhere(c, c.ips, 3), 30, what="three voters again")
    # The write a client makes after the restarts, as clients are told to: a 503 (a leader that took over
    # moments ago may lose its lease on a loaded machine) is retried with the same X-Request-Id, which
    # applies it at most once.
    last = ROWS + 4
    answers: list = []

    def written() -> bool:
        leader = writable_node(c, c.ips)
        if leader is None:
            return False
        answer = call_json(
            f"{base(c, leader)}/db/execute", [["INSERT INTO t VALUES (?)", last]], tok,
            headers={"X-Request-Id": "after-the-restarts"},
        )  # fmt: skip
        answers.append(answer[::2])
        assert answer[0] in (200, 503), answer
        return answer[0] == 200

    wait_until(written, 30, what="a write after the restarts", describe=lambda: str(answers[-3:]))
    counted = lambda ip: call(  # noqa: E731
        f"{base(c, ip)}/db/query?level=none&q=SELECT+count(*)+FROM+t+WHERE+v={last}", token=tok
    )
    wait_until(
        lambda: all(counted(ip)[2]["results"][0].get("values") == [[1]] for ip in c.ips), 10,
        what="the retried write applied exactly once on every node",
    )  # fmt: skip
    assert c.all_log_problems() == []


def test_a_new_highest_id_node_joins_a_compacted_cluster_by_snapshot_and_leads_only_after(make_cluster):
    c: Cluster = make_cluster(env=SNAP_ENV)
    form(c)
    tok = token(c)
    highest = c.ips[-1]
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, highest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    write_rows(c, highest, tok, 1, ROWS)
    wait_until(lambda: status_of(c, highest).get("log_first_index", 1) > 10, 20, what="compaction")
    newcomer = c.spare_ip()
    c.add_node(newcomer)
    c.start(newcomer)
    wait_until(
        lambda: writable_node(c, [*c.ips, newcomer]) == newcomer, 40,
        what="the new highest-ID node to lead", describe=lambda: c.describe(),
    )  # fmt: skip
    events = c.nodes[newcomer].events(all_runs=False)
    names = [e["event"] for e in events]
    assert "snapshot_installed" in names, names[-40:]
    # It led only after it had installed the snapshot (and become a voter).
    installed_at = names.index("snapshot_installed")
    led = [i for i, e in enumerate(events) if e["event"] == "replication_became_leader"]
    assert led and led[0] > installed_at
    # Every committed row, once applied: a new leader applies the tail it committed after the snapshot in
    # the background, so its own copy (level=none) may trail its commit index for a moment.
    wait_until(
        lambda: local_values(c, newcomer, tok) == set(range(1, ROWS + 1)), 10, what="every row on the new leader",
        describe=lambda: sorted(set(range(1, ROWS + 1)) - (local_values(c, newcomer, tok) or set()))[:20],
    )  # fmt: skip
    write_rows(c, newcomer, tok, ROWS + 1, 3)
    for ip in [*c.ips, newcomer]:
        wait_until(lambda ip=ip: local_values(c, ip, tok) == set(range(1, ROWS + 4)), 10, what=f"rows on {ip}")
    assert c.all_log_problems() == []


def test_a_backup_with_the_leader_flag_comes_from_the_leader(make_cluster):
    """``/db/backup?leader`` on a follower answers 307 to the leader (never relayed through the follower's
    memory); the leader answers its own copy and says it leads. Without the flag the node asked answers."""
    import http.client
    import urllib.parse

    c: Cluster = make_cluster(env=ENV)
    form(c)
    tok = token(c)
    lowest, _, highest = c.ips
    wait_until(lambda: writable_node(c, c.ips) == highest, 10, what="the highest to lead")
    assert call(f"{base(c, highest)}/db/execute", [["CREATE TABLE t (v INTEGER)"]], tok)[0] == 200
    write_rows(c, highest, tok, 1, 5)
    wait_until(lambda: local_values(c, lowest, tok) == set(range(1, 6)), 10, what="rows on the follower")

    def get(url: str) -> tuple[int, dict, bytes]:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("GET", f"{parts.path}?{parts.query}", headers={"Authorization": f"Bearer {tok}"})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    status, headers, _ = get(f"{base(c, lowest)}/db/backup?leader")
    assert status == 307 and headers["Location"] == f"{base(c, highest)}/db/backup?leader"
    status, headers, body = get(headers["Location"])
    assert status == 200 and body.startswith(b"SQLite format 3\x00")
    assert headers["X-TalentNest-Leader"] == "true"
    assert headers["X-TalentNest-Node"] == str(c.nodes[highest].node_id)
    assert int(headers["X-TalentNest-Applied-Index"]) >= 7
    status, headers, body = get(f"{base(c, lowest)}/db/backup?x=1")  # no flag: the node asked
    assert status == 200 and body.startswith(b"SQLite format 3\x00")
    # An unauthenticated request is refused before any redirect names the leader.
    parts = urllib.parse.urlsplit(base(c, lowest))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", "/db/backup?leader")
    assert conn.getresponse().status == 401
    conn.close()
