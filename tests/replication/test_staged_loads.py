"""Replicated SQLite-file loads: the LoadFile command codec, the staging majority rule, the stage request
body, the staged-file store and the database stamping of a load's request ID."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import apsw
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import errors
from node.core.sqlreq import WriteCommand
from node.replication import codec, snapshot_transfer, staged_loads
from node.replication.staged_loads import (
    StagedLoads,
    decode_stage_request,
    encode_stage_request,
    load_meta,
    load_name,
    majority_of,
    parse_load_name,
    staged_majority,
)
from node.storage import statemachine
from node.storage.sqlite import Database, Limits, RequestRow, check_sqlite_file
from node.storage.statemachine import Command, LoadFile

sha = st.text("0123456789abcdef", min_size=64, max_size=64)
size = st.integers(0, 2**63 - 1)
identities = st.sets(st.text("abcdefgh", min_size=1, max_size=3), max_size=9)


# --- the command codec --------------------------------------------------------------------------------------


@given(sha, size, st.text(max_size=20), st.none() | st.text(min_size=1, max_size=20))
def test_a_file_load_command_survives_a_round_trip(digest, n, client, request_id):
    command = Command(
        WriteCommand((), False, 0, 0), client=client, request_id=request_id, sqlite_version="3.50.0",
        load=LoadFile(digest, n),
    )  # fmt: skip
    assert codec.decode_command(codec.encode_command(command)) == command


def test_a_file_load_has_no_load_id_so_an_older_release_refuses_it_rather_than_apply_it_empty():
    """Releases before file loads read a ``load`` object only with an ``id``: this one has none, so they
    raise (their apply is retried) instead of applying an empty command."""
    payload = codec.encode_command(Command(WriteCommand((), False, 0, 0), load=LoadFile("a" * 64, 5)))
    body = orjson.loads(payload)
    assert body["load"] == {"file": {"sha256": "a" * 64, "size": 5}} and body["stmts"] == []


@pytest.mark.parametrize(
    "load",
    [
        {"file": {"sha256": "A" * 64, "size": 1}},
        {"file": {"sha256": "a" * 63, "size": 1}},
        {"file": {"sha256": "a" * 64, "size": -1}},
        {"file": {"sha256": "a" * 64, "size": True}},
        {"file": {"sha256": "a" * 64}},
        {"file": {"sha256": "a" * 64, "size": 1, "x": 1}},
        {"file": ["a" * 64, 1]},
        {"file": {"sha256": "a" * 64, "size": 1}, "id": "x"},
    ],
)
def test_a_malformed_file_load_is_a_codec_error(load):
    body = orjson.loads(codec.encode_command(Command(WriteCommand((), False, 0, 0))))
    body["load"] = load
    with pytest.raises(codec.CodecError):
        codec.decode_command(orjson.dumps(body))


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=70) | sha,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["sha256", "size", "x"]), inner,
                                                                                max_size=3),
                    max_leaves=8))  # fmt: skip
def test_any_file_object_decodes_to_a_valid_load_or_a_codec_error(file):
    body = orjson.loads(codec.encode_command(Command(WriteCommand((), False, 0, 0))))
    body["load"] = {"file": file}
    try:
        command = codec.decode_command(orjson.dumps(body))
    except codec.CodecError:
        return
    assert isinstance(command.load, LoadFile)
    assert staged_loads.valid_sha256(command.load.sha256) and command.load.size_bytes >= 0


def test_a_request_id_stands_for_the_file_it_loaded():
    def command(digest: str) -> Command:
        return Command(WriteCommand((), False, 0, 0), client="c", request_id="r", load=LoadFile(digest, 1))

    assert statemachine.digest(command("a" * 64)) != statemachine.digest(command("b" * 64))
    assert statemachine.digest(command("a" * 64)) == statemachine.digest(command("a" * 64))


def test_the_group_apply_refuses_a_file_load():
    """A file load never runs inside a group of ordinary entries (the Replicator applies it alone)."""
    entry = statemachine.Entry(1, (Command(WriteCommand((), False, 0, 0), load=LoadFile("a" * 64, 1)),))

    class Ops:
        def __init__(self) -> None:
            self.conn = apsw.Connection(":memory:")

        def internal(self, sql, params=()):
            return self.conn.execute(sql, params).fetchall()

        def in_transaction(self):
            return self.conn.in_transaction

    with pytest.raises(ValueError, match="applied alone"):
        statemachine.apply(Ops(), [entry])  # type: ignore[arg-type]


# --- the majority rule --------------------------------------------------------------------------------------


@given(identities, identities)
def test_staged_majority_counts_only_voters_that_hold_the_file(voters, staged):
    held = len(voters & staged)
    assert staged_majority(voters, staged) == (bool(voters) and 2 * held > len(voters))


@given(identities.filter(bool), identities, identities)
def test_more_holders_never_lose_a_majority(voters, staged, more):
    if staged_majority(voters, staged):
        assert staged_majority(voters, staged | more)


def test_majority_examples():
    assert [majority_of(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert staged_majority({"a", "b", "c"}, {"a", "b"})  # leader + one of two followers
    assert not staged_majority({"a", "b", "c"}, {"a"})  # both followers down
    assert not staged_majority({"a", "b", "c"}, {"a", "x", "y"})  # learners do not count
    assert staged_majority({"a"}, {"a"}) and not staged_majority(set(), {"a"})


# --- names and the stage request ----------------------------------------------------------------------------


@given(sha)
def test_load_names_round_trip_and_are_served_by_the_snapshot_route(digest):
    assert parse_load_name(load_name(digest)) == digest
    assert snapshot_transfer._is_load_name(load_name(digest))
    assert snapshot_transfer.parse_stem(load_name(digest)) is None


@given(st.text(max_size=80))
def test_only_exact_load_names_parse(text):
    parsed = parse_load_name(text)
    assert parsed is None or load_name(parsed) == text
    assert snapshot_transfer._is_load_name(text) == (parsed is not None)


@given(sha, st.integers(1, 2**62 - 1))
def test_a_stage_request_round_trips(digest, n):
    assert decode_stage_request(encode_stage_request(digest, n)) == (digest, n)


_value = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=66) | sha


@given(
    st.binary(max_size=200)
    | st.builds(orjson.dumps, st.dictionaries(st.sampled_from(["sha256", "size", "x"]), _value))
)
def test_a_malformed_stage_request_is_a_value_error(data):
    try:
        digest, n = decode_stage_request(data)
    except ValueError:
        return
    assert staged_loads.valid_sha256(digest) and n > 0


def test_the_transfer_meta_of_a_staged_file_encodes_and_decodes():
    meta = load_meta("c" * 64, 123)
    assert meta.decode(meta.encode()) == meta
    assert snapshot_transfer.decode_meta_header(snapshot_transfer.encode_meta_header(meta)) == meta


# --- the store ----------------------------------------------------------------------------------------------


def sqlite_file(path, rows: int) -> bytes:
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE t (v INTEGER)")
    conn.execute("BEGIN")
    for i in range(rows):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.execute("COMMIT")
    conn.close()
    return path.read_bytes()


def test_stage_local_moves_the_file_in_durably_and_names_it_by_digest(tmp_path):
    store = StagedLoads(tmp_path)
    store.open()
    upload = tmp_path / "upload"
    data = sqlite_file(upload, 10)
    staged = store.stage_local(upload)
    assert staged.sha256 == hashlib.sha256(data).hexdigest() and staged.size_bytes == len(data)
    assert not upload.exists() and store.path_of(staged.sha256).read_bytes() == data
    assert store.has(staged.sha256, len(data)) and not store.has(staged.sha256, len(data) + 1)
    # Staging the same bytes again keeps one file.
    again = tmp_path / "again"
    again.write_bytes(data)
    assert store.stage_local(again) == staged and not again.exists()
    assert len(store.files()) == 1
    # A reopened store finds it.
    reopened = StagedLoads(tmp_path)
    assert [f.sha256 for f in reopened.open()] == [staged.sha256]


def test_a_received_file_that_does_not_match_is_discarded(tmp_path):
    store = StagedLoads(tmp_path)
    store.open()
    digest = hashlib.sha256(b"right").hexdigest()
    store.part_of(digest).write_bytes(b"wrong")
    with pytest.raises(ValueError, match="discarded"):
        store.finish_part(digest, 5)
    assert not store.part_of(digest).exists() and not store.has(digest)
    store.part_of(digest).write_bytes(b"right")
    store.finish_part(digest, 5)
    assert store.has(digest, 5) and not store.part_of(digest).exists()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=8), st.integers(1, 3))
def test_the_store_never_keeps_more_than_its_bound_and_keeps_the_newest(tmp_path_factory, blobs, keep):
    root = tmp_path_factory.mktemp("staged")
    store = StagedLoads(root, keep=keep)
    store.open()
    order: list[str] = []
    for n, blob in enumerate(blobs):
        source = root / f"u{n}"
        source.write_bytes(blob)
        digest = store.stage_local(source).sha256
        order = [d for d in order if d != digest] + [digest]
        held = [f.sha256 for f in store.files()]
        assert len(held) <= keep and held == order[-keep:]
        on_disk = sorted(p.name for p in store.directory.iterdir() if p.is_file())
        assert on_disk == sorted(d + ".db" for d in held)


def test_open_removes_junk_and_parts_of_files_already_held(tmp_path):
    store = StagedLoads(tmp_path)
    store.open()
    source = tmp_path / "u"
    source.write_bytes(b"abc")
    digest = store.stage_local(source).sha256
    (store.directory / "junk.db").write_bytes(b"x")
    (store.directory / ".tmp-1").write_bytes(b"x")
    store.part_of(digest).write_bytes(b"a")
    other = "e" * 64
    store.part_of(other).write_bytes(b"resume me")
    reopened = StagedLoads(tmp_path)
    assert [f.sha256 for f in reopened.open()] == [digest]
    assert sorted(p.name for p in store.directory.iterdir() if p.is_file()) == [digest + ".db"]
    assert [p.name for p in store.incoming.iterdir()] == [other + ".part"]


def test_a_file_is_removable_once_the_log_no_longer_holds_its_entry(tmp_path):
    store = StagedLoads(tmp_path)
    store.open()
    source = tmp_path / "u"
    source.write_bytes(b"abc")
    digest = store.stage_local(source).sha256
    assert store.removable(100, 100) == []  # not applied yet: a lagging node may still need it
    store.mark_applied(digest, 7)
    # Still in the durable log, or still in the core's memory: it may be sent as an entry.
    assert store.removable(7, 100) == [] and store.removable(100, 6) == []
    assert store.removable(8, 7) == [digest]
    store.remove(digest)
    assert not store.has(digest) and not store.path_of(digest).exists() and store.removable(8, 7) == []


# --- checking and loading -----------------------------------------------------------------------------------


def test_check_sqlite_file_refuses_what_is_not_a_sound_database(tmp_path):
    good = tmp_path / "good.db"
    sqlite_file(good, 3)
    before = good.read_bytes()
    check_sqlite_file(good)
    assert good.read_bytes() == before  # a rollback-journal file is left as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.db"]
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    with pytest.raises(errors.BadRequest):
        check_sqlite_file(bad)


async def test_a_loaded_file_records_only_the_loads_own_request_id_at_its_index(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = Database(data_dir, limits=Limits(), queue_size=64)
    await database.open()
    try:
        source = tmp_path / "src.db"
        sqlite_file(source, 5)
        conn = apsw.Connection(str(source))
        for sql in statemachine.SCHEMA:
            conn.execute(sql)
        conn.execute(
            f"INSERT INTO {statemachine.REQUESTS_TABLE} VALUES ('old', 'x', 1, 1, x'00', x'00')"
        )
        conn.close()
        target = database.temp_path("load")
        os.replace(source, target)
        row = RequestRow("c", "r1", b"\x01" * 32, b"results")
        await database.load_sqlite_file(target, index=42, request=row)
        assert await database.applied_index() == 42

        def rows(job):
            ops = database._ops(job)
            return (
                ops.internal("SELECT count(*) FROM t"),
                ops.internal(f"SELECT client, request_id, idx FROM {statemachine.REQUESTS_TABLE}"),
            )

        count, requests = await database._write(rows)
        assert count == [(5,)] and requests == [("c", "r1", 42)]
    finally:
        await database.close()


def test_idle_parts_of_other_files_are_dropped_when_a_download_starts(tmp_path):
    store = StagedLoads(tmp_path)
    store.open()
    running, idle, fresh = "a" * 64, "b" * 64, "c" * 64
    for digest in (running, idle, fresh):
        store.part_of(digest).write_bytes(b"x")
    old = store.part_of(idle).stat().st_mtime - staged_loads.STALE_PART_S - 1
    os.utime(store.part_of(idle), (old, old))
    os.utime(store.part_of(running), (old, old))
    assert store.drop_stale_parts(running) == [idle]
    assert sorted(p.name for p in store.incoming.iterdir()) == [running + ".part", fresh + ".part"]


async def test_a_replicated_load_never_replaces_a_database_that_already_holds_its_index(tmp_path):
    """A snapshot installed while the load's entry waited holds the load and what followed: the entry
    must change nothing (regression guard for the swap's own index check)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = Database(data_dir, limits=Limits(), queue_size=64)
    await database.open()
    try:
        await database.apply_entries(
            [statemachine.Entry(10, (Command(WriteCommand((), False, 0, 0)),))]
        )
        for index, expected in ((10, False), (9, False), (11, True)):
            source = tmp_path / f"src{index}.db"
            sqlite_file(source, index)
            target = database.temp_path("load")
            os.replace(source, target)
            assert await database.load_sqlite_file(target, index=index, only_above=True) is expected
            target.unlink(missing_ok=True)
        assert await database.applied_index() == 11
        count = await database._write(lambda job: database._ops(job).internal("SELECT count(*) FROM t"))
        assert count == [(11,)]
    finally:
        await database.close()


@given(st.integers(1, 10_000), st.integers(1, 10_000), st.integers(-300, 10_000))
def test_a_file_is_removable_only_when_its_entry_can_no_longer_be_sent(at, first_index, memory_base):
    """The core sends entry ``at`` from memory while ``at > memory_base`` and from the durable log while
    ``at >= first_index`` (``machine.disk_start``): as long as either holds, the file must stay."""
    store = StagedLoads(Path("/nonexistent"))
    store._files["d" * 64] = 1
    store.mark_applied("d" * 64, at)
    sendable = at > memory_base or at >= first_index
    assert (store.removable(first_index, memory_base) == []) == sendable


def test_a_wal_mode_upload_becomes_one_self_contained_file(tmp_path):
    """Regression: a WAL-mode upload opened read-only left -wal/-shm files beside it in DATA_DIR (and
    beside each replica's copy)."""
    upload = tmp_path / "upload"
    conn = apsw.Connection(str(upload))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    check_sqlite_file(upload)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]
    reader = apsw.Connection(str(upload), flags=apsw.SQLITE_OPEN_READONLY)
    assert reader.execute("SELECT v FROM t").fetchall() == [(1,)]
    assert reader.execute("PRAGMA journal_mode").fetchall() == [("delete",)]
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 599))
def test_any_damaged_upload_is_a_400_never_another_error(tmp_path_factory, noise, at):
    """Whatever bytes follow the SQLite magic (or replace part of a real file): 400 or accepted, nothing
    else escapes."""
    root = tmp_path_factory.mktemp("upload")
    path = root / "upload"
    good = sqlite_file(root / "good.db", 5)
    data = bytearray(good)
    data[at : at + len(noise)] = noise
    path.write_bytes(bytes(data[: len(good)]))
    try:
        check_sqlite_file(path)
    except errors.BadRequest:
        return
