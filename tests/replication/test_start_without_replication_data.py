"""A DATA_DIR written with REPLICATION=off, started with replication (the default since it became one).

The node's own log (REPLICATION=off) carries every write as an entry of epoch 0 and no replication hard
state. Started with REPLICATION=on, such a directory used to pass as a replicated history: the node came up
as a follower of epoch 0 that follows no one and never accepts a write, with nothing in its log to say why.
It must refuse to start, naming the way out, whatever that history holds (and whether its log survived);
an empty directory must still form a cluster.

In-process (a Replicator on a real Database and log in a temporary directory), so hypothesis can try many
histories; tests/integration/test_default_replication.py shows the same with real processes.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.actors.replicator import Replicator
from node.core.ids import Endpoint
from node.core.sqlreq import Statement
from node.runtime.mailbox import LatestCell
from node.service import LogBackedDataService, WriteRequest
from node.storage.log import LOG_DIR_NAME
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import QuietLog

REFUSAL = "written without replication"
START_BOUND_S = 20.0  # liveness bound: the replicator decides (refuses or forms) within it


async def _write_without_replication(data_dir: Path, values: list[str]) -> None:
    database = Database(data_dir, limits=Limits(), queue_size=16, log=QuietLog())
    await database.prepare()
    service = LogBackedDataService(database, log_reserve_bytes=0, emit=QuietLog())  # own log: REPLICATION=off
    await service.start()
    try:
        for value in values:
            statements = (
                Statement("CREATE TABLE IF NOT EXISTS t (v TEXT)"),
                Statement("INSERT INTO t(v) VALUES(?)", (value,)),
            )
            await service.submit(WriteRequest(statements), "test")
    finally:
        await service.close()


async def _start_replicated(data_dir: Path) -> tuple[BaseException | None, bool]:
    """(what the replicator raised, whether it had a core state) once it refused or formed a cluster."""
    database = Database(data_dir, limits=Limits(), queue_size=16, log=QuietLog())
    await database.prepare()
    service = LogBackedDataService(database, log_reserve_bytes=0, emit=QuietLog(), own_log=False)
    await service.start()
    replicator = Replicator(
        me=Endpoint("127.0.0.1", 9),
        data_dir=data_dir,
        database=database,
        views=LatestCell(),
        secret="s" * 32,
        formation_window_s=0.0,
        log=QuietLog(),
    )
    replicator.begin(1)
    stop = asyncio.Event()
    task = asyncio.create_task(replicator.run(stop))
    ready = asyncio.create_task(replicator.ready.wait())  # set once a core state exists
    try:
        await asyncio.wait([task, ready], timeout=START_BOUND_S, return_when=asyncio.FIRST_COMPLETED)
        formed = replicator.status() is not None
    finally:
        ready.cancel()
        stop.set()
        async with asyncio.timeout(START_BOUND_S):
            results = await asyncio.gather(task, return_exceptions=True)
        await service.close()
    error = results[0] if isinstance(results[0], BaseException) else None
    return error, formed


def _mentions_refusal(error: BaseException | None) -> bool:
    if error is None:
        return False
    if isinstance(error, BaseExceptionGroup):
        return any(_mentions_refusal(e) for e in error.exceptions)
    return REFUSAL in str(error)


def _scenario(values: list[str], lose_log: bool) -> tuple[BaseException | None, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        asyncio.run(_write_without_replication(data_dir, values))
        if lose_log:
            shutil.rmtree(data_dir / LOG_DIR_NAME, ignore_errors=True)
        return asyncio.run(_start_replicated(data_dir))


def test_a_node_written_without_replication_refuses_to_start_replicated():
    """Regression: one write with REPLICATION=off, then the default; it used to become a stuck follower."""
    error, formed = _scenario(["a"], lose_log=False)
    assert _mentions_refusal(error), error
    assert not formed


def test_an_empty_data_dir_still_forms_a_cluster_of_one():
    error, formed = _scenario([], lose_log=False)
    assert error is None and formed


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(values=st.lists(st.text(max_size=20), max_size=5), lose_log=st.booleans())
def test_any_history_without_replication_is_refused_and_only_an_empty_one_forms(values, lose_log):
    error, formed = _scenario(values, lose_log)
    if values:
        assert _mentions_refusal(error), (values, lose_log, error)
        assert not formed
    else:
        assert error is None and formed, (lose_log, error)
