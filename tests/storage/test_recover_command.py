"""``python -m node recover`` on real data directories made with the storage APIs (node.recover).

A node's DATA_DIR is built as the Replicator leaves it: identity file, replication hard state, durable log,
database with its applied index. The command's result is then read back the way a node start reads it
(``load_core_hard_state``, ``DurableLog``, ``machine.restore``).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from node.__main__ import main
from node.core.replication import machine, recovery
from node.core.replication.messages import Config, Entry, HardState, Kind, LogId, ViewChanged
from node.recover import CONFIRM_FLAG, EXIT_FAILED, EXIT_OK, EXIT_USAGE, recover
from node.replication.codec import from_log_entry, to_log_entry
from node.storage import statemachine
from node.storage.corestate import REPLICATION_STATE_FILE, load_core_hard_state, save_core_hard_state
from node.storage.dirlock import LOCK_FILE_NAME, lock_data_dir
from node.storage.identity import load_or_create_identity
from node.storage.log import LOG_DIR_NAME, DurableLog
from node.storage.sqlite import DB_FILE_NAME

OLD_CLUSTER = "0123456789abcdef0123456789abcdef"
LAST, APPLIED = 9, 6


class _Ops:
    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn

    def internal(self, sql: str, params: tuple = ()) -> list[tuple]:
        return list(self.conn.execute(sql, params))


def make_data_dir(path: Path, *, last: int = LAST, applied: int = APPLIED) -> str:
    """A stopped voter of a 3-voter cluster in epoch 2: entries 1..last, applied up to ``applied``."""
    me = load_or_create_identity(path)
    three = Config(frozenset({me, "peer-b", "peer-c"}))
    entries = [Entry(0, 1, Kind.CONFIG, three.encode())]
    entries += [Entry(1 if i < 4 else 2, i, Kind.COMMAND, b"cmd-%d" % i) for i in range(2, last + 1)]
    log = DurableLog.open(path / LOG_DIR_NAME)
    try:
        log.append([to_log_entry(e) for e in entries])
        log.sync()
    finally:
        log.close()
    save_core_hard_state(path, HardState(2, "peer-c", ((1, three),), OLD_CLUSTER), me)
    conn = apsw.Connection(str(path / DB_FILE_NAME))
    try:
        ops = _Ops(conn)
        statemachine.ensure_schema(ops)
        statemachine.set_applied(ops, applied)
    finally:
        conn.close()
    return me


def read_log(path: Path) -> list[Entry]:
    log = DurableLog.open(path / LOG_DIR_NAME)
    try:
        return [from_log_entry(e) for e in log.read(log.first_index, 1 << 20)]
    finally:
        log.close()


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file's bytes (the lock file's pid line aside), to prove a run changed nothing."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE_NAME
    }


def run(path: Path, *, confirmed: bool) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = recover(path, confirmed=confirmed, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def restored(path: Path, me: str) -> machine.State:
    """What a node start makes of the directory (the Replicator's _start_state, without the actor)."""
    hard = load_core_hard_state(path, me)
    assert hard is not None
    entries = read_log(path)
    base = LogId(entries[APPLIED - 1].epoch, APPLIED)
    return machine.restore(me, hard, base, tuple(entries[APPLIED:]), APPLIED)


def test_without_the_confirmation_flag_it_prints_the_plan_changes_nothing_and_exits_2(tmp_path):
    make_data_dir(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run(tmp_path, confirmed=False)
    assert code == EXIT_USAGE, err
    assert "Dry run: nothing was changed" in out and CONFIRM_FLAG in out
    assert f"last entry epoch 2, index {LAST}" in out and f"applied:  index {APPLIED}" in out
    assert f"CONFIG entry at index {LAST + 1}, epoch 3" in out
    assert "LOST" in out and "EMPTY DATA_DIR" in out
    assert snapshot(tmp_path) == before


def test_confirmed_it_makes_the_node_the_only_voter_of_a_new_cluster_keeping_every_entry(tmp_path):
    me = make_data_dir(tmp_path)
    old_entries = read_log(tmp_path)
    code, out, err = run(tmp_path, confirmed=True)
    assert code == EXIT_OK, err
    hard = load_core_hard_state(tmp_path, me)
    assert hard is not None
    assert hard.cluster.startswith(recovery.RECOVERED_PREFIX) and hard.cluster in out
    assert (hard.epoch, hard.promised_to) == (3, me)
    mine = Config(frozenset({me}))
    assert hard.configs[-1] == (LAST + 1, mine)
    entries = read_log(tmp_path)
    assert entries[:-1] == old_entries  # nothing of the old log is lost or changed
    assert entries[-1] == Entry(3, LAST + 1, Kind.CONFIG, mine.encode())
    assert f"entries {APPLIED + 1}..{LAST} are in the log but not applied here" in out
    # The next start: sole voter, leads alone, commits everything the log holds.
    state = restored(tmp_path, me)
    assert state.config == mine
    state, ready = machine.step(state, ViewChanged({me: 1}), 0.0)
    assert state.writable and [e.index for e in ready.apply] == list(range(APPLIED + 1, LAST + 3))


def test_a_rerun_after_a_complete_recovery_changes_nothing(tmp_path):
    make_data_dir(tmp_path)
    assert run(tmp_path, confirmed=True)[0] == EXIT_OK
    before = snapshot(tmp_path)
    for confirmed in (False, True):
        code, out, _ = run(tmp_path, confirmed=confirmed)
        assert code == EXIT_OK and "Nothing to do" in out
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("failing", ["save_core_hard_state", "append", "sync"])
def test_a_run_that_fails_at_any_write_is_completed_by_a_rerun(tmp_path, monkeypatch, failing):
    """A crash (here: an I/O error) at each durable step; the re-run ends with the same kind of result as an
    uninterrupted run: sole voter of a recovered cluster, old log intact, the CONFIG entry once."""
    me = make_data_dir(tmp_path)
    old_entries = read_log(tmp_path)
    import node.recover as command

    def boom(*args, **kwargs):
        raise OSError(5, "injected I/O error")

    with monkeypatch.context() as m:
        if failing == "save_core_hard_state":
            m.setattr(command, "save_core_hard_state", boom)
        else:
            m.setattr(DurableLog, failing, boom)
        code, _, err = run(tmp_path, confirmed=True)
    assert code == EXIT_FAILED and "injected I/O error" in err
    first_hard = load_core_hard_state(tmp_path, me)
    code, out, err = run(tmp_path, confirmed=True)
    assert code == EXIT_OK, err
    if failing == "append":
        assert "was interrupted" in out  # the hard state was written: the re-run only appends the entry
    if failing == "sync":
        # The entry may have reached the disk anyway (here the page cache survives): finish or nothing to do.
        assert "was interrupted" in out or "Nothing to do" in out
    if failing != "save_core_hard_state":
        assert load_core_hard_state(tmp_path, me) == first_hard  # the same cluster name: not a new recovery
    entries = read_log(tmp_path)
    assert entries[:LAST] == old_entries and len(entries) == LAST + 1
    assert restored(tmp_path, me).config == Config(frozenset({me}))
    assert "Nothing to do" in run(tmp_path, confirmed=True)[1]


def test_refused_while_another_process_holds_the_data_dir(tmp_path):
    make_data_dir(tmp_path)
    before = snapshot(tmp_path)
    with lock_data_dir(tmp_path):
        code, _, err = run(tmp_path, confirmed=True)
    assert code == EXIT_USAGE and "in use by process" in err
    assert snapshot(tmp_path) == before
    assert run(tmp_path, confirmed=True)[0] == EXIT_OK  # released: it runs


def test_a_directory_that_is_not_a_replicated_nodes_is_refused_and_left_alone(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(empty, confirmed=True)
    assert code == EXIT_USAGE and "no node identity" in err and list(empty.iterdir()) == []
    assert run(tmp_path / "missing", confirmed=True)[0] == EXIT_USAGE
    unreplicated = tmp_path / "off"
    make_data_dir(unreplicated)
    (unreplicated / REPLICATION_STATE_FILE).unlink()
    code, _, err = run(unreplicated, confirmed=True)
    assert code == EXIT_USAGE and "no replication state" in err


def test_a_hard_state_written_by_another_node_is_an_error(tmp_path):
    make_data_dir(tmp_path)
    save_core_hard_state(tmp_path, HardState(2, None, ((0, Config()),), OLD_CLUSTER), "someone-else")
    code, _, err = run(tmp_path, confirmed=True)
    assert code == EXIT_FAILED and "belongs to node someone-else" in err


def test_the_command_line_needs_the_flag_and_a_data_dir(tmp_path, monkeypatch, capsys):
    make_data_dir(tmp_path)
    monkeypatch.delenv("DATA_DIR", raising=False)
    assert main(["recover"]) == EXIT_USAGE
    assert "--data-dir" in capsys.readouterr().err
    assert main(["recover", "--data-dir", str(tmp_path)]) == EXIT_USAGE
    assert "Dry run" in capsys.readouterr().out
    monkeypatch.setenv("DATA_DIR", str(tmp_path))  # as in the image (DATA_DIR=/data)
    assert main(["recover", CONFIRM_FLAG]) == EXIT_OK
    assert "Recovered:" in capsys.readouterr().out


def test_python_dash_m_node_recover_runs_as_a_process(tmp_path):
    """The documented command line, end to end (a process of its own, as an operator runs it)."""
    make_data_dir(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "node", "recover", "--data-dir", str(tmp_path), CONFIRM_FLAG],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == EXIT_OK, done.stderr
    assert "Recovered:" in done.stdout and "JWT" not in done.stdout + done.stderr


def test_a_dry_run_reads_a_databases_wal_without_checkpointing_it(tmp_path):
    """A node killed with its applied index still in the WAL: the dry run reports that index and leaves the
    database file and its WAL byte for byte as they were."""
    make_data_dir(tmp_path)
    (tmp_path / DB_FILE_NAME).unlink()
    writer = (
        "import apsw, os, sys\n"
        "from node.storage import statemachine\n"
        "class Ops:\n"
        "    def __init__(self, c): self.c = c\n"
        "    def internal(self, sql, params=()): return list(self.c.execute(sql, params))\n"
        "c = apsw.Connection(sys.argv[1]); c.execute('PRAGMA journal_mode=WAL')\n"
        "ops = Ops(c); statemachine.ensure_schema(ops); statemachine.set_applied(ops, 8)\n"
        "os._exit(0)  # no close: no checkpoint\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(tmp_path / DB_FILE_NAME)], check=True, timeout=60)
    wal = tmp_path / (DB_FILE_NAME + "-wal")
    assert wal.stat().st_size > 0
    before = {name: (tmp_path / name).read_bytes() for name in (DB_FILE_NAME, wal.name)}
    code, out, _ = run(tmp_path, confirmed=False)
    assert code == EXIT_USAGE and "database applied:  index 8" in out
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_refused_when_run_as_another_user_than_the_data_dirs_owner(tmp_path, monkeypatch):
    """Its files would be that user's, mode 0600: the node, running as the owner, could not read them."""
    import node.recover as command

    make_data_dir(tmp_path)
    before = snapshot(tmp_path)
    owner = tmp_path.stat().st_uid
    monkeypatch.setattr(command.os, "geteuid", lambda: owner + 1)
    code, _, err = run(tmp_path, confirmed=True)
    assert code == EXIT_USAGE and f"uid {owner}" in err
    assert snapshot(tmp_path) == before and not (tmp_path / LOCK_FILE_NAME).exists()
