"""The pipelined shell (``Options.pipelined``): a leader sends its Appends while its own log write runs and
counts its own copy toward the majority only once that write is reported durable (``Persisted``).

The simulation (tests/support/repsim.py, ``pipelined=True``) queues every log write for 0-3 ticks (or a
set delay: a slow disk), sends early messages at once and everything else once the writes are durable; a
crash loses the queued writes. The invariants are checked after every step and every write, and a leader's
commit index must never pass its own durable log.
"""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from node.core.replication import machine
from node.core.replication.messages import Append, SubmitAccepted
from tests.sim.test_replication_random import TICKS, ReplicationMachine, settle_and_check_liveness
from tests.support.repsim import InvariantViolated, RepSim


@pytest.mark.parametrize("seed", range(12))
def test_random_fault_schedule_pipelined(seed):
    sim = RepSim(
        3, joiners=1 if seed % 2 else 0, seed=3000 + seed, drop=0.05, duplicate=0.05, view_lag_s=0.3,
        pipelined=True,
    )  # fmt: skip
    for _ in range(TICKS):
        sim.random_fault(p_fault=0.01)
    assert len(sim.inv.committed) > 10
    settle_and_check_liveness(sim)


def test_the_pipelined_schedules_lose_unsynced_writes():
    """Guard against a harness that never crashes a node with writes queued (what the mode is about)."""
    lost = 0
    for seed in range(4):
        sim = RepSim(3, seed=3000 + seed, drop=0.05, duplicate=0.05, view_lag_s=0.3, pipelined=True)
        for _ in range(TICKS):
            sim.random_fault(p_fault=0.01)
        lost += sim.lost_unsynced
    assert lost >= 1


def slow_leader_disk(seed: int = 7) -> tuple[RepSim, str, SubmitAccepted]:
    """A leader with one follower cut off and a disk that takes 1 s per write: its Append reaches the other
    follower, which acks at once, while its own copy is still being written."""
    sim = RepSim(3, seed=seed, pipelined=True)
    leader = sim.leader()
    cut_off = next(n for n in sorted(sim.nodes) if n != leader)
    sim.cut(cut_off, leader, both=True)
    assert sim.run_until(lambda: sim.writable() == [leader], 2), sim.describe()
    sim.write_delay_s[leader] = 1.0
    reply = sim.submit(leader, b"slow")
    assert isinstance(reply, SubmitAccepted)
    return sim, leader, reply


def test_a_leader_does_not_count_its_own_copy_before_it_is_durable():
    sim, leader, reply = slow_leader_disk()
    sim.run(0.2)  # the follower has acked long ago
    assert sim.state(leader).commit < reply.index
    assert not sim.write_committed(reply)
    sim.run(1.0)  # now the leader's write is done: leader + follower are a majority
    assert sim.write_committed(reply)


def test_a_leader_that_crashes_after_sending_but_before_its_fsync_loses_nothing_committed():
    sim, leader, reply = slow_leader_disk()
    sim.run(0.2)
    sim.crash(leader)
    assert sim.lost_unsynced >= 1
    assert len(sim.nodes[leader].durable.log) < reply.index  # its own copy never reached its disk
    settle_and_check_liveness(sim)


def test_counting_the_leaders_unsynced_copy_is_caught(monkeypatch):
    """Break the rule (count the whole log, as a non-pipelined shell may): the leader commits an entry that
    only one disk holds, and the invariant check says so."""
    original = machine._Step.advance_commit

    def counts_everything(self):
        self.durable = self.last_index
        original(self)

    monkeypatch.setattr(machine._Step, "advance_commit", counts_everything)
    with pytest.raises(InvariantViolated, match="durable on only"):
        sim, _, _ = slow_leader_disk()
        sim.run(0.2)


def test_appends_leave_before_the_leaders_own_write_is_durable():
    sim, leader, reply = slow_leader_disk()
    sent = [m for _, _, src, _, m in sim.queue if src == leader and isinstance(m, Append)]
    assert any(e.index == reply.index for m in sent for e in m.entries)
    assert len(sim.nodes[leader].durable.log) < reply.index


class PipelinedMachine(ReplicationMachine):
    """The generated fault schedules of test_replication_random, on the pipelined shell, plus a rule that
    writes to the leader and kills it before its own write can be durable."""

    def __init__(self) -> None:
        super().__init__()
        self.sim = RepSim(3, joiners=1, seed=0, drop=0.02, duplicate=0.02, pipelined=True)

    @rule(count=st.integers(1, 5), ticks=st.integers(0, 2))
    def crash_leader_before_its_fsync(self, count, ticks):
        writable = self.sim.writable()
        if not writable:
            return
        leader = writable[0]
        self.sim.write_delay_s[leader] = 0.05
        for _ in range(count):
            self.writes += 1
            self.sim.submit(leader, f"p{self.writes}".encode())
        for _ in range(ticks):
            self.sim.tick()
        if self.sim.nodes[leader].alive:
            self.sim.crash(leader)
        self.sim.write_delay_s.pop(leader, None)


PipelinedMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
test_replication_pipelined_stateful = PipelinedMachine.TestCase
