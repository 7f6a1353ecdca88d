"""A Replicator cancelled while it opens its storage (the node failed meanwhile, or stops) leaves no log open.

Before: the log and the database were opened side by side, and the log was handed to the Replicator (which
closes it) only once both were done. Cancelled after the log had opened but while the database was still
being checked (``quick_check``: about 1 s/GB), the log stayed open for the life of the process: its thread
waiting for requests, its segment files held. Harmless while a failure ended the process; a node restarted
in the same process (node.runtime.restart) would then open a second log on the same files after every such
failure. In-process: a real Replicator, Database and log in a temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.actors.replicator import Replicator
from node.core.ids import Endpoint
from node.runtime.mailbox import LatestCell
from node.storage.asynclog import AsyncLog
from node.storage.sqlite import Database, Limits
from tests.replication.test_start_quarantine import RecordingLog
from tests.support.wait import until

BOUND_S = 20.0  # liveness bound


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _log_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "durable-log"]


def _connection_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("sqlite-writer", "sqlite-reader-"))]


async def _start_then_cancel(data_dir: Path, *, hold_check: bool, after_log_open: bool, spins: int) -> None:
    """Start a Replicator on ``data_dir``; cancel it once its log opened (``after_log_open``), then
    ``spins`` loop rounds later; meanwhile the database's check waits (``hold_check``) until the cancel.
    Afterwards, as the node does, the database is closed; then nothing of it may remain."""
    log = RecordingLog()
    database = Database(data_dir, limits=Limits(), queue_size=64, log=log, quarantine_corrupt=False)
    replicator = Replicator(
        me=Endpoint("127.0.0.1", 9), data_dir=data_dir, database=database, views=LatestCell(),
        secret="s" * 32, formation_window_s=0.0, log=log,
    )  # fmt: skip
    gate = threading.Event()
    log_opened = asyncio.Event()
    check = Database._open_and_check
    start = AsyncLog.start

    def held_check(self: Database) -> object:
        gate.wait(BOUND_S)  # the check of a large file, still running when the node fails
        return check(self)

    async def start_and_say(self: AsyncLog) -> None:
        await start(self)
        log_opened.set()

    stop = asyncio.Event()
    with (
        mock.patch.object(Database, "_open_and_check", held_check if hold_check else check),
        mock.patch.object(AsyncLog, "start", start_and_say),
    ):
        await database.prepare()
        replicator.begin(1)
        task = asyncio.create_task(replicator.run(stop))
        try:
            if after_log_open:
                async with asyncio.timeout(BOUND_S):
                    await log_opened.wait()
            for _ in range(spins):
                await asyncio.sleep(0)
            task.cancel()
        finally:
            gate.set()
            async with asyncio.timeout(BOUND_S):
                await asyncio.gather(task, return_exceptions=True)
                await database.close()  # the node's data service does this after the Replicator


async def _nothing_left(base_fds: int) -> None:
    await until(lambda: not _log_threads(), "the log thread to end", BOUND_S, 0.01)
    await until(lambda: not _connection_threads(), "the database threads to end", BOUND_S, 0.01)
    await until(lambda: _fds() <= base_fds, f"file descriptors back to {base_fds}", BOUND_S, 0.01)


async def test_cancelled_while_the_database_is_checked_the_opened_log_is_closed(tmp_path):
    base_fds = _fds()
    await _start_then_cancel(tmp_path / "data", hold_check=True, after_log_open=True, spins=0)
    await _nothing_left(base_fds)
    # And the DATA_DIR opens again in this process, as a restarted node's would.
    await _start_then_cancel(tmp_path / "data", hold_check=False, after_log_open=True, spins=50)
    await _nothing_left(base_fds)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hold_check=st.booleans(), after_log_open=st.booleans(), spins=st.integers(min_value=0, max_value=300))
def test_cancelled_at_any_point_of_its_start_a_replicator_leaves_nothing_open(
    tmp_path_factory, hold_check, after_log_open, spins
):
    data_dir = tmp_path_factory.mktemp("data")

    async def scenario() -> None:
        base_fds = _fds()
        await _start_then_cancel(data_dir, hold_check=hold_check, after_log_open=after_log_open, spins=spins)
        await _nothing_left(base_fds)

    asyncio.run(scenario())
