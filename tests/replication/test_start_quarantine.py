"""A replicated node whose database, log, hard state or identity is damaged at start: the whole replicated
state is moved to one quarantine directory and the node starts again as a new, empty member.

Before: a corrupt database left the node waiting for ever ("replication_waits_for_database") and a corrupt
log made it exit, start after start. In-process (a Replicator on a real Database and log in a temporary
directory) so hypothesis can damage many places; tests/integration/test_integrity_resync.py shows the
rejoin with real processes (learner, then voter, same rows as the leader).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import errors
from node.actors.replicator import Replicator
from node.core.ids import Endpoint
from node.core.sqlreq import DbRequest, Flags, Level, Statement
from node.replication.service import ReplicatedDataService
from node.runtime.mailbox import LatestCell
from node.service import WriteRequest
from node.storage import quarantine
from node.storage.corestate import REPLICATION_STATE_FILE
from node.storage.identity import IDENTITY_FILE_NAME, read_identity
from node.storage.log import LOG_DIR_NAME, SEGMENT_SUFFIX
from node.storage.sqlite import DB_FILE_NAME, Database, Limits

START_BOUND_S = 20.0  # liveness bound: the replicator forms (or refuses) within it
ROWS = 300  # enough rows for a database of many pages, so a page in the middle is table data


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields | {"level": level} for level, event, fields in self.lines if event == name]


class Run:
    """One start of a replicated node on ``data_dir`` (its database started by the Replicator, as in a node)."""

    def __init__(self, data_dir: Path) -> None:
        self.log = RecordingLog()
        self.database = Database(
            data_dir, limits=Limits(), queue_size=64, log=self.log, quarantine_corrupt=False
        )
        self.replicator = Replicator(
            me=Endpoint("127.0.0.1", 9), data_dir=data_dir, database=self.database, views=LatestCell(),
            secret="s" * 32, formation_window_s=0.0, log=self.log,
        )  # fmt: skip
        self.service = ReplicatedDataService(self.database, self.replicator)
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Run:
        await self.database.prepare()
        self.replicator.begin(1)
        self.task = asyncio.create_task(self.replicator.run(self.stop))
        ready = asyncio.create_task(self.replicator.ready.wait())
        await asyncio.wait([self.task, ready], timeout=START_BOUND_S, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self.task.done():
            self.task.result()  # raises what the start raised
        assert self.replicator.ready.is_set(), "the replicator did not form within the bound"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        async with asyncio.timeout(START_BOUND_S):
            await asyncio.gather(self.task, return_exceptions=True)
        await self.database.close()

    async def write_until_leader(self, statements: tuple[Statement, ...]) -> None:
        for _ in range(200):  # bounded: a cluster of one leads within a few ticks
            if self.replicator.is_leader() and self.replicator.status().writable:
                break
            await asyncio.sleep(0.01)
        await self.service.submit(WriteRequest(statements, transaction=True), "test")

    async def count(self) -> int:
        request = DbRequest((Statement("SELECT count(*) FROM t"),), Flags())
        results = await self.database.query(request, client="test")
        return results[0].rows[0][0]


async def _first_life(data_dir: Path) -> str:
    """A node that formed a cluster of one and stored ROWS rows; returns its identity."""
    async with Run(data_dir) as run:
        await run.write_until_leader((Statement("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"),))
        for start in range(0, ROWS, 100):
            inserts = tuple(
                Statement("INSERT INTO t(v) VALUES(?)", (f"{i:06d}-" + "x" * 200,))
                for i in range(start, start + 100)
            )
            await run.write_until_leader(inserts)
        assert await run.count() == ROWS
        identity = run.replicator.identity
    assert identity is not None
    return identity


def _damage(data_dir: Path, what: str, rng: random.Random) -> None:
    if what == "database":
        db = data_dir / DB_FILE_NAME
        size = db.stat().st_size
        page = 4096
        assert size >= 8 * page, size
        offset = rng.randrange(2, size // page - 1) * page  # a whole page in the middle, never the header
        with open(db, "r+b") as f:
            f.seek(offset)
            f.write(rng.randbytes(page))
    elif what == "log":
        (segment,) = sorted((data_dir / LOG_DIR_NAME).glob(f"*{SEGMENT_SUFFIX}"))
        data = bytearray(segment.read_bytes())
        # A byte inside a record that has valid records after it (so it is damage, never a torn tail).
        offset = rng.randrange(64 + 8, len(data) // 2)
        data[offset] ^= rng.randrange(1, 256)
        segment.write_bytes(bytes(data))
    elif what == "identity":
        path = data_dir / IDENTITY_FILE_NAME
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
    elif what == "hard state":
        path = data_dir / REPLICATION_STATE_FILE
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(what)


def _file_sizes(data_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in data_dir.iterdir() if p.is_file()}


async def _scenario(data_dir: Path, what: str, seed: int) -> None:
    old_identity = await _first_life(data_dir)
    before = await asyncio.to_thread(_file_sizes, data_dir)
    await asyncio.to_thread(_damage, data_dir, what, random.Random(seed))
    async with Run(data_dir) as run:
        (event,) = run.log.events("data_quarantined")
        assert event["level"] == "error"
        assert event["damaged"].startswith(what), event
        assert event["old_identity"] in (old_identity, None)  # None: the identity file was the damage
        assert "learner" in event["advice"] and "quarantined copy" in event["advice"]
        assert run.log.events("replication_waits_for_database") == []
        # A new member: a new identity, an empty database, waiting for a cluster to take it back. Alone, it
        # never starts an empty cluster in place of the data it lost: data calls and /readyz say why.
        assert run.replicator.identity not in (None, old_identity)
        assert read_identity(data_dir) == run.replicator.identity
        assert run.database.is_open and run.replicator.state is not None
        assert not run.replicator.is_member and run.log.events("replication_bootstrapped") == []
        assert "quarantine" in (run.replicator.awaiting_rejoin() or "")
        with pytest.raises(errors.DatabaseCorrupt, match="quarantine"):
            await run.service.submit(WriteRequest((Statement("SELECT 1"),)), "test")
        with pytest.raises(errors.DatabaseCorrupt, match="quarantine"):
            await run.service.read(DbRequest((Statement("SELECT 1"),), Flags()), Level.NONE, "test")
        where = Path(event["path"])
        assert where.parent == data_dir / quarantine.QUARANTINE_DIR
        # The old state, kept for the operator, every file as it was.
        for name in (DB_FILE_NAME, IDENTITY_FILE_NAME, REPLICATION_STATE_FILE):
            assert (where / name).stat().st_size == before[name], name
        assert sorted((where / LOG_DIR_NAME).glob(f"*{SEGMENT_SUFFIX}"))
        assert event["size_bytes"] >= before[DB_FILE_NAME]
        assert not (data_dir / quarantine.QUARANTINE_DIR / quarantine.PENDING_FILE_NAME).exists()
    # The next start is an ordinary one: the same (new) identity, no new quarantine, and it says one is kept.
    async with Run(data_dir) as again:
        assert again.replicator.identity == run.replicator.identity
        assert again.log.events("data_quarantined") == []
        (kept,) = again.log.events("quarantined_data_kept")
        assert kept["events"] == 1 and kept["size_bytes"] >= before[DB_FILE_NAME]
        assert quarantine.usage(data_dir).events == 1
        assert again.replicator.awaiting_rejoin() is not None and not again.replicator.is_member
    # The operator's way out for a node with no cluster to rejoin: remove the quarantine; it starts empty.
    await asyncio.to_thread(shutil.rmtree, data_dir / quarantine.QUARANTINE_DIR)
    async with Run(data_dir) as fresh:
        assert fresh.replicator.awaiting_rejoin() is None
        await fresh.write_until_leader((Statement("CREATE TABLE t (v)"),))
        assert await fresh.count() == 0


def _run(what: str, seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), what, seed))


def test_a_corrupt_database_is_quarantined_with_the_log_and_identity_and_the_node_starts_anew():
    """Regression: this used to wait for ever (replication_waits_for_database)."""
    _run("database", 1)


def test_a_corrupt_log_record_is_quarantined_and_the_node_starts_anew():
    """Regression: this used to make the node exit at every start (LogCorrupt)."""
    _run("log", 1)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(what=st.sampled_from(["database", "log", "identity", "hard state"]), seed=st.integers(0, 2**32 - 1))
def test_any_damage_to_the_replicated_state_quarantines_all_of_it_once(what, seed):
    _run(what, seed)


def test_an_intact_node_restarts_under_its_own_identity_without_quarantine():
    async def scenario(data_dir: Path) -> None:
        identity = await _first_life(data_dir)
        async with Run(data_dir) as run:
            assert run.replicator.identity == identity
            assert run.log.events("data_quarantined") == [] and run.log.events("quarantined_data_kept") == []
            assert await run.count() == ROWS
        assert not (data_dir / quarantine.QUARANTINE_DIR).exists()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))
