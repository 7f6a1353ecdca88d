"""The DATA_DIR lock (node.storage.dirlock): one process per data directory, never stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from node.storage.dirlock import LOCK_FILE_NAME, DataDirInUse, lock_data_dir
from tests.support.wait import wait_until

HOLD = textwrap.dedent(
    """
    import sys, pathlib, time
    from node.storage.dirlock import lock_data_dir
    lock = lock_data_dir(pathlib.Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    first = lock_data_dir(tmp_path / "data")  # created if missing
    with pytest.raises(DataDirInUse, match=f"in use by process {os.getpid()}"):
        lock_data_dir(tmp_path / "data")
    first.release()
    assert not first.held
    with lock_data_dir(tmp_path / "data") as again:
        assert again.held


def test_the_lock_of_a_killed_process_is_free_at_once(tmp_path):
    """flock, not a pid file: SIGKILL leaves nothing for an operator to clean up."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DataDirInUse, match=f"process {holder.pid}"):
            lock_data_dir(tmp_path)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        lock = wait_until(lambda: _try_lock(tmp_path), 5, what="the lock to be free after SIGKILL")
        lock.release()
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_without_create_a_missing_directory_is_an_error_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot lock DATA_DIR"):
        lock_data_dir(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_a_data_dir_that_cannot_be_created_is_named_in_the_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError, match=r"cannot lock DATA_DIR .*file/data"):
        lock_data_dir(tmp_path / "file" / "data")


def test_a_leftover_lock_file_with_garbage_is_taken_over_and_names_its_new_holder(tmp_path):
    (tmp_path / LOCK_FILE_NAME).write_bytes(b"\x00\xffnot a pid, and longer than any pid line would be")
    with lock_data_dir(tmp_path):
        assert (tmp_path / LOCK_FILE_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(DataDirInUse, match=f"process {os.getpid()}"):
            lock_data_dir(tmp_path)


def _try_lock(path):
    try:
        return lock_data_dir(path)
    except DataDirInUse:
        return None
