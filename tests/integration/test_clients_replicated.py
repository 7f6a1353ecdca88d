"""Existing rqlite clients, unchanged, against a 3-node REPLICATION=on cluster, talking only to a FOLLOWER.

The follower forwards writes and default-level reads to the leader server-side; the clients must not notice
(no redirect to follow, the same JSON, the same headers they rely on). Every node's local copy must then hold
what the client wrote.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from node import auth
from tests.integration.test_replication import ENV, form, writable_node
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def credential(c: Cluster, role: auth.Role = auth.Role.WRITE) -> str:
    return auth.mint_compact(c.jwt_secret, role, now=time.time(), ttl_s=600)


def local_rows(c: Cluster, ip: str, sql: str) -> list[list[Any]] | None:
    """The node's own copy (level=none), not forwarded; None if it cannot answer."""
    tok = auth.mint_jwt(c.jwt_secret, auth.Role.READ, now=time.time(), ttl_s=600)
    url = f"{c.nodes[ip].url}/db/query?level=none&q={urllib.request.quote(sql)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {tok}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            result = json.loads(resp.read())["results"][0]
    except (OSError, ValueError):
        return None
    return None if "error" in result else result.get("values", [])


def formed_with_a_follower(c: Cluster) -> str:
    form(c)
    leader = wait_until(lambda: writable_node(c, c.ips), 10, what="a writable leader")
    assert leader == c.ips[-1]
    return c.ips[0]  # the lowest ID: a follower


def wait_everywhere(c: Cluster, sql: str, expected: list[list[Any]]) -> None:
    for ip in c.ips:
        wait_until(
            lambda ip=ip: local_rows(c, ip, sql) == expected,
            10,
            what=f"{sql!r} == {expected!r} on {ip}",
            describe=lambda ip=ip: repr(local_rows(c, ip, sql)),
        )


def test_pyrqlite_through_a_follower(make_cluster):
    import pyrqlite.dbapi2 as dbapi2

    c: Cluster = make_cluster(env=ENV)
    follower = formed_with_a_follower(c)
    conn = dbapi2.connect(host=follower, port=c.port, user="app", password=credential(c))
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
        assert [tuple(r) for r in cursor.fetchall()] == [
            (1, "Zoë 日本 ☃", 1.25, b"\x00\x01\xfe\xff", None),
            (2, "a", 2.0, None, None),
            (3, "b", -3.5, None, None),
        ]
        cursor.execute("SELECT count(*) FROM people WHERE score > ?", (0,))
        assert cursor.fetchone()[0] == 2
    finally:
        conn.close()
    wait_everywhere(c, "SELECT id, name, score FROM people ORDER BY id", [[1, "Zoë 日本 ☃", 1.25], [2, "a", 2.0],
                                                                         [3, "b", -3.5]])  # fmt: skip
    # A read credential through the follower: reads forwarded, a write refused with 403 (checked by the
    # follower before forwarding, and by the leader).
    conn = dbapi2.connect(host=follower, port=c.port, user="app", password=credential(c, auth.Role.READ))
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT count(*) FROM people")
        assert cursor.fetchone()[0] == 3
        with pytest.raises(Exception, match="403"):
            cursor.execute("CREATE TABLE t (x)")
    finally:
        conn.close()


def test_sqlalchemy_orm_through_a_follower(make_cluster):
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

    c: Cluster = make_cluster(env=ENV)
    follower = formed_with_a_follower(c)
    engine = create_engine(f"rqlite+pyrqlite://app:{credential(c)}@{follower}:{c.port}/")
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
            assert [(x.id, x.name, x.rating, x.resume) for x in found] == [
                (1, "Ana Łukasiewicz", 4.5, b"%PDF\x00\xff"),
                (2, "Bo", None, None),
            ]
            found[1].rating = 3.0
            session.commit()
        with Session(engine) as session:
            assert session.get(Candidate, 2).rating == 3.0
    finally:
        engine.dispose()
    wait_everywhere(c, "SELECT id, name, rating FROM candidates ORDER BY id", [[1, "Ana Łukasiewicz", 4.5],
                                                                               [2, "Bo", 3.0]])  # fmt: skip
