"""The optimised core step against a straightforward reference, on generated input sequences.

``machine.step`` keeps derived values for the length of a step (the reachable-voter count and the no-quorum
reason), builds Progress and Ready by direct constructor calls, skips work that cannot change anything
(config pruning with one committed configuration, an empty departing set) and computes the handover target
and ``next_deadline`` in one pass, and appends a received batch with ``append_all`` (its per-entry lookups
done once). ``ReferenceStep`` below is the plain form of every one of those functions
(recomputed from scratch at every use, ``dataclasses.replace``, keyword ``Ready``), swapped in for
``machine._Step``; every step of a simulation is run both ways and must give the same State and Ready, and
``next_deadline`` and the handover target must agree with their plain forms. A cached value that a later
change forgets to invalidate shows up here as a difference.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields, replace
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node.core.replication import machine
from node.core.replication.machine import LEADER, NEVER, Progress, State, _healthy
from node.core.replication.messages import (
    AppendAck,
    AppendReject,
    Config,
    HeartbeatAck,
    Kind,
    LogId,
    Persisted,
    Promise,
    Read,
    Ready,
    Receive,
    Stop,
    Submit,
    Tick,
    ViewChanged,
)
from tests.support.repsim import RepSim

# --- the reference: the plain form of every optimised function --------------------------------------------


def reference_handover_target(s, now: float) -> str | None:
    answering = [
        v
        for v in s.config.voters
        if v != s.me
        and _healthy(s, v)
        and v in s.progress
        and now - s.progress[v].last_ack_s <= s.options.lease_s
    ]
    if not answering or now < s.handover_retry_s:
        return None
    best = max(answering, key=lambda v: (s.view.get(v, -1), v))
    if s.stopping or (s.view.get(best, -1), best) > (s.view.get(s.me, -1), s.me):
        return best
    return None


def reference_next_deadline(state: State, now: float) -> float:
    o = state.options
    if state.role == LEADER:
        if reference_handover_target(state, now) != state.handover_to or any(
            machine._read_confirmed(state, r) for r in state.reads
        ):
            return now
    elif state.campaign is None and machine._campaign_due(state, now):
        return now
    timers = [(until_s, 0.0) for until_s in state.departing.values()]
    timers.append((state.snapshot_retry_s, 0.0))
    if state.role == LEADER:
        timers.append((state.heartbeat_sent_s, o.heartbeat_s))
        for p in state.progress.values():
            timers.append((p.last_ack_s, o.lease_s))
            timers.append((p.last_ack_s, o.reap_timeout_s))
        timers.extend((r.at_s, o.lease_s) for r in state.reads)
        timers.append((state.handover_retry_s, 0.0))
        if state.handover_to is not None:
            timers.append((state.handover_since_s, o.handover_timeout_s))
            timers.append((state.takeover_sent_s, o.heartbeat_s))
    elif state.campaign is not None:
        timers.append((state.campaign.started_s, o.election_timeout_s))
        timers.append((state.campaign.sent_s, o.resend_s))
    elif machine._leader_alive(state, now):
        timers.append((state.leader_contact_s, o.lease_s))
    else:
        timers.append((state.deferred_s, machine._deference_s(state)))
        timers.append((state.promised_s, o.election_timeout_s))
    due = [x + d for x, d in timers if now - x <= d]
    return max(now, min(due) - machine._EARLY_S) if due else float("inf")


class ReferenceStep(machine._Step):
    """``machine._Step`` with the optimised functions in their plain form (as before the optimisation)."""

    @property
    def config(self):
        return self.hard.config

    def reachable_voters(self) -> int:
        count = 0
        for v in self.config.voters:
            if v == self.me:
                count += 1
            elif v in self.view:
                if self.role != LEADER:
                    count += 1
                else:
                    p = self.progress.get(v)
                    count += p is not None and self.now - p.last_ack_s <= self.o.lease_s
        return count

    def no_quorum_reason(self) -> str | None:
        n, q = len(self.config.voters), machine.quorum(self.config)
        reachable = self.reachable_voters()
        return None if reachable >= q else f"no quorum: {reachable} of {n} voters reachable"

    def on_ack(self, sender, m) -> None:
        if self.role != LEADER or sender not in self.progress:
            return
        p = self.progress[sender]
        acked = {"last_ack_s": self.now, "acked_seq": max(p.acked_seq, m.seq)}
        if isinstance(m, AppendAck):
            moved = m.match > p.match
            p = replace(
                p,
                **acked,
                match=max(p.match, m.match),
                next=max(p.next, m.match + 1),
                inflight=max(0, p.inflight - 1),
                probing=False,
                last_progress_s=self.now if moved else p.last_progress_s,
                offered_s=NEVER if moved else p.offered_s,
            )
        elif isinstance(m, AppendReject) and m.rejected > p.match:
            p = replace(
                p,
                **acked,
                next=max(p.match + 1, min(m.rejected, m.hint + 1)),
                inflight=0,
                probing=True,
                last_progress_s=self.now,
            )
        else:
            p = replace(p, **acked)
        self.progress[sender] = p
        if isinstance(m, AppendAck):
            self.advance_commit()
        if not isinstance(m, HeartbeatAck):
            self.replicate(sender)

    def advance_commit(self) -> None:
        cfg = self.config
        mine = min(self.durable, self.last_index) if self.o.pipelined else self.last_index
        matches = sorted(
            (mine if v == self.me else self.progress[v].match if v in self.progress else 0)
            for v in cfg.voters
        )
        if not matches:
            return
        q = machine.quorum(cfg)
        if q > len(matches):
            return
        n = matches[len(matches) - q]
        if n > self.commit and self.epoch_at(n) == self.hard.epoch:
            self.commit = n

    def replicate(self, peer: str) -> None:
        p = self.progress.get(peer)
        if p is None or p.reading or (p.probing and p.inflight > 0):
            return
        while p.next <= self.last_index and p.inflight < self.o.max_inflight:
            if p.next - 1 < self.base.index:
                start = self.disk_start(p.next)
                if start is None:
                    p = self.offer_snapshot(peer, p)
                    break
                first = start[0]
                last = min(self.base.index, first + self.o.max_batch_entries)
                self.out_read_log.append(machine.ReadLog(peer, "append", self.hard.epoch, first, last))
                p = replace(p, reading=True)
                break
            batch = self.entries_from(p.next)
            if p.inflight and p.next > p.match + 1 and p.next + len(batch) > self.last_index:
                break
            prev = LogId(self.epoch_at(p.next - 1) or 0, p.next - 1)
            self.send(peer, machine.Append(self.hard.epoch, prev, tuple(batch), self.commit, self.seq))
            p = replace(
                p,
                next=p.next + len(batch),
                inflight=p.inflight + 1,
                last_progress_s=self.now if p.inflight == 0 else p.last_progress_s,
            )
            if p.probing:
                break
        self.progress[peer] = p

    def maintain(self) -> None:
        for who, until_s in list(self.departing.items()):
            if until_s <= self.now or who not in self.view:
                del self.departing[who]
        if self.role == LEADER:
            self.maintain_leader()
        else:
            self.maintain_other()
        if not machine._deferring(self, self.now):
            self.deferred_s = NEVER
        elif self.deferred_s == NEVER:
            self.deferred_s = self.now
        self.apply_committed()
        if machine.snapshot_due(self, self.now):
            self.snapshot_pending = True
            self.snapshot_asked_at = self.applied
            self.applied_bytes = 0
            self.out_take_snapshot = True
            self.fact("snapshot_due", applied=self.applied, since=self.applied - self.snapshot.index)
        writable = (
            self.role == LEADER
            and self.commit >= self.epoch_start
            and not self.draining
            and not self.stopping
            and self.no_quorum_reason() is None
        )
        if writable != self.writable:
            self.writable = writable
            self.fact("writable_changed", writable=writable, epoch=self.hard.epoch)

    def apply_committed(self) -> None:
        if self.commit > self.applied:
            first = self.applied + 1
            applying = self.log[first - self.base.index - 1 : self.commit - self.base.index]
            self.out_apply.extend(applying)
            self.applied_bytes += sum(len(e.payload) for e in applying)
            self.applied = self.commit
            configs = self.hard.configs
            committed = [c for c in configs if c[0] <= self.commit]
            pruned = (*committed[-1:], *(c for c in configs if c[0] > self.commit))
            if pruned != configs:
                self.hard = replace(self.hard, configs=pruned)

    def append(self, entry) -> None:
        if entry.index != self.last_index + 1:
            raise AssertionError(f"append of {entry.index} after {self.last_index}")
        self.writable_log().append(entry)
        self.dirty = entry.index if self.dirty is None else min(self.dirty, entry.index)
        if entry.kind is Kind.CONFIG:
            self.hard = replace(
                self.hard, configs=(*self.hard.configs, (entry.index, Config.decode(entry.payload)))
            )

    def append_all(self, entries) -> None:
        for entry in entries:
            self.append(entry)

    def trim(self) -> None:
        new_base = self.applied - self.o.keep_applied
        if new_base > self.base.index:
            cut = new_base - self.base.index
            self.base = self.log[cut - 1].id
            del self.writable_log()[:cut]

    def finish(self):
        st_ = self.st
        truncate_from = append = None
        if self.dirty is not None:
            truncate_from = self.dirty if self.dirty <= st_.last.index else None
            append = tuple(self.log[self.dirty - self.base.index - 1 :])
        self.trim()
        self.log = tuple(self.log)
        self.progress = MappingProxyType(self.progress)
        self.departing = MappingProxyType(self.departing)
        new = State(*machine._state_values(self))
        ready = Ready(
            hard_state=self.hard if self.hard is not st_.hard and self.hard != st_.hard else None,
            truncate_from=truncate_from,
            append=append or (),
            messages=tuple(self.out_messages),
            read_log=tuple(self.out_read_log),
            apply=tuple(self.out_apply),
            replies=tuple(self.out_replies),
            facts=tuple(self.out_facts),
            install=self.out_install,
            take_snapshot=self.out_take_snapshot,
            fetch_snapshot=tuple(self.out_fetch),
        )
        return new, ready


# --- running both ------------------------------------------------------------------------------------------

_optimised_step = machine.step
_optimised_deadline = machine.next_deadline


def reference_step(state: State, inp, now: float) -> tuple[State, Ready]:
    """``machine.step`` with ``ReferenceStep`` and the plain handover target in place of the optimised ones
    (``step`` looks both up in the module when it runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "_Step", ReferenceStep)
        mp.setattr(machine, "_handover_target", reference_handover_target)
        return _optimised_step(state, inp, now)


class Compared:
    """Counts what was compared, so a test can show the comparison ran on the paths it is about."""

    def __init__(self) -> None:
        self.steps = 0
        self.leader_steps = 0
        self.deadlines = 0


def checked_step(compared: Compared, state: State, inp, now: float) -> tuple[State, Ready]:
    new, ready = _optimised_step(state, inp, now)
    ref_new, ref_ready = reference_step(state, inp, now)
    assert ready == ref_ready, f"Ready differs after {inp!r} at {now}"
    assert new == ref_new, f"State differs after {inp!r} at {now}"
    assert machine._handover_target(new, now) == reference_handover_target(new, now)
    compared.steps += 1
    compared.leader_steps += new.role == LEADER
    return new, ready


def checked_deadline(compared: Compared, state: State, now: float) -> float:
    deadline = _optimised_deadline(state, now)
    assert deadline == reference_next_deadline(state, now), f"next_deadline differs at {now}"
    compared.deadlines += 1
    return deadline


@contextlib.contextmanager
def comparing():
    compared = Compared()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "step", lambda s, i, n: checked_step(compared, s, i, n))
        mp.setattr(machine, "next_deadline", lambda s, n: checked_deadline(compared, s, n))
        yield compared


def test_direct_constructor_calls_follow_the_field_order():
    """on_ack, replicate and finish call Progress and Ready positionally: a field added or moved must show
    here (and then in those calls), not as a value silently in the wrong field."""
    assert [f.name for f in fields(Progress)] == [
        "next", "match", "inflight", "last_ack_s", "last_progress_s", "acked_seq", "probing", "reading",
        "offered_s",
    ]  # fmt: skip
    assert [f.name for f in fields(Ready)] == [
        "hard_state", "truncate_from", "append", "messages", "apply", "replies", "read_log", "facts", "install",
        "take_snapshot", "fetch_snapshot",
    ]  # fmt: skip


def test_the_comparison_catches_a_stale_reachable_count():
    """The check can fail: a step that keeps the reachable count across an ack (no invalidation) gives
    a different State than the reference once a member's answer brings the quorum back."""

    class Stale(machine._Step):
        def on_ack(self, sender, m):
            self.reachable_voters()  # counted before the ack, as a write earlier in the same step would
            key = self._reachable_key
            super().on_ack(sender, m)
            self._reachable_key = key  # and not invalidated by the ack

    sim = RepSim(3, seed=5)
    leader = sim.leader()
    state = sim.state(leader)
    peers = sorted(state.progress)
    later = sim.now + 2 * state.options.lease_s  # every member's lease has run out: no quorum
    lost = machine.step(state, Tick(), later)[0]
    assert not lost.writable
    ack = Receive(peers[0], HeartbeatAck(state.hard.epoch, state.seq), state.hard.cluster)
    ref_new, _ = reference_step(lost, ack, later)
    assert ref_new.writable  # one answer is enough for a majority of 3 again
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "_Step", Stale)
        stale_new, _ = machine.step(lost, ack, later)
    assert not stale_new.writable  # the count from before the ack (1 of 3) was kept
    assert stale_new != ref_new


SCHEDULES = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "voters": st.sampled_from([3, 5]),
        "joiners": st.integers(0, 1),
        "pipelined": st.booleans(),
        "group_commit": st.booleans(),
        "small_window": st.booleans(),
        "ticks": st.integers(100, 500),
        "p_fault": st.sampled_from([0.0, 0.01, 0.05]),
    }
)


def run_schedule(schedule: dict) -> RepSim:
    """A simulation of one of SCHEDULES: its cluster shape and options, drops, duplicates and lagging views,
    then its ticks of random faults (crashes, cuts, ID changes, stops, writes)."""
    options = (
        machine.Options(
            keep_applied=3, max_batch_entries=2, max_inflight=2, snapshot_entries=20, snapshot_trailing=4
        )
        if schedule["small_window"]
        else machine.Options()
    )
    sim = RepSim(
        schedule["voters"],
        joiners=schedule["joiners"],
        seed=schedule["seed"],
        options=options,
        drop=0.05,
        duplicate=0.05,
        view_lag_s=0.3,
        pipelined=schedule["pipelined"],
        group_commit=schedule["group_commit"] and not schedule["pipelined"],
    )
    for _ in range(schedule["ticks"]):
        sim.random_fault(p_fault=schedule["p_fault"])
    return sim


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEDULES)
@example(  # every node down early: one step per tick (a guard of "more steps than ticks" failed here)
    {
        "seed": 4806,
        "voters": 3,
        "joiners": 0,
        "pipelined": False,
        "group_commit": False,
        "small_window": False,
        "ticks": 197,
        "p_fault": 0.05,
    }
)
def test_simulated_schedules_step_like_the_reference(schedule):
    """Random fault schedules (crashes, cuts, ID changes, stops, drops, duplicates, writes) on generated
    cluster shapes: every core step of every node equals the reference step."""
    with comparing() as compared:
        sim = run_schedule(schedule)
    # Every step the simulation took was compared. (Not "more steps than ticks": a schedule whose faults
    # take every node down early, e.g. seed 4806 of 3 voters over 197 ticks, steps once per tick.)
    assert compared.steps == sim.steps > 0
    assert compared.deadlines > 0


# --- a leader fed arbitrary inputs directly ----------------------------------------------------------------

PEERS = ("b", "c", "d", "e")


def leader_state(voters: int, pipelined: bool) -> State:
    names = ("a", *PEERS[: voters - 1])
    view = {n: 10 - i for i, n in enumerate(names)}  # "a" has the highest ID: it campaigns and leads
    state, _ = machine.bootstrap("a", frozenset(names), machine.Options(pipelined=pipelined, keep_applied=4))
    state, _ = machine.step(state, ViewChanged(view), 0.0)
    assert state.campaign is not None
    for peer in names[1:]:
        state, _ = machine.step(state, Receive(peer, Promise(state.campaign.epoch, LogId(0, 1))), 0.0)
        if state.role == LEADER:
            break
    assert state.role == LEADER
    return state


@st.composite
def leader_inputs(draw, state: State):
    """One input a leader may get: writes, reads, acks (current, old, rejecting), Persisted, view changes
    (members leaving, IDs moving above the leader's: handover), Stop, Ticks."""
    epoch, members = state.hard.epoch, sorted(state.config.members - {state.me}) or ["b"]
    peer = draw(st.sampled_from(members))
    index = draw(st.integers(0, 40))
    seq = draw(st.integers(0, 12))
    kind = draw(
        st.sampled_from(["submit", "ack", "ack", "reject", "hb", "persisted", "read", "view", "tick", "stop"])
    )
    if kind == "submit":
        return Submit(
            tuple((f"r{i}", b"x" * draw(st.integers(0, 64))) for i in range(draw(st.integers(1, 3))))
        )
    if kind == "ack":
        return Receive(peer, AppendAck(epoch, index, seq))
    if kind == "reject":
        return Receive(peer, AppendReject(epoch, index, draw(st.integers(0, index)), seq))
    if kind == "hb":
        return Receive(peer, HeartbeatAck(epoch, seq))
    if kind == "persisted":
        return Persisted(LogId(epoch, index))
    if kind == "read":
        return Read((f"q{index}",))
    if kind == "view":
        healthy = draw(st.lists(st.sampled_from(members), unique=True))
        return ViewChanged({"a": 10, **{p: draw(st.sampled_from([1, 2, 11, 12])) for p in healthy}})
    if kind == "stop":
        return Stop()
    return Tick()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([3, 5]), st.booleans())
def test_generated_leader_inputs_step_like_the_reference(data, voters, pipelined):
    """Arbitrary sequences of a leader's inputs, at generated times (lease expiries, heartbeats, reaping
    within reach): the optimised step and next_deadline equal the reference at every step."""
    state = leader_state(voters, pipelined)
    now = 0.0
    with comparing() as compared:
        for _ in range(data.draw(st.integers(1, 40))):
            now += data.draw(st.sampled_from([0.0, 0.001, 0.03, 0.2, 0.6, 1.5, 70.0]))
            inp = data.draw(leader_inputs(state))
            state, _ = machine.step(state, inp, now)
            machine.next_deadline(state, now)
    assert compared.steps == compared.deadlines > 0
