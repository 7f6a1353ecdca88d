"""Replication's part of /readyz (``Replication.readiness_problem``) on the real method, with the replicator
in each state that matters. Regression: a node that had just elected itself said ready while its epoch's
first entry was not committed yet, and the first write sent on that word got 503 not_writable."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from node.replication.wiring import Replication


class FakeReplicator:
    def __init__(
        self, *, started=True, leader=False, writable=False, leader_known=False, log_write_problem=None,
        rejoin=None,
    ) -> None:
        self.log_write_problem = log_write_problem
        self._rejoin = rejoin
        self._status = SimpleNamespace(writable=writable) if started else None
        self._leader = leader
        self._leader_known = leader_known

    def status(self):
        return self._status

    def awaiting_rejoin(self):
        return self._rejoin

    def is_leader(self) -> bool:
        return self._leader

    def leader_endpoint(self):
        return "10.0.0.3:3000" if self._leader_known else None


def problem(need_leader: bool, **state) -> str | None:
    return Replication.readiness_problem(SimpleNamespace(replicator=FakeReplicator(**state)), need_leader)


@pytest.mark.parametrize("need_leader", [True, False])
def test_a_node_whose_data_was_quarantined_is_not_ready_until_a_cluster_takes_it_back(need_leader):
    reason = "this node's damaged data was moved to /data/quarantine; ..."
    assert problem(need_leader, rejoin=reason) == reason
    assert problem(need_leader, rejoin=reason, leader=True, writable=True) == reason


@pytest.mark.parametrize("need_leader", [True, False])
def test_a_node_still_forming_is_never_ready(need_leader):
    assert problem(need_leader, started=False) == "starting: forming or joining a cluster"


def test_a_leader_is_ready_only_once_it_takes_writes():
    assert "does not take writes" in problem(True, leader=True, writable=False)
    assert problem(True, leader=True, writable=True) is None


def test_a_follower_is_ready_when_it_knows_a_healthy_leader():
    assert problem(True, leader_known=True) is None
    assert problem(True, leader_known=False) == "has no healthy leader"


@pytest.mark.parametrize(
    "state",
    [{"leader": True}, {"leader_known": False}, {"leader": True, "writable": True}, {"leader_known": True}],
)
def test_noleader_skips_every_leader_check(state):
    assert problem(False, **state) is None


def test_a_node_whose_log_cannot_be_written_is_not_ready_for_writes_but_is_for_level_none_reads():
    failing = {"leader_known": True, "log_write_problem": "log write failed: disk full"}
    assert problem(True, **failing) == "log write failed: disk full"
    assert problem(True, **{**failing, "leader": True, "writable": True}) == "log write failed: disk full"
    assert problem(False, **failing) is None
