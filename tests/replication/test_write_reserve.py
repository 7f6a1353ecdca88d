"""With REPLICATION=on the Replicator's log keeps no reserve (a failed append stops the node), so the data
service refuses writes with 507 while DATA_DIR has less than LOG_RESERVE_BYTES free: nothing is stamped,
nothing reaches the log."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import errors
from node.core.sqlreq import Statement
from node.replication import service as rservice
from node.replication.service import ReplicatedDataService
from node.service import WriteRequest


class _Db:
    data_dir = Path(".")
    sqlite_version = "3.45.0"  # stamped into each command (any value: the fake replicator never applies)
    is_open = True  # checked and serving: the data service asks before anything else


class _Replicator:
    def __init__(self) -> None:
        self.submitted = 0

    def awaiting_rejoin(self) -> str | None:
        return None

    async def submit(self, payload: bytes, timeout_s: float, command=None):
        self.submitted += 1
        raise errors.Unavailable("stop here: the write got past the reserve check")


WRITE = WriteRequest((Statement("INSERT INTO t VALUES (1)"),))


async def _outcome(free: int, reserve: int) -> tuple[type[BaseException], int]:
    replicator = _Replicator()
    svc = ReplicatedDataService(_Db(), replicator, log_reserve_bytes=reserve)  # type: ignore[arg-type]
    original = rservice.free_bytes
    rservice.free_bytes = lambda path: free
    try:
        with pytest.raises(errors.NodeError) as caught:
            await svc.submit(WRITE, "client")
    finally:
        rservice.free_bytes = original
    return type(caught.value), replicator.submitted


async def test_below_the_reserve_a_write_is_507_and_never_submitted():
    kind, submitted = await _outcome(free=10, reserve=1000)
    assert kind is errors.InsufficientStorage and submitted == 0


async def test_with_room_or_without_a_reserve_the_write_goes_on():
    assert await _outcome(free=1000, reserve=1000) == (errors.Unavailable, 1)
    assert await _outcome(free=0, reserve=0) == (errors.Unavailable, 1)


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 40))
async def test_refused_exactly_when_a_set_reserve_is_not_free(free, reserve):
    kind, submitted = await _outcome(free, reserve)
    refused = reserve > 0 and free < reserve
    assert (kind is errors.InsufficientStorage) == refused and submitted == (0 if refused else 1)
