"""A real node process whose writes go through the log first: kill -9 under concurrent write load loses no
acknowledged write and applies none twice; the disk reserve answers 507 JSON before the disk fills.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from node import auth
from tests.support.cluster import clean_env
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

SECRET = "integration-secret-integration-secret-0123"
_hosts = iter(range(120, 160))
CLIENTS = 8


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.host = f"127.0.1.{next(_hosts)}"
        self.port = _free_port(self.host)
        self.data_dir = tmp_path / "data"
        self.log = tmp_path / "node.log"
        self.env = env
        self.process: subprocess.Popen | None = None
        self.token = {
            role: "Bearer " + auth.mint_jwt(SECRET, role, now=time.time(), ttl_s=600)
            for role in (auth.Role.READ, auth.Role.WRITE, auth.Role.ADMIN)
        }

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, ready: bool = True) -> None:
        """Start the process; wait until /readyz answers 200 (``ready``) or only until it answers at all."""
        env = clean_env({
            "HOST": self.host, "ADVERTISE_ADDRESS": self.host, "PORT": str(self.port), "JWT_SECRET": SECRET,
            "DATA_DIR": str(self.data_dir), "SERVICE_NAME": "nothing-here.invalid", "DNS_SERVERS": "127.0.0.1:9",
            "DNS_TIMEOUT": "0.5", "FORMATION_WINDOW": "0", **self.env,  # a known single node
        })  # fmt: skip
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "node"], env=env, stdout=out, stderr=out)
        want = (200,) if ready else (200, 503)
        wait_until(lambda: self.up_or_dead(want), 30, what="/readyz", describe=self.tail)
        assert self.process.poll() is None, self.tail()

    def up_or_dead(self, statuses: tuple[int, ...]) -> bool:
        assert self.process is not None
        # Ready means ready to write: /readyz with its leader checks (a replicated node of one has elected
        # itself, so a write right after start is not refused with not_leader).
        return self.process.poll() is not None or self.call("GET", "/readyz")[0] in statuses

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def call(
        self, method: str, path: str, body: object = None, role: auth.Role | None = None, **headers: str
    ) -> tuple[int, bytes, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if role is not None:
            request.add_header("Authorization", self.token[role])
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in headers.items():
            request.add_header(name.replace("_", "-"), value)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)
        except (urllib.error.URLError, OSError):
            return 0, b"", {}

    def execute(self, statements: list, request_id: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        extra = {} if request_id is None else {"X_Request_Id": request_id}
        return self.call("POST", "/db/execute", statements, auth.Role.WRITE, **extra)

    def query(self, sql: str) -> list:
        status, body, _ = self.call("POST", "/db/query", [sql], auth.Role.READ)
        assert status == 200, body
        return json.loads(body)["results"][0].get("values", [])

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def make_node(tmp_path) -> Iterator:
    nodes: list[Node] = []

    def make(**env: str) -> Node:
        nodes.append(Node(tmp_path, **env))
        return nodes[-1]

    try:
        yield make
    finally:
        for n in nodes:
            n.stop()


def test_kill_9_under_write_load_loses_no_acknowledged_write_and_applies_none_twice(make_node):
    node = make_node()
    node.start()
    status, body, _ = node.execute(["CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT NOT NULL)"])
    assert status == 200, body

    acked: dict[str, str] = {}  # key -> the index that committed it
    tried: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        for n in range(100_000):  # bounded; stops when the node dies
            if stop.is_set():
                return
            key = f"c{c}-{n}"
            with lock:
                tried.append(key)
            status, _, headers = node.execute([["INSERT INTO t(k) VALUES(?)", key]], request_id=key)
            if status == 200:
                with lock:
                    acked[key] = headers["X-TalentNest-Index"]
            elif status == 0:
                return  # the node is gone

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 300, 60, what="300 acknowledged writes", describe=node.tail)
        node.kill9()  # writes are in flight on every client
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    assert not any(t.is_alive() for t in threads)

    node.start()  # replays what SQLite had not yet made durable
    rows = node.query("SELECT k, count(*) FROM t GROUP BY k")
    counts = {k: n for k, n in rows}
    missing = [k for k in acked if k not in counts]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n != 1][:5]
    assert set(counts) <= set(tried)

    # Every write retried with its request ID after the restart is applied at most once, acknowledged or
    # not (those in flight at the kill had an unknown outcome).
    for key in tried:
        status, body, headers = node.execute([["INSERT INTO t(k) VALUES(?)", key]], request_id=key)
        assert status == 200, body
        if key in acked:
            assert headers["X-TalentNest-Index"] == acked[key]
    rows = node.query("SELECT count(*), count(DISTINCT k) FROM t")
    assert rows == [[len(tried), len(tried)]]


def test_writes_are_refused_with_507_json_before_the_disk_fills(make_node):
    # The node's own log (REPLICATION=off) keeps LOG_RESERVE_BYTES (with replication the data service refuses
    # below it: tests/replication/test_write_reserve.py): this test is about the opt-out's log.
    node = make_node(LOG_RESERVE_BYTES=str(1 << 62), REPLICATION="off")
    node.start(ready=False)  # never ready: /readyz says why, once the database is open
    wait_until(
        lambda: b"[+]db ok" in node.call("GET", "/readyz?noleader")[1], 30, what="the database", describe=node.tail
    )
    status, body = node.call("GET", "/readyz?noleader")[:2]
    assert status == 503 and b"[-]log below reserve" in body
    status, body, _ = node.execute(["CREATE TABLE t (x)"])
    assert status == 507, body
    error = json.loads(body)
    assert error["code"] == "insufficient_storage" and "LOG_RESERVE_BYTES" in error["error"]
    assert node.call("GET", "/cluster/health")[0] == 200
    # Nothing of the refused write exists; reads still work.
    assert node.query("SELECT count(*) FROM sqlite_schema") == [[0]]


def test_sigterm_closes_the_database_then_the_log_and_the_restart_replays_nothing(make_node):
    node = make_node()
    node.start()
    assert node.execute(["CREATE TABLE t (x)"])[0] == 200
    for i in range(20):
        assert node.execute([["INSERT INTO t VALUES(?)", i]])[0] == 200
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=10) == 0
    node.start()
    assert '"log_replayed"' not in node.log.read_text()  # a clean stop leaves nothing to replay
    assert node.query("SELECT count(*) FROM t") == [[20]]


def _copy_db(source: Path, target: Path) -> None:
    src, dest = apsw.Connection(str(source)), apsw.Connection(str(target))
    try:
        with dest.backup("main", src, "main") as copy:
            copy.step(-1)
        dest.execute("PRAGMA journal_mode=DELETE")
    finally:
        dest.close()
        src.close()


@pytest.mark.parametrize("replication", ["on", "off"])
def test_a_database_that_lost_its_last_transactions_comes_back_complete_from_the_log(
    make_node, tmp_path, replication
):
    """What a power loss may do to SQLite at synchronous=NORMAL (an older file, no WAL); the log is kept.
    Both logs bring it back: the node's own (REPLICATION=off, log_replayed) and the replicated one (on)."""
    node = make_node(REPLICATION=replication)
    node.start()
    assert node.execute(["CREATE TABLE t (x)"])[0] == 200
    for i in range(10):
        assert node.execute([["INSERT INTO t VALUES(?)", i]])[0] == 200
    node.stop()
    db = node.data_dir / "node.db"
    _copy_db(db, tmp_path / "older.db")
    node.start()
    for i in range(10, 25):
        assert node.execute([["INSERT INTO t VALUES(?)", i]])[0] == 200
    node.kill9()
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "older.db", db)

    node.start()
    assert node.query("SELECT count(*), count(DISTINCT x), min(x), max(x) FROM t") == [[25, 25, 0, 24]]
    if replication == "on":
        return  # the core re-applies the committed entries past the database's applied index
    replayed = [json.loads(line) for line in node.log.read_text().splitlines() if '"log_replayed"' in line]
    assert replayed and replayed[-1]["entries"] == 15


def test_sigterm_under_write_load_answers_every_client_and_loses_no_acknowledged_write(make_node):
    """Writes in flight at SIGTERM: each client gets 200 or a 503 JSON (never a dropped connection), the
    node exits 0 within the 2 s promise, and every 200 is there after the restart."""
    node = make_node()
    node.start()
    status, body, _ = node.execute(["CREATE TABLE t (k TEXT NOT NULL)"])
    assert status == 200, (body, node.tail())
    answers: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        for n in range(100_000):  # bounded; stops at the shutdown
            if stop.is_set():
                return
            key = f"c{c}-{n}"
            status, body, _ = node.execute([["INSERT INTO t(k) VALUES(?)", key]], request_id=key)
            if status == 503:
                assert json.loads(body)["code"] in ("unavailable", "busy"), body
            with lock:
                answers[key] = status
            if status in (0, 503):
                return

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(16)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answers) >= 200, 60, what="200 answered writes", describe=node.tail)
        assert node.process is not None
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        code = node.process.wait(timeout=10)
        took = time.monotonic() - started
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    print(f"SIGTERM under write load: exit {code} after {took * 1000:.0f} ms")
    assert code == 0 and took <= 2.0
    assert set(answers.values()) <= {200, 503, 0}
    node.start()
    present = {k for (k,) in node.query("SELECT k FROM t")}
    lost = [k for k, status in answers.items() if status == 200 and k not in present]
    assert not lost, lost[:5]


def test_a_damaged_log_is_quarantined_loudly_and_the_node_is_not_ready(make_node):
    # Quarantine and a fresh log after the applied index are the node's own log's recovery (REPLICATION=off).
    # A replicated node reports the damage with its offset and exits (node_crashed): its log is the
    # cluster's history, which a fresh log must not replace.
    node = make_node(REPLICATION="off")
    node.start()
    assert node.execute(["CREATE TABLE t (x)"])[0] == 200
    for i in range(5):
        assert node.execute([["INSERT INTO t VALUES(?)", i]])[0] == 200
    node.stop()
    (segment,) = sorted((node.data_dir / "log").iterdir())
    data = bytearray(segment.read_bytes())
    data[64 + 30] ^= 0xFF  # inside the first record, valid records after it: damage, not a torn tail
    segment.write_bytes(bytes(data))

    node.start(ready=False)
    event = wait_until(
        lambda: next((json.loads(x) for x in node.log.read_text().splitlines() if '"log_corrupt"' in x), None),
        10, what="log_corrupt", describe=node.tail,
    )  # fmt: skip
    assert event["level"] == "error" and "restart" in event["advice"]
    assert Path(event["path"]).parent.parent == node.data_dir / "quarantine"
    status, body = node.call("GET", "/readyz")[:2]
    assert status == 503 and b"damaged" in body
    status, body, _ = node.execute([["INSERT INTO t VALUES(?)", 99]])
    assert status == 503 and json.loads(body)["code"] == "database_corrupt"
    node.stop()
    node.start()  # the operator's restart: a new log after the database's applied index
    assert node.query("SELECT count(*) FROM t") == [[5]]
    status, _, headers = node.execute([["INSERT INTO t VALUES(?)", 5]])
    assert status == 200 and headers["X-TalentNest-Index"] == "7"
