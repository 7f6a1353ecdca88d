"""Recovery after the loss of a majority (node.core.replication.recovery): the plan computed from the disk,
what ``restore`` and the core then make of it, and what a re-run after an interruption does."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from node.core.replication import machine, recovery
from node.core.replication.messages import (
    Append,
    Config,
    Entry,
    HardState,
    Heartbeat,
    Kind,
    LogId,
    Receive,
    Tick,
    ViewChanged,
)
from node.core.replication.recovery import Action, Refused

ME = "a"
OTHERS = ("b", "c", "d", "e")
NEW = recovery.RECOVERED_PREFIX + "f" * 32
OLD_CLUSTER = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Disk:
    """What a stopped node holds: its hard state, its whole log and the database's applied index."""

    hard: HardState
    log: tuple[Entry, ...]
    applied: int

    @property
    def last(self) -> LogId:
        return self.log[-1].id

    def restore(self, options: machine.Options | None = None) -> machine.State:
        base = LogId(self.log[self.applied - 1].epoch, self.applied)
        return machine.restore(ME, self.hard, base, self.log[self.applied :], self.applied, options)

    def plan(self, cluster: str = NEW) -> recovery.Plan:
        return recovery.plan(ME, self.hard, self.last, self.log[-1], cluster)

    def after(self, p: recovery.Plan, *, hard_written: bool = True, entry_written: bool = True) -> Disk:
        """The disk after a recover run, or after one killed between its two writes."""
        return Disk(
            p.hard if hard_written else self.hard,
            self.log + ((p.entry,) if entry_written else ()),
            self.applied,
        )


def config_of(voters, learners=()) -> Config:
    return Config(frozenset(voters), frozenset(learners))


configs = st.builds(
    config_of,
    st.sets(st.sampled_from((ME, *OTHERS)), min_size=1, max_size=5),
    st.sets(st.sampled_from(OTHERS), max_size=2),
)


@st.composite
def disks(draw) -> Disk:
    """A node's durable state after any history: a bootstrap config at 1, then entries of non-decreasing
    epochs (some CONFIG), an applied index, and a hard state consistent with them as the shell saves it
    (epoch >= the log's, the configs at or below applied plus those above, maybe a leftover config above
    the log from a crash between a hard-state write and its append)."""
    first = config_of((ME, "b", "c"))
    log = [Entry(0, 1, Kind.CONFIG, first.encode())]
    epoch = 0
    for index in range(2, draw(st.integers(1, 12)) + 1):
        epoch += draw(st.integers(0, 2))
        if draw(st.booleans()) and epoch > 0:
            log.append(Entry(epoch, index, Kind.CONFIG, draw(configs).encode()))
        else:
            log.append(Entry(epoch, index, Kind.COMMAND, b"w%d" % index))
    applied = draw(st.integers(1, len(log)))
    history = [(e.index, Config.decode(e.payload)) for e in log if e.kind is Kind.CONFIG]
    below = [c for c in history if c[0] <= applied][-1:]
    hard_configs = below + [c for c in history if c[0] > applied]
    if draw(st.booleans()):
        hard_configs.append((len(log) + 1, draw(configs)))  # crashed before that entry's append
    hard_epoch = epoch + draw(st.integers(0, 3))
    promised = draw(st.sampled_from((None, ME, "b")))
    cluster = draw(st.sampled_from(("", OLD_CLUSTER, recovery.RECOVERED_PREFIX + "1" * 32)))
    return Disk(HardState(hard_epoch, promised, tuple(hard_configs), cluster), tuple(log), applied)


def lead_alone(state: machine.State, steps: int = 5) -> tuple[machine.State, list[Entry]]:
    """Step a node that sees only itself; return its state and every entry it applied."""
    applied: list[Entry] = []
    state, ready = machine.step(state, ViewChanged({ME: 1}), 0.0)
    applied += ready.apply
    for i in range(steps):  # bounded: a sole voter leads within one step
        if state.writable:
            break
        state, ready = machine.step(state, Tick(), 0.01 * (i + 1))
        applied += ready.apply
    return state, applied


# --- the plan ---------------------------------------------------------------------------------------------


@given(disks())
def test_the_plan_makes_this_node_the_only_voter_of_a_new_cluster_in_a_new_epoch_after_its_whole_log(disk):
    p = disk.plan()
    assume(p.action is Action.RECOVER)  # (a generated "earlier recovery" is the FINISH/DONE tests' case)
    mine = Config(frozenset({ME}))
    assert p.entry == Entry(p.hard.epoch, disk.last.index + 1, Kind.CONFIG, mine.encode())
    assert p.hard.epoch == max(disk.hard.epoch, disk.last.epoch) + 1
    assert p.hard.promised_to == ME and p.hard.cluster == NEW != disk.hard.cluster
    assert p.hard.configs[-1] == (p.entry.index, mine)
    indices = [i for i, _ in p.hard.configs]
    assert indices == sorted(indices) and indices[-2] <= disk.last.index  # no leftover above the log


@given(disks())
@settings(max_examples=200)
def test_after_a_recovery_the_node_leads_alone_and_commits_every_entry_of_its_log(disk):
    """What the next start does with the recovered disk: restore -> sole voter -> leader -> every entry
    above the applied index (uncommitted before) and the CONFIG entry are committed and applied."""
    p = disk.plan()
    assume(p.action is Action.RECOVER)
    recovered = disk.after(p)
    state = recovered.restore()
    assert state.config == Config(frozenset({ME})) and state.hard.cluster == NEW
    state, applied = lead_alone(state)
    assert state.role == machine.LEADER and state.writable
    assert state.hard.epoch > p.hard.epoch
    kept = [e.id for e in recovered.log[disk.applied :]]
    assert [e.id for e in applied][: len(kept)] == kept
    assert applied[-1].kind is Kind.EPOCH_START and state.commit == p.entry.index + 1


@given(disks())
def test_a_rerun_after_a_complete_recovery_changes_nothing(disk):
    p = disk.plan()
    assume(p.action is Action.RECOVER)
    again = disk.after(p).plan(recovery.RECOVERED_PREFIX + "2" * 32)
    assert again.action is Action.DONE and again.hard == p.hard and again.entry == p.entry


@given(disks())
def test_a_run_killed_between_its_two_writes_is_finished_by_a_rerun(disk):
    p = disk.plan()
    assume(p.action is Action.RECOVER)
    half = disk.after(p, entry_written=False)
    finish = half.plan(recovery.RECOVERED_PREFIX + "3" * 32)
    assert finish.action is Action.FINISH
    assert finish.entry == p.entry and finish.hard == p.hard  # the same cluster, epoch and entry
    assert half.after(finish, hard_written=False).plan().action is Action.DONE


@given(disks())
def test_a_run_killed_between_its_two_writes_leaves_a_node_that_cannot_lead_the_old_cluster(disk):
    """The state between the two writes, if the node is started instead of re-running recover: new cluster
    name, old configuration. It cannot win alone unless it already was the only voter, and it no longer
    reads a message of the old cluster."""
    p = disk.plan()
    assume(p.action is Action.RECOVER)
    state = disk.after(p, entry_written=False).restore()
    assert state.hard.cluster == NEW
    state, _ = lead_alone(state)
    if state.config.voters != {ME}:
        assert not state.writable and state.role != machine.LEADER
    # A message of the old cluster is as good as none at all.
    foreign = Receive("b", Heartbeat(state.hard.epoch + 5, 0, 1), OLD_CLUSTER)
    heard, heard_ready = machine.step(state, foreign, 1.0)
    unheard, unheard_ready = machine.step(state, Tick(), 1.0)
    assert heard.hard == unheard.hard and heard.role == unheard.role and heard.leader == unheard.leader
    assert heard_ready.messages == unheard_ready.messages and heard_ready.append == unheard_ready.append


def test_recovery_from_a_node_that_was_a_follower_of_a_lost_majority():
    """Regression (the documented scenario): 3 voters a, b, c; b and c are gone for good; a holds committed
    entries up to 4 and uncommitted ones up to 6 of epoch 2."""
    three = config_of((ME, "b", "c"))
    log = (Entry(0, 1, Kind.CONFIG, three.encode()), *(Entry(2, i, Kind.COMMAND, b"x") for i in range(2, 7)))
    disk = Disk(HardState(2, "c", ((1, three),), OLD_CLUSTER), log, applied=4)
    stuck, _ = lead_alone(disk.restore())
    assert not stuck.writable  # the reason for the command: a majority of {a, b, c} is gone
    p = disk.plan()
    assert (p.action, p.entry.id, p.hard.epoch, p.hard.promised_to) == (Action.RECOVER, LogId(3, 7), 3, ME)
    assert p.old_voters == {ME, "b", "c"}
    state, applied = lead_alone(disk.after(p).restore())
    assert state.writable and [e.index for e in applied] == [5, 6, 7, 8]


def test_an_old_clusters_leader_is_not_heard_by_the_recovered_node():
    three = config_of((ME, "b", "c"))
    disk = Disk(HardState(1, None, ((1, three),), OLD_CLUSTER), (Entry(0, 1, Kind.CONFIG, three.encode()),), 1)
    state, _ = lead_alone(disk.after(disk.plan()).restore())
    epoch = state.hard.epoch
    append = Append(epoch + 10, LogId(0, 1), (Entry(epoch + 10, 2, Kind.COMMAND, b"old"),), 2, 1)
    after, ready = machine.step(state, Receive("c", append, OLD_CLUSTER), 1.0)
    assert after.role == machine.LEADER and after.hard.epoch == epoch and ready.append == ()


# --- refusals ----------------------------------------------------------------------------------------------


def test_no_hard_state_or_an_empty_log_is_refused():
    one = Entry(0, 1, Kind.CONFIG, config_of((ME,)).encode())
    with pytest.raises(Refused, match="no replication state"):
        recovery.plan(ME, None, LogId(0, 1), one, NEW)
    with pytest.raises(Refused, match="log is empty"):
        recovery.plan(ME, HardState(3, ME, ((0, Config()),), OLD_CLUSTER), LogId(0, 0), None, NEW)


def test_a_log_compacted_up_to_its_last_entry_is_recovered_after_that_entry():
    """The log holds no entry (a snapshot covers everything) but starts after index 7 of epoch 4."""
    hard = HardState(4, None, ((5, config_of((ME, "b", "c"))),), OLD_CLUSTER)
    p = recovery.plan(ME, hard, LogId(4, 7), None, NEW)
    assert p.action is Action.RECOVER and p.entry.id == LogId(5, 8)
    assert recovery.plan(ME, p.hard, LogId(5, 8), p.entry, NEW).action is Action.DONE
    assert recovery.plan(ME, p.hard, LogId(4, 7), None, NEW).action is Action.FINISH


@given(st.text(max_size=20))
def test_a_new_cluster_name_must_carry_the_prefix(name):
    assume(not name.startswith(recovery.RECOVERED_PREFIX) or name == recovery.RECOVERED_PREFIX)
    one = Entry(0, 1, Kind.CONFIG, config_of((ME,)).encode())
    with pytest.raises(ValueError, match="starts with"):
        recovery.plan(ME, HardState(), LogId(0, 1), one, name)
