"""A full disk is expected: results carry the error, backup and load answer 507 JSON, /readyz says "disk full".

Runs on a real 2 MiB tmpfs (root can mount one; CI runs as root). Without permission to mount, the test is
skipped with the reason, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import time

import pytest

from node import auth
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import start_db_api
from tests.support.tmpfs import small_tmpfs

SECRET = "a-test-secret-that-is-long-enough-0123456789"
# Tokens below are minted when the module is imported, i.e. when pytest collects the whole suite, which can
# run for longer than any short lifetime: they live a day.
DAY_S = 86_400
ADMIN = {"Authorization": "Bearer " + auth.mint_jwt(SECRET, auth.Role.ADMIN, now=time.time(), ttl_s=DAY_S)}
BALLAST_BYTES = 1200 << 10


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, "2m") as mount:
        yield mount


@pytest.fixture
async def api(small_disk):
    database = Database(small_disk / "data", limits=Limits(), queue_size=8)
    await database.open()
    client = await start_db_api(
        database,
        secret=SECRET,
        max_body_bytes=4 << 20,
        max_load_bytes=8 << 20,
        max_statements=100,
        body_read_timeout_s=5,
    )
    client.disk = small_disk
    try:
        yield client
    finally:
        await client.close()
        await database.close()


async def execute(api, body, query=""):
    resp = await api.post(f"/db/execute{query}", json=body, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["results"]


async def readyz(api) -> tuple[int, str]:
    resp = await api.get("/readyz?noleader")
    return resp.status, await resp.text()


async def test_a_full_disk_is_reported_not_hidden(api):
    ballast = api.disk / "ballast"
    ballast.write_bytes(b"\0" * BALLAST_BYTES)
    await execute(api, ["CREATE TABLE t (b BLOB)"])
    assert await readyz(api) == (503, "[+]node ok\n[+]store ok\n[+]db ok\n[-]disk full")  # below 1 MiB free

    # Fill the disk: every request has one result per statement, and the failures say why.
    full = None
    for _ in range(100):
        results = await execute(api, ["INSERT INTO t VALUES (randomblob(30000))"] * 4)
        assert len(results) == 4
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            full = errors[0]
            break
    # Statements share one transaction per group (one fsync): the disk may fill at a statement or at the
    # COMMIT, and then none of the group's statements claims a stored change.
    assert full in ("database or disk is full", "rolled back: COMMIT failed: database or disk is full"), full

    results = await execute(api, ["INSERT INTO t VALUES (randomblob(60000))"] * 3, "?transaction")
    assert len(results) == 3 and all("error" in r for r in results), results
    assert all("rolled back" in r["error"] or "not run" in r["error"] for r in results), results

    status, text = await readyz(api)
    assert status == 503 and "[-]disk full" in text

    resp = await api.get("/db/backup", headers=ADMIN)
    assert resp.status == 507, await resp.text()
    assert (await resp.json())["code"] == "insufficient_storage"

    dump = "".join(f"INSERT INTO t VALUES (x'{'ab' * 20000}');\n" for _ in range(60)).encode()
    resp = await api.post("/db/load", data=dump, headers=ADMIN)
    assert resp.status == 507, await resp.text()
    assert (await resp.json())["code"] == "insufficient_storage"
    assert not [p.name for p in (api.disk / "data").iterdir() if p.name.startswith(".tmp-")]

    # Space comes back: the next write succeeds and the node is ready again.
    ballast.unlink()
    assert await execute(api, ["DELETE FROM t WHERE rowid % 2 = 0"]) != [
        {"error": "database or disk is full"}
    ]
    assert "error" not in (await execute(api, ["INSERT INTO t VALUES (1)"]))[0]
    status, text = await readyz(api)
    assert status == 200, text
