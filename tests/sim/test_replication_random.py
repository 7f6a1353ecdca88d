"""Random fault schedules (seeded) and a hypothesis stateful test over the replication simulation.

The simulation checks the safety invariants after every Ready (tests/support/repsim.py ``Invariants``);
these tests add liveness at the end of each schedule: once every node is up and every link healed, one
leader is writable within a few seconds, every log converges, and every acknowledged write is applied on
every node. The last tests show that each invariant check can fail, and that the simulation catches a
deliberately broken rule of the core.
"""

import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from node.core.replication import machine
from node.core.replication.messages import Entry, Kind, SubmitAccepted
from tests.support.repsim import Invariants, InvariantViolated, RepSim

SEEDS = range(24)
TICKS = 1500


def settle_and_check_liveness(sim: RepSim) -> None:
    sim.repair()

    def converged() -> bool:
        alive = [sim.state(n) for n in sim.alive()]
        leaders = [s for s in alive if s.writable]
        return (
            len(leaders) == 1
            and all(s.commit == s.last.index == leaders[0].last.index for s in alive)
            and all(s.config == leaders[0].config for s in alive)
            # and every node applied it (a pipelined shell applies once its writes are durable)
            and all(len(sim.nodes[n].durable.applied) == sim.state(n).commit for n in sim.alive())
        )

    # A leader commits its EpochStart at once; a last write makes every follower learn the final commit.
    assert sim.run_until(lambda: len(sim.writable()) == 1, 10), sim.describe()
    sim.submit(sim.writable()[0], b"final")
    assert sim.run_until(converged, 10), sim.describe()
    acknowledged = [r for r in sim.accepted.values() if sim.write_committed(r)]
    logs = {tuple(sim.nodes[n].durable.applied) for n in sim.nodes}
    assert len(logs) == 1, "applied histories differ"
    applied = {(e.epoch, e.index) for e in next(iter(logs))}
    assert all((r.epoch, r.index) in applied for r in acknowledged)
    foreign = [f for n in sim.nodes.values() for _, f, _ in n.facts if f == "foreign_history"]
    assert foreign == []  # one cluster: the foreign-history guard must never fire


@pytest.mark.parametrize("seed", SEEDS)
def test_random_fault_schedule(seed):
    """3 voters (+ 1 joiner on odd seeds); crashes, two-way and one-way cuts, isolation, ID changes and stops,
    each repaired after 0.1-2 s; views lag ~0.3 s behind the links; 5 % drops and 5 % duplicates; delays of
    1-4 ms reorder messages; a fifth of the 5 ms ticks carry a batch of writes."""
    sim = RepSim(3, joiners=1 if seed % 2 else 0, seed=seed, drop=0.05, duplicate=0.05, view_lag_s=0.3)
    for _ in range(TICKS):
        sim.random_fault(p_fault=0.01)
    assert len(sim.inv.committed) > 1  # something was committed under faults
    settle_and_check_liveness(sim)


@pytest.mark.parametrize("seed", range(6))
def test_random_schedule_with_small_memory_window_and_five_nodes(seed):
    """Catch-up through ReadLog: only 3 applied entries are kept in memory, batches of 2."""
    options = machine.Options(keep_applied=3, max_batch_entries=2, max_inflight=2)
    sim = RepSim(
        5, seed=1000 + seed, options=options, drop=0.1, duplicate=0.1, delay_s=(0.001, 0.02), view_lag_s=0.3
    )
    for _ in range(TICKS):
        sim.random_fault(p_fault=0.02)
    settle_and_check_liveness(sim)
    assert all(len(sim.state(n).log) <= 3 + 2 + 1 for n in sim.nodes)


@pytest.mark.parametrize("seed", range(6))
def test_random_schedule_with_group_commit(seed):
    """The shell may carry out a node's Readys of one tick together: all writes, then all sends. The
    core's commit counting must stay safe when its own appends become durable only at the group's end."""
    sim = RepSim(3, joiners=1, seed=2000 + seed, drop=0.05, duplicate=0.05, view_lag_s=0.3, group_commit=True)
    for _ in range(TICKS):
        sim.random_fault(p_fault=0.01)
    assert len(sim.inv.committed) > 10
    settle_and_check_liveness(sim)


def test_simulation_speed_is_reported(capsys):
    """Not a timing assertion: prints steps/s for the report (pytest -s shows it)."""
    sim = RepSim(3, joiners=1, seed=99, drop=0.05, duplicate=0.05, view_lag_s=0.3)
    started = time.perf_counter()
    for _ in range(2000):
        sim.random_fault(p_fault=0.01)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(
            f"\nrepsim: {sim.steps} core steps, {sim.delivered} messages in {elapsed:.2f} s "
            f"= {sim.steps / elapsed:.0f} steps/s"
        )
    assert sim.steps > 2000


# --- hypothesis: the fault schedule itself is generated and shrunk -----------------------------------------

NAMES = ["node-1", "node-2", "node-3", "node-4"]


class ReplicationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = RepSim(3, joiners=1, seed=0, drop=0.02, duplicate=0.02)
        self.writes = 0

    @rule(name=st.sampled_from(NAMES))
    def crash(self, name):
        if self.sim.nodes[name].alive:
            self.sim.crash(name)

    @rule(name=st.sampled_from(NAMES))
    def restart(self, name):
        if not self.sim.nodes[name].alive:
            self.sim.restart(name)

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES), both=st.booleans())
    def cut(self, a, b, both):
        if a != b:
            self.sim.cut(a, b, both=both)

    @rule()
    def heal(self):
        self.sim.heal()

    @rule(name=st.sampled_from(NAMES), node_id=st.integers(1, 8))
    def change_id(self, name, node_id):
        self.sim.change_id(name, node_id)

    @rule(name=st.sampled_from(NAMES), count=st.integers(1, 5))
    def submit(self, name, count):
        if self.sim.nodes[name].alive:
            for _ in range(count):
                self.writes += 1
                self.sim.submit(name, f"h{self.writes}".encode())

    @rule(seconds=st.sampled_from([0.01, 0.05, 0.2, 0.6, 1.5]))
    def run(self, seconds):
        self.sim.run(seconds)

    @precondition(lambda self: len(self.sim.alive()) >= 3)
    @rule()
    def minority_leader_cannot_write(self):
        """Whoever is writable can reach a majority of voters by its view: never a cut-off node."""
        for name in self.sim.writable():
            state = self.sim.state(name)
            reachable = [v for v in state.config.voters if v == name or v in state.view]
            assert len(reachable) >= state.config.quorum

    @invariant()
    def at_most_one_writable_per_epoch(self):
        epochs = [self.sim.state(n).hard.epoch for n in self.sim.writable()]
        assert len(epochs) == len(set(epochs))

    def teardown(self):
        settle_and_check_liveness(self.sim)


ReplicationMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
test_replication_stateful = ReplicationMachine.TestCase


# --- each invariant check can fail ------------------------------------------------------------------------


def cmd(epoch: int, index: int, payload: bytes = b"x") -> Entry:
    return Entry(epoch, index, Kind.COMMAND, payload)


def test_check_two_leaders_committing_in_one_epoch_fails():
    inv = Invariants()
    inv.record_commit("a", [cmd(1, 1)], 1, leader_epoch=1)
    with pytest.raises(InvariantViolated, match="two leaders committed in epoch 1"):
        inv.record_commit("b", [cmd(1, 1)], 1, leader_epoch=1)


def test_check_committed_entry_changed_fails():
    inv = Invariants()
    inv.record_commit("a", [cmd(1, 1, b"x")], 1, leader_epoch=1)
    with pytest.raises(InvariantViolated, match="committed entry 1 changed"):
        inv.record_commit("b", [cmd(2, 1, b"y")], 1, leader_epoch=None)


def test_check_truncating_below_commit_fails():
    inv = Invariants()
    inv.record_commit("a", [cmd(1, 1), cmd(1, 2)], 2, leader_epoch=None)
    with pytest.raises(InvariantViolated, match="truncates from 2"):
        inv.check_truncate("a", 2)
    inv.check_truncate("a", 3)


def test_check_writable_without_committed_entries_fails():
    inv = Invariants()
    inv.record_commit("a", [cmd(1, 1), cmd(1, 2)], 2, leader_epoch=1)
    with pytest.raises(InvariantViolated, match="without committed entry 2"):
        inv.check_writable("b", [cmd(1, 1)])
    with pytest.raises(InvariantViolated, match="without committed entry 2"):
        inv.check_writable("b", [cmd(1, 1), cmd(2, 2)])
    inv.check_writable("b", [cmd(1, 1), cmd(1, 2), cmd(3, 3)])


def test_check_applied_must_equal_committed_prefix_fails():
    inv = Invariants()
    inv.record_commit("a", [cmd(1, 1), cmd(1, 2)], 2, leader_epoch=1)
    with pytest.raises(InvariantViolated, match="not the committed entry"):
        inv.check_applied("b", [cmd(1, 1), cmd(2, 2)], 0)
    with pytest.raises(InvariantViolated, match="applied index 2 at position 1"):
        inv.check_applied("b", [cmd(1, 2)], 0)
    inv.check_applied("b", [cmd(1, 1), cmd(1, 2)], 0)


def test_check_send_before_persist_fails():
    from node.core.replication.messages import Append, AppendAck, HardState, LogId, Promise, Send

    inv = Invariants()
    with pytest.raises(InvariantViolated, match="Promise of epoch 2, durable 1"):
        inv.check_sends("a", HardState(epoch=1), [], [Send("b", Promise(2, LogId(0, 0)))])
    with pytest.raises(InvariantViolated, match="Append of epoch 1, durable 0"):
        inv.check_sends("a", None, [], [Send("b", Append(1, LogId(0, 0), (), 0, 0))])
    with pytest.raises(InvariantViolated, match="acknowledged 2 with 1 entries"):
        inv.check_sends("a", HardState(epoch=1), [cmd(1, 1)], [Send("b", AppendAck(1, 2, 0))])
    inv.check_sends("a", HardState(epoch=2), [cmd(1, 1)], [Send("b", AppendAck(2, 1, 0))])


# --- the simulation catches a broken rule -----------------------------------------------------------------


def stale_leader_after_broken_view_change(monkeypatch) -> RepSim:
    """Break the view change (the new leader keeps its own log), then make the stale highest-ID node lead
    with node-1, which holds three writes that node-3 never saw."""
    monkeypatch.setattr(machine, "pick_donor", lambda me, mine, promises: (me, mine))
    sim = RepSim(3, seed=4)
    sim.leader()
    sim.crash("node-3")
    sim.leader(timeout_s=3)
    acked = [sim.submit("node-2", f"c{i}".encode()) for i in range(3)]
    assert sim.run_until(lambda: all(sim.write_committed(r) for r in acked), 2)
    sim.run(0.2)  # node-1 learns the commit index
    sim.crash("node-2")
    sim.restart("node-3")
    return sim


def test_a_leader_that_ignores_the_most_advanced_promiser_is_caught(monkeypatch):
    """With the followers' foreign-history guard also removed, node-3 overwrites committed entries: the
    invariant check says so."""
    monkeypatch.setattr(machine._Step, "committed_conflict", lambda self, entries: None)
    sim = stale_leader_after_broken_view_change(monkeypatch)
    with pytest.raises(InvariantViolated, match="committed entry 3 changed"):
        sim.run(3)


def test_the_foreign_history_guard_alone_stops_that_rollback(monkeypatch):
    """Defence in depth: with only the view change broken, node-1 refuses entries that contradict what it
    knows is committed, so the cluster stalls instead of losing writes."""
    sim = stale_leader_after_broken_view_change(monkeypatch)
    sim.run(3)
    assert "foreign_history" in {f for _, f, _ in sim.nodes["node-1"].facts}
    assert sim.applied_commands("node-1") == [b"c0", b"c1", b"c2"]
    assert sim.writable() == []


def test_commit_without_a_majority_is_caught(monkeypatch):
    """Break quorum arithmetic (one vote is enough): a partition then yields two leaders that commit
    different entries at the same index."""
    monkeypatch.setattr(machine, "quorum", lambda config: 1)
    sim = RepSim(3, seed=21)
    sim.leader()
    with pytest.raises(InvariantViolated, match="two leaders committed in epoch"):
        sim.isolate("node-3")
        for i in range(50):
            for name in sim.alive():
                sim.submit(name, f"s{i}".encode())
            sim.run(0.1)
        sim.heal()
        sim.run(3)


def test_the_schedules_really_inject_faults():
    """Guard against a harness that silently stopped doing anything: count what a few schedules did (six:
    since the leader holds a log's open tail while an Append is unanswered, the first four truncate a
    divergent suffix once between them, the first six four times)."""
    events: list[str] = []
    torn = 0
    for seed in SEEDS[:6]:
        sim = RepSim(3, joiners=1 if seed % 2 else 0, seed=seed, drop=0.05, duplicate=0.05, view_lag_s=0.3)
        for _ in range(TICKS):
            sim.random_fault(p_fault=0.01)
        events += [f for n in sim.nodes.values() for _, f, _ in n.facts]
        torn += sim.torn
        assert any(isinstance(r, SubmitAccepted) for r in sim.accepted.values())
    for event in ["became_leader", "log_truncated", "handover_started", "config_proposed", "epoch_adopted"]:
        assert event in events, event
    assert events.count("log_truncated") >= 2  # divergent suffixes really were discarded
    assert torn >= 1  # and a crash between the hard-state write and the log write happened
