"""Existing rqlite clients against a real node process: pyrqlite and sqlalchemy-rqlite, unchanged.

Each test starts ``python -m node`` on its own 127.0.0.x address as a cluster of one (its DNS server is a
closed local port, so discovery fails fast and never finds anyone), with a temporary DATA_DIR.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from node import auth

pytestmark = pytest.mark.integration

SECRET = "integration-secret-integration-secret-0123"
_next_host = iter(range(120, 250))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RunningNode:
    def __init__(self, host: str, port: int, data_dir: Path, log: Path, secret: str = SECRET) -> None:
        self.host, self.port, self.data_dir, self.log = host, port, data_dir, log
        self.secret = secret
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "HOST": self.host,
            "ADVERTISE_ADDRESS": self.host,
            "PORT": str(self.port),
            "JWT_SECRET": self.secret,
            "DATA_DIR": str(self.data_dir),
            "SERVICE_NAME": "nothing-here.invalid",
            "DNS_SERVERS": "127.0.0.1:9",
            "DNS_TIMEOUT": "0.5",
            # A known single node: no formation window to wait before it accepts writes.
            "FORMATION_WINDOW": "0",
        }
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "node"], env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"node exited with {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"node not ready within 20 s: {self.log.read_text()[-2000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=10)


@contextmanager
def running_node(tmp_path: Path) -> Iterator[RunningNode]:
    host = f"127.0.0.{next(_next_host)}"
    node = RunningNode(host, _free_port(host), tmp_path / "data", tmp_path / "node.log")
    node.start()
    try:
        yield node
    finally:
        if node.process is not None and node.process.poll() is None:
            node.kill(signal.SIGTERM)


def credential(role: auth.Role = auth.Role.WRITE) -> str:
    return auth.mint_compact(SECRET, role, now=time.time(), ttl_s=600)


@pytest.fixture
def node(tmp_path):
    with running_node(tmp_path) as running:
        yield running


def test_pyrqlite_round_trip(node):
    import pyrqlite.dbapi2 as dbapi2

    conn = dbapi2.connect(host=node.host, port=node.port, user="app", password=credential())
    try:
        cursor = conn.cursor()
        cursor.execute(
            "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, score REAL, photo BLOB, note TEXT)"
        )
        cursor.execute(
            "INSERT INTO people(name, score, photo, note) VALUES(?, ?, ?, ?)",
            ("Zoë 日本 ☃", 1.25, b"\x00\x01\xfe\xff", None),
        )
        assert cursor.lastrowid == 1
        cursor.executemany("INSERT INTO people(name, score) VALUES(?, ?)", [("a", 2.0), ("b", -3.5)])
        cursor.execute("SELECT id, name, score, photo, note FROM people ORDER BY id")
        rows = cursor.fetchall()
        assert [tuple(r) for r in rows] == [
            (1, "Zoë 日本 ☃", 1.25, b"\x00\x01\xfe\xff", None),
            (2, "a", 2.0, None, None),
            (3, "b", -3.5, None, None),
        ]
        cursor.execute("SELECT count(*) FROM people WHERE score > ?", (0,))
        assert cursor.fetchone()[0] == 2
    finally:
        conn.close()


def test_pyrqlite_with_a_read_credential_cannot_write(node):
    import pyrqlite.dbapi2 as dbapi2

    conn = dbapi2.connect(host=node.host, port=node.port, user="app", password=credential(auth.Role.READ))
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT 1")
        assert cursor.fetchone()[0] == 1
        with pytest.raises(Exception, match="403"):
            cursor.execute("CREATE TABLE t (x)")
    finally:
        conn.close()


def test_sqlalchemy_orm_round_trip(node):
    from sqlalchemy import Column, Float, Integer, LargeBinary, String, create_engine, select
    from sqlalchemy.orm import DeclarativeBase, Session

    class Base(DeclarativeBase):
        pass

    class Candidate(Base):
        __tablename__ = "candidates"
        id = Column(Integer, primary_key=True)
        name = Column(String(100), nullable=False)
        rating = Column(Float, nullable=True)
        resume = Column(LargeBinary, nullable=True)

    engine = create_engine(f"rqlite+pyrqlite://app:{credential()}@{node.host}:{node.port}/")
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all(
                [
                    Candidate(name="Ana Łukasiewicz", rating=4.5, resume=b"%PDF\x00\xff"),
                    Candidate(name="Bo", rating=None, resume=None),
                ]
            )
            session.commit()
        with Session(engine) as session:
            found = session.scalars(select(Candidate).order_by(Candidate.id)).all()
            assert [(c.id, c.name, c.rating, c.resume) for c in found] == [
                (1, "Ana Łukasiewicz", 4.5, b"%PDF\x00\xff"),
                (2, "Bo", None, None),
            ]
            found[1].rating = 3.0
            session.commit()
        with Session(engine) as session:
            assert session.get(Candidate, 2).rating == 3.0
    finally:
        engine.dispose()


def test_full_jwt_over_basic_and_bearer(node):
    token = auth.mint_jwt(SECRET, auth.Role.READ, now=time.time(), ttl_s=600)
    for header in (f"Bearer {token}", "Basic " + base64.b64encode(f"x:{token}".encode()).decode()):
        request = urllib.request.Request(
            f"{node.url}/db/query?q=SELECT%2042", headers={"Authorization": header}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
            assert b"42" in resp.read()


def test_acknowledged_write_survives_kill_9(tmp_path):
    import pyrqlite.dbapi2 as dbapi2

    host = f"127.0.0.{next(_next_host)}"
    node = RunningNode(host, _free_port(host), tmp_path / "data", tmp_path / "node.log")
    node.start()
    try:
        conn = dbapi2.connect(host=node.host, port=node.port, user="app", password=credential())
        cursor = conn.cursor()
        cursor.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, entry TEXT)")
        for i in range(20):
            cursor.execute("INSERT INTO ledger(entry) VALUES(?)", (f"entry {i}",))
        conn.close()
        assert node.kill(signal.SIGKILL) == -signal.SIGKILL
        node.start()
        conn = dbapi2.connect(host=node.host, port=node.port, user="app", password=credential())
        cursor = conn.cursor()
        cursor.execute("SELECT count(*), max(entry) FROM ledger")
        assert tuple(cursor.fetchone()) == (20, "entry 9")
        conn.close()
    finally:
        if node.process is not None and node.process.poll() is None:
            node.kill(signal.SIGTERM)


def test_missing_secret_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    env.update(DATA_DIR=str(tmp_path), HOST="127.0.0.1", ADVERTISE_ADDRESS="127.0.0.1")
    done = subprocess.run([sys.executable, "-m", "node"], env=env, capture_output=True, timeout=30)
    assert done.returncode == 2
    assert b"JWT_SECRET" in done.stderr


def test_token_cli_prints_verifiable_tokens():
    env = {**os.environ, "JWT_SECRET": SECRET}
    out = subprocess.run(
        [sys.executable, "-m", "node", "token", "--role", "admin", "--ttl", "60"],
        env=env, capture_output=True, timeout=30, check=True, text=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    assert auth.verify_jwt(out, SECRET, now=time.time()).role is auth.Role.ADMIN
    out = subprocess.run(
        [sys.executable, "-m", "node", "token", "--role", "read", "--ttl", "60", "--basic"],
        env=env, capture_output=True, timeout=30, check=True, text=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    assert len(out) <= auth.COMPACT_MAX_CHARS
    assert auth.verify_compact(out, SECRET, now=time.time()).role is auth.Role.READ


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_weak_secret_starts_with_a_warning_every_time(tmp_path):
    host = f"127.0.0.{next(_next_host)}"
    node = RunningNode(host, _free_port(host), tmp_path / "data", tmp_path / "node.log", secret="secret_key")
    try:
        for _ in range(2):
            node.start()
            node.kill(signal.SIGTERM)
        warnings = [line for line in node.log.read_text().splitlines() if '"weak_jwt_secret"' in line]
        assert len(warnings) == 2
        token = auth.mint_jwt("secret_key", auth.Role.READ, now=time.time(), ttl_s=60)
        node.start()
        request = urllib.request.Request(
            f"{node.url}/db/query?q=SELECT%201", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
    finally:
        if node.process is not None and node.process.poll() is None:
            node.kill(signal.SIGTERM)


def test_cluster_endpoints_and_readyz_stay_public_data_endpoints_do_not(node):
    for path in ("/cluster/status", "/cluster/health", "/readyz"):
        with urllib.request.urlopen(f"{node.url}{path}", timeout=5) as resp:
            assert resp.status == 200, path
    for path in ("/db/query?q=SELECT%201", "/db/backup"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{node.url}{path}", timeout=5)
        assert info.value.code == 401
        assert "Bearer" in info.value.headers["WWW-Authenticate"]


def test_unusable_data_dir_is_a_startup_failure(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = {
        **os.environ,
        "JWT_SECRET": SECRET,
        "DATA_DIR": str(not_a_dir),
        "HOST": "127.0.0.1",
        "ADVERTISE_ADDRESS": "127.0.0.1",
        "PORT": str(_free_port("127.0.0.1")),
        "DNS_SERVERS": "127.0.0.1:9",
        "SERVICE_NAME": "nothing-here.invalid",
    }
    done = subprocess.run([sys.executable, "-m", "node"], env=env, capture_output=True, timeout=30)
    assert done.returncode == 2
    assert b'"startup_failed"' in done.stdout and b"DATA_DIR" in done.stdout
