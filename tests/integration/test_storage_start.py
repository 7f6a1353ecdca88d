"""A real node process starting on a corrupt, quarantined or empty database file.

The integrity check runs after HTTP is up: liveness (/cluster/health) answers throughout; a corrupt file is
moved aside and never served; the node stays alive and not ready, with a loud log line for the operator.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from node import auth
from node.storage.statemachine import INTERNAL_PREFIX
from tests.support.cluster import clean_env
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

SECRET = "integration-secret-integration-secret-0123"
_hosts = iter(range(60, 119))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class Node:
    def __init__(self, tmp_path: Path) -> None:
        self.host = f"127.0.0.{next(_hosts)}"
        self.port = _free_port(self.host)
        self.data_dir = tmp_path / "data"
        self.log = tmp_path / "node.log"
        self.process: subprocess.Popen | None = None
        self.extra_env: dict[str, str] = {}  # e.g. REPLICATION=off

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        env = clean_env(
            {
                "HOST": self.host,
                "ADVERTISE_ADDRESS": self.host,
                "PORT": str(self.port),
                "JWT_SECRET": SECRET,
                "DATA_DIR": str(self.data_dir),
                "SERVICE_NAME": "nothing-here.invalid",
                "DNS_SERVERS": "127.0.0.1:9",
                "DNS_TIMEOUT": "0.5",
                "FORMATION_WINDOW": "0",  # a known single node
                **self.extra_env,
            }
        )
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "node"], env=env, stdout=out, stderr=out)
        wait_until(lambda: self.get("/cluster/health")[0] == 200 or self.process.poll() is not None, 20,
                   what="/cluster/health", describe=self.tail)  # fmt: skip
        assert self.process.poll() is None, self.tail()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def get(self, path: str, role: auth.Role | None = None) -> tuple[int, bytes]:
        headers = {}
        if role is not None:
            headers["Authorization"] = "Bearer " + auth.mint_jwt(SECRET, role, now=time.time(), ttl_s=60)
        return _get(self.url + path, headers)

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def event(self, name: str) -> dict | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    running = Node(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def _make_database(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode=DELETE")
    with conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("CREATE INDEX t_name ON t(name)")
        conn.executemany(
            "INSERT INTO t(name) VALUES (?)", ((f"name-{i:08d}-" + "x" * 60,) for i in range(rows))
        )
    conn.close()


def _corrupt_database(node: Node) -> tuple[Path, int]:
    db = node.data_dir / "node.db"
    _make_database(db, 60_000)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(size // 2)
        f.write(random.Random(1).randbytes(8192))
    return db, size


def _serves_nothing(node: Node, ready_word: bytes) -> None:
    assert node.get("/cluster/health")[0] == 200
    status, body = node.get("/readyz")
    assert status == 503 and ready_word in body, body
    for path, role in (("/db/query?q=SELECT%201", auth.Role.READ), ("/db/backup", auth.Role.ADMIN)):
        status, body = node.get(path, role)
        assert status == 503, body
        assert json.loads(body)["code"] == "database_corrupt"


def test_a_corrupt_database_is_quarantined_and_never_served(node):
    """REPLICATION=off: the file is moved aside and the node stays not ready until an operator acts."""
    node.extra_env["REPLICATION"] = "off"
    db, size = _corrupt_database(node)

    node.start()
    event = wait_until(
        lambda: node.event("database_corrupt"), 30, what="database_corrupt", describe=node.tail
    )
    assert event["level"] == "error"
    assert event["verdict"] and event["verdict"] != ["ok"]
    quarantined = Path(event["path"])
    assert quarantined.parent == node.data_dir / "quarantine"
    assert (quarantined / "node.db").stat().st_size == size
    assert not db.exists()
    _serves_nothing(node, b"corrupt")

    # A restart does not silently start empty in its place.
    node.stop()
    node.start()
    event = wait_until(lambda: node.event("database_quarantined"), 30, what="database_quarantined",
                       describe=node.tail)  # fmt: skip
    assert "remove" in event["reason"] and str(node.data_dir / "quarantine") in event["reason"]
    assert not db.exists()
    assert node.get("/readyz")[0] == 503
    status, body = node.get("/db/query?q=SELECT%201", auth.Role.READ)
    assert status == 503 and json.loads(body)["code"] == "database_corrupt"
    assert node.get("/cluster/health")[0] == 200


def test_a_replicated_node_alone_quarantines_its_state_and_waits_for_a_cluster_instead_of_starting_empty(node):
    """REPLICATION=on (the default): the database goes to the quarantine with the rest of the replicated state
    (one event), and the node, a new member now, would rejoin its cluster. Alone it finds none: it never
    starts an empty cluster in place of the data it lost (not ready, data calls 503) until an operator
    removes the quarantine."""
    db, size = _corrupt_database(node)
    node.start()
    event = wait_until(lambda: node.event("data_quarantined"), 30, what="data_quarantined", describe=node.tail)
    assert event["level"] == "error" and event["damaged"].startswith("database")
    quarantined = Path(event["path"])
    assert quarantined.parent == node.data_dir / "quarantine"
    assert (quarantined / "node.db").stat().st_size == size
    assert "node.db" in event["moved"] and "rejoins" in event["advice"]
    wait_until(lambda: node.event("replication_waits_for_cluster"), 10, what="replication_waits_for_cluster",
               describe=node.tail)  # fmt: skip
    assert node.event("database_ready") is not None  # an empty database is open, yet it serves nothing
    _serves_nothing(node, b"quarantine")
    assert node.event("replication_bootstrapped") is None

    # A restart keeps waiting, and says that quarantined data is kept and how much.
    node.stop()
    node.start()
    kept = wait_until(lambda: node.event("quarantined_data_kept"), 30, what="quarantined_data_kept",
                      describe=node.tail)  # fmt: skip
    assert kept["events"] == 1 and kept["size_bytes"] >= size
    wait_until(lambda: b"quarantine" in node.get("/readyz")[1], 10, what="/readyz to name the quarantine",
               describe=node.tail)  # fmt: skip
    _serves_nothing(node, b"quarantine")

    # The operator's choice: remove the quarantine, and the node starts an empty cluster.
    node.stop()
    shutil.rmtree(node.data_dir / "quarantine")
    node.start()
    wait_until(lambda: node.get("/readyz")[0] == 200, 20, what="ready", describe=node.tail)


def test_an_empty_database_file_starts_empty_with_a_warning(node):
    node.data_dir.mkdir(parents=True)
    (node.data_dir / "node.db").write_bytes(b"")
    node.start()
    # /readyz with its leader checks: the query below is a weak read, which needs this node to lead.
    wait_until(lambda: node.get("/readyz")[0] == 200, 20, what="ready", describe=node.tail)
    event = node.event("database_file_empty")
    assert event is not None and event["level"] == "warning"
    # No user table (the node's own bookkeeping tables, _talentnest_*, may exist once it has formed).
    sql = f"SELECT count(*) FROM sqlite_schema WHERE substr(name, 1, {len(INTERNAL_PREFIX)}) != '{INTERNAL_PREFIX}'"
    status, body = node.get("/db/query?q=" + urllib.parse.quote(sql), auth.Role.READ)
    assert status == 200 and json.loads(body)["results"][0]["values"] == [[0]]


def test_health_answers_while_the_database_is_checked(node):
    """A larger file: /cluster/health answers at once; data endpoints answer 503 until the check is done."""
    _make_database(node.data_dir / "node.db", 300_000)
    os.sync()
    node.start()  # returns once /cluster/health answered 200
    seen: list[str] = []

    def ready() -> bool:
        status, body = node.get("/db/query?q=SELECT%20count(*)%20FROM%20t", auth.Role.READ)
        if status == 503:
            seen.append(json.loads(body)["code"])
        return status == 200

    wait_until(ready, 60, what="the database to be served", describe=node.tail)
    # While the check runs the answer says so; after it, only until the cluster of one has elected itself
    # (replication waits for the database), "not_leader". Never the other way round.
    checking = seen.count("database_checking")
    assert seen == ["database_checking"] * checking + ["not_leader"] * (len(seen) - checking), seen
    assert node.event("database_ready") is not None
