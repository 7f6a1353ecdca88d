"""A file load in the Replicator's applier (a barrier: applied alone, in log order; a missing file is
waited for, never skipped) and the peer endpoint that stages a file (signed over its body, once)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import apsw
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from node.actors.replicator import Replicator
from node.core import peerauth
from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.core.sqlreq import Statement, WriteCommand
from node.http.replication import ReplicationRoutes
from node.http.server import HttpApi
from node.replication import codec, snapshot_transfer, staged_loads
from node.runtime import logging as nodelog
from node.runtime.mailbox import LatestCell
from node.storage.sqlite import Database, Limits
from node.storage.statemachine import Command, LoadFile

SECRET = "r" * 32
KEY = peerauth.derive_key(SECRET)
SENDER = "10.0.0.2:3000"


def write(index: int, *sql: str, request_id: str | None = None) -> msg.Entry:
    command = Command(WriteCommand(tuple(Statement(s) for s in sql), False, 0, 0), client="c",
                      request_id=request_id)  # fmt: skip
    return msg.Entry(1, index, msg.Kind.COMMAND, codec.encode_command(command))


def file_load(index: int, sha256: str, size: int, request_id: str | None = None) -> msg.Entry:
    command = Command(WriteCommand((), False, 0, 0), client="c", request_id=request_id, load=LoadFile(sha256, size))
    return msg.Entry(1, index, msg.Kind.COMMAND, codec.encode_command(command))


def make_file(path) -> tuple[str, int]:
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO people VALUES (1, 'loaded')")
    conn.close()
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


@pytest.fixture
async def replicator(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = Database(data_dir, limits=Limits(), queue_size=64)
    await database.open()
    r = Replicator(
        me=Endpoint.parse("127.0.0.2:4001"), data_dir=data_dir, database=database, views=LatestCell(),
        secret=SECRET, formation_window_s=0, log=nodelog.get_logger(),
    )  # fmt: skip
    r.identity = "me"
    await asyncio.to_thread(r.snapshots.loads.open)
    calls: list[tuple[str, int]] = []
    apply_entries, load_file = database.apply_entries, database.load_sqlite_file

    async def record_apply(entries):
        calls.append(("apply", entries[-1].index))
        return await apply_entries(entries)

    async def record_load(source, *, index, request=None, only_above=False):
        calls.append(("load", index))
        return await load_file(source, index=index, request=request, only_above=only_above)

    database.apply_entries = record_apply  # type: ignore[method-assign]
    database.load_sqlite_file = record_load  # type: ignore[method-assign]
    applier = asyncio.create_task(r._applier())
    try:
        yield r, database, calls, tmp_path
    finally:
        applier.cancel()
        await asyncio.gather(applier, return_exceptions=True)
        await database.close()


async def rows(database: Database, sql: str):
    return await database._write(lambda job: database._ops(job).internal(sql))


async def wait_for(predicate, what: str, timeout_s: float = 10.0) -> None:
    """Poll a condition the applier task sets, bounded in time and count."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.01) + 1):
        if predicate() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    assert predicate(), f"timed out waiting for {what}"


async def wait_applied(r: Replicator, index: int, timeout_s: float = 10.0) -> None:
    await wait_for(lambda: r.applied_index >= index, f"index {index} applied", timeout_s)


async def test_a_file_load_is_applied_alone_between_the_writes_around_it(replicator):
    r, database, calls, tmp_path = replicator
    sha256, size = make_file(tmp_path / "upload")
    await asyncio.to_thread(r.snapshots.loads.stage_local, tmp_path / "upload")
    await r._enqueue_apply((
        write(1, "CREATE TABLE old (x)", "INSERT INTO old VALUES (1)"),
        write(2, "INSERT INTO old VALUES (2)"),
        file_load(3, sha256, size),
        write(4, "INSERT INTO people VALUES (2, 'after')"),
    ))  # fmt: skip
    await wait_applied(r, 4)
    # One run before the load, the load alone, then the rest: never a run across it.
    assert calls == [("apply", 2), ("load", 3), ("apply", 4)]
    assert await rows(database, "SELECT id, name FROM people ORDER BY id") == [(1, "loaded"), (2, "after")]
    assert await rows(database, "SELECT count(*) FROM sqlite_schema WHERE name = 'old'") == [(0,)]
    assert await database.applied_index() == 4
    assert r.snapshots.loads.has(sha256, size), "the staged file stays until the log drops its entry"


async def test_a_missing_file_holds_the_apply_until_it_is_there_then_applies_it_once(replicator):
    r, database, calls, tmp_path = replicator
    sha256, size = make_file(tmp_path / "upload")
    await r._enqueue_apply((write(1, "CREATE TABLE old (x)"), file_load(2, sha256, size, request_id="r1")))
    # No member to fetch it from: the apply fails and is retried, the index does not move past 1.
    await wait_for(lambda: r.stats["apply_failures"] >= 1, "a failed attempt")
    assert r.applied_index == 1 and ("load", 2) not in calls
    await asyncio.to_thread(r.snapshots.loads.stage_local, tmp_path / "upload")
    await wait_applied(r, 2, timeout_s=15)
    assert calls.count(("load", 2)) == 1
    assert await rows(database, "SELECT name FROM people") == [("loaded",)]
    # The same request ID again (a client's retry) loads nothing: only its index is recorded.
    await r._enqueue_apply((write(3, "INSERT INTO people VALUES (5, 'x')"), file_load(4, sha256, size, "r1")))
    await wait_applied(r, 4)
    assert calls.count(("load", 2)) == 1 and ("load", 4) not in calls
    assert await rows(database, "SELECT count(*) FROM people") == [(2,)]


# --- the stage endpoint -------------------------------------------------------------------------------------


class FakeReplicator:
    identity = "me-identity"
    is_member = True

    def __init__(self) -> None:
        self.staged: list[tuple[Endpoint, str, int]] = []

    async def stage_load(self, sender: Endpoint, sha256: str, size_bytes: int) -> None:
        self.staged.append((sender, sha256, size_bytes))


@pytest.fixture
async def endpoint():
    replicator = FakeReplicator()
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    ReplicationRoutes(
        replicator=replicator, secret=SECRET, log=nodelog.get_logger(), body_read_timeout_s=5
    ).add_to(api.app)
    async with TestClient(TestServer(api.app)) as client:
        yield client, replicator


def stage_headers(signer: peerauth.Signer, body: bytes, sender: str = SENDER) -> dict[str, str]:
    return {
        peerauth.HEADER: signer.next_header(staged_loads.STAGE_PATH, 0, body),
        snapshot_transfer.SENDER_HEADER: sender,
        "Content-Type": "application/json",
    }


async def test_a_signed_stage_request_is_carried_out_once(endpoint):
    client, replicator = endpoint
    body = staged_loads.encode_stage_request("a" * 64, 4096)
    headers = stage_headers(peerauth.Signer(KEY, SENDER, 5), body)
    resp = await client.post(staged_loads.STAGE_PATH, data=body, headers=headers)
    assert resp.status == 200 and (await resp.json())["staged"] is True
    assert replicator.staged == [(Endpoint.parse(SENDER), "a" * 64, 4096)]
    replay = await client.post(staged_loads.STAGE_PATH, data=body, headers=headers)
    assert replay.status == 401 and len(replicator.staged) == 1


@pytest.mark.parametrize(
    ("body", "headers_of", "status"),
    [
        # Unsigned, signed with another key, signed over another body, naming another sender: 401.
        (staged_loads.encode_stage_request("a" * 64, 1), lambda b: {}, 401),
        (staged_loads.encode_stage_request("a" * 64, 1),
         lambda b: stage_headers(peerauth.Signer(peerauth.derive_key("x" * 32), SENDER, 5), b), 401),
        (staged_loads.encode_stage_request("a" * 64, 1),
         lambda b: stage_headers(peerauth.Signer(KEY, SENDER, 5), b + b" "), 401),
        (staged_loads.encode_stage_request("a" * 64, 1),
         lambda b: {**stage_headers(peerauth.Signer(KEY, SENDER, 5), b),
                    snapshot_transfer.SENDER_HEADER: "10.0.0.9:3000"}, 401),
        # Signed but malformed: 400.
        (orjson.dumps({"sha256": "A" * 64, "size": 1}), lambda b: stage_headers(peerauth.Signer(KEY, SENDER, 5), b),
         400),
        (b"not json", lambda b: stage_headers(peerauth.Signer(KEY, SENDER, 5), b), 400),
        (staged_loads.encode_stage_request("a" * 64, 1),
         lambda b: stage_headers(peerauth.Signer(KEY, SENDER, 5), b, sender="nonsense"), 400),
        # Too large a body: 413.
        (b"x" * 5000, lambda b: stage_headers(peerauth.Signer(KEY, SENDER, 5), b), 413),
    ],
)  # fmt: skip
async def test_a_bad_stage_request_is_refused_and_nothing_is_staged(endpoint, body, headers_of, status):
    client, replicator = endpoint
    resp = await client.post(staged_loads.STAGE_PATH, data=body, headers=headers_of(body))
    assert resp.status == status
    assert (await resp.json())["code"]
    assert replicator.staged == []
