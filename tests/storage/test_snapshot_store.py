"""The snapshot directory: a snapshot exists only with its meta, received files are verified, old ones pruned.

Files are plain bytes here (the store never opens them as SQLite): what is checked is the directory's
bookkeeping, its crash leftovers and the verification of received transfers.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.storage.snapshots import (
    KEEP_SNAPSHOTS,
    SnapshotInvalid,
    SnapshotMeta,
    SnapshotStore,
    snapshot_stem,
)

CONFIG = b'{"voters":["a","b","c"]}'


def make_tmp(store: SnapshotStore, content: bytes) -> Path:
    path = store.temp_path()
    path.write_bytes(content)
    return path


def add(store: SnapshotStore, index: int, epoch: int = 1, content: bytes | None = None) -> SnapshotMeta:
    data = content if content is not None else f"snapshot {index}/{epoch}".encode() * 100
    return store.add(
        make_tmp(store, data), cluster="c1", epoch=epoch, index=index, config=CONFIG, sqlite_version="3.54.1"
    )


def meta_for(data: bytes, index: int, epoch: int = 2) -> SnapshotMeta:
    return SnapshotMeta("c1", epoch, index, CONFIG, hashlib.sha256(data).hexdigest(), len(data), "3.54.1")


def files(store: SnapshotStore) -> set[str]:
    return {p.name for p in store.directory.iterdir() if p.is_file()}


def test_open_creates_the_directories_and_finds_nothing(tmp_path):
    store = SnapshotStore(tmp_path / "data")
    contents = store.open()
    assert contents.snapshots == () and contents.problems == ()
    assert store.incoming.is_dir() and store.newest() is None


def test_add_moves_the_file_in_and_writes_its_meta(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    data = b"sqlite bytes" * 1000
    tmp = make_tmp(store, data)
    meta = store.add(tmp, cluster="c1", epoch=3, index=42, config=CONFIG, sqlite_version="3.54.1")
    assert not tmp.exists()
    assert meta == meta_for(data, 42, 3)
    assert store.path_of(meta).read_bytes() == data
    assert SnapshotMeta.decode(store.meta_path(meta).read_bytes()) == meta
    assert store.newest() == meta
    assert files(store) == {meta.stem + ".db", meta.stem + ".json"}
    # A new store over the same directory finds it.
    again = SnapshotStore(tmp_path)
    assert again.open().snapshots == (meta,) and again.newest() == meta


def test_add_of_an_existing_stem_keeps_the_existing_snapshot(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    first = add(store, 7, content=b"first")
    tmp = make_tmp(store, b"second, other bytes")
    second = store.add(tmp, cluster="c1", epoch=1, index=7, config=CONFIG, sqlite_version="3.54.1")
    assert second == first and not tmp.exists()
    assert store.path_of(first).read_bytes() == b"first"


def test_prune_keeps_the_newest_and_never_the_one_just_added_goes(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    metas = [add(store, i * 10) for i in range(1, 5)]
    assert store.snapshots() == metas[-KEEP_SNAPSHOTS:]
    for gone in metas[:-KEEP_SNAPSHOTS]:
        assert not store.path_of(gone).exists() and not store.meta_path(gone).exists()
    # An older snapshot added after newer ones stays (it was just added); the oldest other one goes.
    old = add(store, 5)
    assert old in store.snapshots() and len(store.snapshots()) == KEEP_SNAPSHOTS
    assert store.newest() == metas[-1]
    assert len(files(store)) == 2 * KEEP_SNAPSHOTS


def test_open_removes_crash_leftovers_and_reports_damage(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    good = add(store, 100)
    d = store.directory
    (d / (snapshot_stem(200, 1) + ".db")).write_bytes(b"renamed, meta never written")
    (d / (snapshot_stem(300, 1) + ".json.tmp")).write_bytes(b"half a meta")
    (d / ".tmp-123-1").write_bytes(b"a copy being hashed")
    (d / (snapshot_stem(400, 1) + ".json")).write_bytes(b"{not json")
    (d / (snapshot_stem(400, 1) + ".db")).write_bytes(b"x")
    wrong_size = meta_for(b"12345", 500)
    (d / (wrong_size.stem + ".json")).write_bytes(wrong_size.encode())
    (d / (wrong_size.stem + ".db")).write_bytes(b"1234")
    no_db = meta_for(b"abc", 600)
    (d / (no_db.stem + ".json")).write_bytes(no_db.encode())
    misnamed = meta_for(b"abc", 700)
    (d / (snapshot_stem(701, 2) + ".json")).write_bytes(misnamed.encode())
    (d / "operator-notes.txt").write_bytes(b"not ours: left alone")
    (store.incoming / "junk").write_bytes(b"?")
    (store.incoming / (snapshot_stem(50, 1) + ".part")).write_bytes(b"older than what we have")
    (store.incoming / (snapshot_stem(900, 1) + ".part")).write_bytes(b"a transfer to resume")

    again = SnapshotStore(tmp_path)
    contents = again.open()
    assert contents.snapshots == (good,)
    assert len(contents.problems) == 4, contents.problems
    joined = "\n".join(contents.problems)
    assert snapshot_stem(400, 1) in joined and "not JSON" in joined
    assert "4 bytes, its meta says 5" in joined and "missing" in joined and "names" in joined
    assert files(again) == {good.stem + ".db", good.stem + ".json", "operator-notes.txt"}
    assert {p.name for p in again.incoming.iterdir()} == {snapshot_stem(900, 1) + ".part"}


def test_open_prunes_beyond_the_limit_a_crash_left(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    metas = [add(store, i) for i in (1, 2)]
    extra = meta_for(b"third", 3)
    (store.directory / (extra.stem + ".db")).write_bytes(b"third")
    (store.directory / (extra.stem + ".json")).write_bytes(extra.encode())
    again = SnapshotStore(tmp_path)
    assert again.open().snapshots == (metas[1], extra)


def test_finish_incoming_verifies_and_installs(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    data = b"received" * 5000
    meta = meta_for(data, 77)
    part = store.incoming_part(meta)
    assert part.parent == store.incoming and part.name == meta.stem + ".part"
    part.write_bytes(data)
    path = store.finish_incoming(meta)
    assert path == store.path_of(meta) and path.read_bytes() == data and not part.exists()
    assert store.newest() == meta
    assert SnapshotStore(tmp_path).open().snapshots == (meta,)


@pytest.mark.parametrize("damage", ["short", "long", "flipped"])
def test_finish_incoming_refuses_a_mismatch_and_deletes_the_part(tmp_path, damage):
    store = SnapshotStore(tmp_path)
    store.open()
    data = b"received" * 5000
    meta = meta_for(data, 77)
    bad = {"short": data[:-1], "long": data + b"!", "flipped": b"X" + data[1:]}[damage]
    store.incoming_part(meta).write_bytes(bad)
    with pytest.raises(SnapshotInvalid, match="sha256" if damage == "flipped" else "bytes"):
        store.finish_incoming(meta)
    assert not store.incoming_part(meta).exists()
    assert store.snapshots() == [] and files(store) == set()


def test_finish_incoming_without_a_part_is_an_error_that_changes_nothing(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    with pytest.raises(FileNotFoundError):
        store.finish_incoming(meta_for(b"x", 3))
    assert store.snapshots() == []


def test_remove_deletes_both_files(tmp_path):
    store = SnapshotStore(tmp_path)
    store.open()
    meta = add(store, 9)
    store.remove(meta)
    assert store.snapshots() == [] and files(store) == set()


# Operations: ("add", index, epoch) or ("receive", index, epoch) or ("reopen",).
_OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["add", "receive"]), st.integers(1, 30), st.integers(0, 3)),
        st.just(("reopen",)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_property_the_store_keeps_at_most_the_limit_and_what_was_just_added(tmp_path, ops):
    root = tmp_path / "prop"
    shutil.rmtree(root, ignore_errors=True)
    store = SnapshotStore(root)
    store.open()
    model: dict[str, SnapshotMeta] = {}
    for op in ops:
        if op[0] == "reopen":
            store = SnapshotStore(root)
            contents = store.open()
            assert contents.problems == ()
            assert {m.stem for m in contents.snapshots} == set(model)
            continue
        kind, index, epoch = op
        data = f"{kind}:{index}:{epoch}".encode() * (index + 1)
        if kind == "add":
            meta = add(store, index, epoch, data)
        else:
            meta = meta_for(data, index, epoch)
            store.incoming_part(meta).write_bytes(data)
            store.finish_incoming(meta)
        if meta.stem not in model:
            model[meta.stem] = meta
        # The model's pruning: oldest first, never the one just added.
        while len(model) > KEEP_SNAPSHOTS:
            victim = min((m for m in model.values() if m.stem != meta.stem), key=lambda m: (m.index, m.epoch))
            del model[victim.stem]
        assert meta.stem in {m.stem for m in store.snapshots()}
        assert {m.stem for m in store.snapshots()} == set(model)
        assert files(store) == {m.stem + s for m in model.values() for s in (".db", ".json")}
        for m in store.snapshots():
            assert hashlib.sha256(store.path_of(m).read_bytes()).hexdigest() == m.sha256


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(min_size=1, max_size=3000),
    damage=st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
        st.tuples(st.just("extend"), st.integers(1, 50), st.integers(0, 255)),
    ),
)
def test_property_any_damaged_transfer_is_refused_and_removed(tmp_path, data, damage):
    root = tmp_path / "damage"
    shutil.rmtree(root, ignore_errors=True)
    store = SnapshotStore(root)
    store.open()
    meta = meta_for(data, 5)
    kind, where, value = damage
    if kind == "flip":
        at = where % len(data)
        bad = data[:at] + bytes([data[at] ^ value]) + data[at + 1 :]
    elif kind == "cut":
        bad = data[: where % len(data)]
    else:
        bad = data + bytes([value]) * where
    store.incoming_part(meta).write_bytes(bad)
    with pytest.raises(SnapshotInvalid):
        store.finish_incoming(meta)
    assert not store.incoming_part(meta).exists() and store.snapshots() == [] and files(store) == set()
    # The intact bytes are accepted afterwards (a refused transfer does not poison the name).
    store.incoming_part(meta).write_bytes(data)
    assert store.finish_incoming(meta).read_bytes() == data
