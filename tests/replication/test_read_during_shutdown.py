"""A weak read that reaches a node with no leader to ask is refused with 503 either way; while the node is
shutting down the reason must say so (``unavailable``: retry elsewhere), not ``not_leader``. Found by the
shutdown-with-a-backlog test once replication became the default."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import errors
from node.core.sqlreq import DbRequest, Flags, Level, Statement
from node.replication.service import ReplicatedDataService


class _Db:
    data_dir = Path(".")
    sqlite_version = "3.45.0"
    is_open = True

    async def query(self, request, *, client=""):
        return ["served"]


class _Replicator:
    def __init__(self, leader: bool, stopping: bool) -> None:
        self._leader, self.stopping = leader, stopping
        self.applied_index = 0

    def is_leader(self) -> bool:
        return self._leader

    def awaiting_rejoin(self) -> str | None:
        return None

    def status(self):
        return None

    def _url(self, leader):
        return None


READ = DbRequest((Statement("SELECT 1"),), Flags())


async def _read(leader: bool, stopping: bool, level: Level):
    service = ReplicatedDataService(_Db(), _Replicator(leader, stopping))  # type: ignore[arg-type]
    return await service.read(READ, level, "client")


async def test_a_weak_read_on_a_stopping_node_is_unavailable_not_not_leader():
    with pytest.raises(errors.NodeError) as caught:
        await _read(leader=False, stopping=True, level=Level.WEAK)
    assert caught.value.code == "unavailable" and "shutting down" in str(caught.value)
    with pytest.raises(errors.NotLeader):
        await _read(leader=False, stopping=False, level=Level.WEAK)


@given(st.booleans(), st.booleans(), st.sampled_from([Level.NONE, Level.WEAK, Level.AUTO]))
async def test_the_refusal_names_the_real_reason_and_a_served_read_is_served(leader, stopping, level):
    try:
        assert await _read(leader, stopping, level) == ["served"]
        assert leader or level is Level.NONE
    except errors.NodeError as e:
        assert not leader and level is not Level.NONE
        assert e.code == ("unavailable" if stopping else "not_leader")
