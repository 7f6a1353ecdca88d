"""Scripted scenarios for the replication core, on the deterministic simulation (tests/support/repsim.py).

Every Ready of every node is checked against the safety invariants as the scenario runs; the asserts here
are about what a user would see: who leads, what is committed, what a client is told.
"""

import pytest

from node.core.replication import machine
from node.core.replication.messages import (
    ReadConfirmed,
    ReadRejected,
    SubmitAccepted,
    SubmitRejected,
)
from tests.support.repsim import RepSim


def committed_everywhere(sim: RepSim, payloads: list[bytes]) -> bool:
    return all(all(p in sim.applied_commands(n) for p in payloads) for n in sim.alive())


def converged(sim: RepSim) -> bool:
    alive = [sim.state(n) for n in sim.alive()]
    leader = [s for s in alive if s.writable]
    return len(leader) == 1 and all(s.commit == leader[0].last.index == s.last.index for s in alive)


def test_three_nodes_elect_the_highest_voter_and_commit_everywhere():
    sim = RepSim(3, seed=1)
    assert sim.leader() == "node-3"
    reply = sim.submit("node-3", b"w1")
    assert isinstance(reply, SubmitAccepted) and reply.epoch == sim.state("node-3").hard.epoch
    assert sim.run_until(lambda: committed_everywhere(sim, [b"w1"]), 2)
    assert sim.write_committed(reply)
    assert {sim.state(n).hard.epoch for n in sim.nodes} == {1}  # one cluster epoch, the same everywhere
    assert all(sim.state(n).leader == "node-3" for n in sim.nodes)


def test_followers_refuse_writes_and_name_the_leader():
    sim = RepSim(3, seed=2)
    sim.leader()
    sim.run(0.2)
    reply = sim.submit("node-1", b"x")
    assert isinstance(reply, SubmitRejected)
    assert (reply.code, reply.leader) == ("not-leader", "node-3")


def test_leader_crash_next_highest_takes_over_without_losing_committed_entries():
    sim = RepSim(3, seed=3)
    sim.leader()
    acked = [sim.submit("node-3", f"a{i}".encode()) for i in range(5)]
    assert sim.run_until(lambda: all(sim.write_committed(r) for r in acked), 2)
    sim.crash("node-3")
    assert sim.leader(timeout_s=3) == "node-2"
    assert all(sim.write_committed(r) for r in acked)
    more = sim.submit("node-2", b"b0")
    assert isinstance(more, SubmitAccepted)
    assert sim.run_until(lambda: committed_everywhere(sim, [b"a0", b"a4", b"b0"]), 2)


def test_stale_highest_id_node_cannot_roll_back_committed_writes():
    """node-3 misses writes committed by node-2 and node-1, then node-2 dies: node-3 (highest ID, stale)
    leads with node-1, but only after its view change fetched the missing entries from node-1."""
    sim = RepSim(3, seed=4)
    sim.leader()
    sim.crash("node-3")
    sim.leader(timeout_s=3)
    acked = [sim.submit("node-2", f"c{i}".encode()) for i in range(10)]
    assert sim.run_until(lambda: all(sim.write_committed(r) for r in acked), 2)
    sim.crash("node-2")
    sim.restart("node-3")
    assert sim.state("node-3").last.index < acked[-1].index  # it really is behind
    assert sim.leader(timeout_s=3) == "node-3"
    assert sim.run_until(lambda: committed_everywhere(sim, [f"c{i}".encode() for i in range(10)]), 2)
    assert [p for p in sim.applied_commands("node-3")] == [f"c{i}".encode() for i in range(10)]


def test_returning_highest_id_node_gets_the_lead_by_handover_after_catching_up():
    sim = RepSim(3, seed=5)
    sim.leader()
    sim.crash("node-3")
    sim.leader(timeout_s=3)
    acked = [sim.submit("node-2", f"d{i}".encode()) for i in range(10)]
    assert sim.run_until(lambda: all(sim.write_committed(r) for r in acked), 2)
    sim.restart("node-3")
    assert sim.run_until(lambda: sim.writable() == ["node-3"], 3), sim.describe()
    handovers = [f for at, f, _ in sim.nodes["node-2"].facts if f == "handover_started"]
    assert handovers
    assert all(sim.write_committed(r) for r in acked)
    assert sim.run_until(lambda: committed_everywhere(sim, [f"d{i}".encode() for i in range(10)]), 2)


def test_a_one_way_partition_does_not_make_epochs_flap():
    """node-2 stops hearing the leader (node-3 -> node-2 cut) and thinks it should lead; node-1 still hears
    node-3 and refuses, node-3 holds its lease: the epoch never moves and writes keep committing."""
    sim = RepSim(3, seed=6)
    sim.leader()
    epoch = sim.state("node-3").hard.epoch
    sim.cut("node-3", "node-2")
    for i in range(20):
        reply = sim.submit("node-3", f"e{i}".encode())
        assert isinstance(reply, SubmitAccepted), reply
        sim.run(0.25)
    assert {sim.state(n).hard.epoch for n in sim.nodes} == {epoch}
    assert sim.writable() == ["node-3"]
    campaigns = [f for at, f, _ in sim.nodes["node-2"].facts if f == "campaign_started"]
    assert campaigns  # it did try, which is what makes the test meaningful
    sim.heal()
    assert sim.run_until(lambda: converged(sim), 2)
    assert {sim.state(n).hard.epoch for n in sim.nodes} == {epoch}


def test_without_the_lease_rule_a_one_way_cut_does_move_the_epoch():
    """The check above can fail: with a lease shorter than the heartbeat interval, voters no longer count
    as having heard the leader, grant node-2's campaign, and the epoch moves."""
    sim = RepSim(3, seed=6, options=machine.Options(lease_s=0.01))
    sim.leader()
    epoch = sim.state("node-3").hard.epoch
    sim.cut("node-3", "node-2")
    sim.run(3)
    assert max(sim.state(n).hard.epoch for n in sim.nodes) > epoch


@pytest.mark.parametrize(
    "src,dst",
    [(a, b) for a in ("node-1", "node-2", "node-3") for b in ("node-1", "node-2", "node-3") if a != b],
)
def test_no_single_one_way_cut_moves_the_epoch_or_stops_writes(src, dst):
    sim = RepSim(3, seed=19)
    sim.leader()
    epoch = sim.state("node-3").hard.epoch
    sim.cut(src, dst)
    replies = []
    for i in range(12):
        replies.append(sim.submit("node-3", f"o{i}".encode()))
        sim.run(0.25)
    assert all(isinstance(r, SubmitAccepted) for r in replies)
    assert sim.run_until(lambda: all(sim.write_committed(r) for r in replies), 1)
    assert {sim.state(n).hard.epoch for n in sim.nodes} == {epoch}
    assert sim.writable() == ["node-3"]


def test_minority_leader_steps_down_and_its_uncommitted_entries_are_discarded():
    sim = RepSim(3, seed=7)
    sim.leader()
    sim.isolate("node-3")
    # The isolated leader still accepted this in the instant before it could know.
    sim.set_view("node-3", {"node-1": 1, "node-2": 2, "node-3": 3})
    lost = sim.submit("node-3", b"lost")
    assert isinstance(lost, SubmitAccepted)
    sim.run(0.6)
    assert not sim.state("node-3").writable  # lease expired: no majority contact
    rejected = sim.submit("node-3", b"never")
    assert isinstance(rejected, SubmitRejected) and rejected.code == "no-quorum"
    assert rejected.reason == "no quorum: 1 of 3 voters reachable"
    sim.auto_view = True
    sim.update_views()
    assert sim.leader(timeout_s=3) == "node-2"
    kept = sim.submit("node-2", b"kept")
    assert sim.run_until(lambda: sim.write_committed(kept), 2)
    sim.heal()
    assert sim.run_until(lambda: converged(sim) and sim.writable() == ["node-3"], 5), sim.describe()
    assert not sim.write_committed(lost)
    for n in sim.nodes:
        assert b"lost" not in sim.applied_commands(n)
        assert b"kept" in sim.applied_commands(n)


def test_two_of_three_down_rejects_writes_at_once_and_resumes_when_one_returns():
    sim = RepSim(3, seed=8)
    sim.leader()
    sim.crash("node-1")
    sim.crash("node-2")
    reply = sim.submit("node-3", b"x")  # the same instant: the view already lost both
    assert isinstance(reply, SubmitRejected)
    assert (reply.code, reply.reason) == ("no-quorum", "no quorum: 1 of 3 voters reachable")
    assert sim.writable() == []
    sim.run(2)
    reply = sim.submit("node-3", b"x")
    assert isinstance(reply, SubmitRejected) and reply.code == "no-quorum"
    sim.restart("node-1")
    leader = sim.leader(timeout_s=3)
    reply = sim.submit(leader, b"y")
    assert isinstance(reply, SubmitAccepted)
    assert sim.run_until(lambda: sim.write_committed(reply), 2)


def test_a_lone_survivor_that_was_a_follower_also_answers_no_quorum():
    sim = RepSim(3, seed=9)
    sim.leader()
    sim.crash("node-3")
    sim.crash("node-2")
    reply = sim.submit("node-1", b"x")
    assert isinstance(reply, SubmitRejected)
    assert (reply.code, reply.reason) == ("no-quorum", "no quorum: 1 of 3 voters reachable")


def test_a_new_node_joins_as_learner_becomes_voter_and_then_leads_by_handover():
    sim = RepSim(3, joiners=1, seed=10)
    acked = [sim.submit(sim.leader(), f"f{i}".encode()) for i in range(5)]
    assert sim.run_until(lambda: sim.writable() == ["node-4"], 5), sim.describe()
    proposals = [fields["reason"] for at, f, fields in sim.nodes["node-3"].facts if f == "config_proposed"]
    assert proposals == ["new node node-4", "learner node-4 caught up"]
    cfg = sim.state("node-4").config
    assert cfg.voters == {"node-1", "node-2", "node-3", "node-4"} and not cfg.learners
    assert all(sim.write_committed(r) for r in acked)
    assert sim.run_until(lambda: committed_everywhere(sim, [f"f{i}".encode() for i in range(5)]), 2)


def test_learners_never_lead_even_with_the_highest_id():
    sim = RepSim(3, joiners=1, seed=11)
    sim.leader()
    # Cut off the moment it knows it is a learner, before it could be promoted: it must not campaign.
    assert sim.run_until(lambda: "node-4" in sim.state("node-4").config.learners, 2)
    sim.isolate("node-4")
    sim.run(3)
    assert sim.state("node-4").role == machine.FOLLOWER
    assert "campaign_started" not in {f for _, f, _ in sim.nodes["node-4"].facts}


def test_a_silent_voter_is_reaped_through_the_log_and_rejoins_as_learner_then_voter():
    sim = RepSim(3, seed=12, options=machine.Options(reap_timeout_s=2.0))
    sim.leader()
    sim.crash("node-1")
    sim.run(3)
    assert sim.state("node-3").config.voters == {"node-2", "node-3"}
    assert sim.state("node-2").config.voters == {"node-2", "node-3"}
    # Now one more failure is enough to lose the quorum of the smaller cluster, so node-2 matters alone.
    sim.restart("node-1")
    assert sim.run_until(lambda: sim.state("node-3").config.voters == {"node-1", "node-2", "node-3"}, 3)
    reasons = [fields["reason"] for _, f, fields in sim.nodes["node-3"].facts if f == "config_proposed"]
    assert reasons == ["voter node-1 silent", "new node node-1", "learner node-1 caught up"]


def test_planned_handover_on_stop_pauses_writes_briefly_and_loses_nothing():
    sim = RepSim(3, seed=13)
    sim.leader()
    acked = [sim.submit("node-3", f"g{i}".encode()) for i in range(20)]
    sim.stop("node-3")
    stopped_at = sim.now
    assert sim.run_until(lambda: sim.writable() == ["node-2"], 1), sim.describe()
    pause_s = sim.now - stopped_at
    assert pause_s < 0.1  # no lease or election timeout involved
    sim.crash("node-3")
    assert all(sim.write_committed(r) for r in acked)
    after = sim.submit("node-2", b"after")
    assert sim.run_until(lambda: sim.write_committed(after), 1)
    assert sim.applied_commands("node-2") == [f"g{i}".encode() for i in range(20)] + [b"after"]


def test_linearizable_reads_are_confirmed_by_a_majority_and_refused_by_a_cut_off_leader():
    sim = RepSim(3, seed=14)
    sim.leader()
    w = sim.submit("node-3", b"h")
    assert sim.run_until(lambda: sim.write_committed(w), 1)
    ready = sim.read("node-3", "q1")
    assert not any(isinstance(r, ReadConfirmed) for r in ready.replies)  # not before a majority answers
    assert sim.run_until(lambda: sim.read_result("node-3", "q1") is not None, 1)
    confirmed = sim.read_result("node-3", "q1")
    assert isinstance(confirmed, ReadConfirmed) and confirmed.index >= w.index
    sim.read("node-1", "q2")
    assert isinstance(sim.read_result("node-1", "q2"), ReadRejected)
    # Cut off from everyone (its view does not know yet): the read is never confirmed.
    sim.set_view("node-3", {"node-1": 1, "node-2": 2, "node-3": 3})
    sim.cuts |= {("node-3", "node-1"), ("node-3", "node-2"), ("node-1", "node-3"), ("node-2", "node-3")}
    sim.read("node-3", "q3")
    assert sim.run_until(lambda: sim.read_result("node-3", "q3") is not None, 2)
    assert isinstance(sim.read_result("node-3", "q3"), ReadRejected)


def test_a_follower_far_behind_catches_up_from_the_durable_log_with_bounded_memory():
    options = machine.Options(keep_applied=4, max_batch_entries=3)
    sim = RepSim(3, seed=15, options=options)
    sim.leader()
    sim.crash("node-1")
    for i in range(60):
        sim.submit("node-3", f"k{i}".encode())
        sim.run(0.01)
    assert sim.run_until(lambda: sim.state("node-3").commit == sim.state("node-3").last.index, 2)
    assert len(sim.state("node-3").log) <= options.keep_applied + 1
    sim.restart("node-1")
    assert sim.run_until(lambda: converged(sim), 5), sim.describe()
    assert sim.applied_commands("node-1") == [f"k{i}".encode() for i in range(60)]
    assert all(len(sim.state(n).log) <= options.keep_applied + options.max_batch_entries for n in sim.nodes)


def test_every_node_back_on_new_addresses_reforms_with_every_committed_write():
    """IDs follow addresses: after a restart on new IPs the order of IDs is different. Identities (and so
    logs, promises and voters) are unchanged: the cluster re-forms, the new highest voter leads."""
    sim = RepSim(3, seed=16)
    sim.leader()
    acked = [sim.submit("node-3", f"m{i}".encode()) for i in range(5)]
    assert sim.run_until(lambda: all(sim.write_committed(r) for r in acked), 1)
    for n in sim.nodes:
        sim.crash(n)
    sim.ids.update({"node-1": 900, "node-2": 700, "node-3": 800})
    for n in sim.nodes:
        sim.restart(n)
    assert sim.leader(timeout_s=3) == "node-1"
    assert sim.run_until(lambda: committed_everywhere(sim, [f"m{i}".encode() for i in range(5)]), 2)


def test_status_reports_lag_per_member_and_the_cluster_epoch():
    sim = RepSim(3, seed=18)
    sim.leader()
    sim.crash("node-1")
    for i in range(5):
        sim.submit("node-3", f"s{i}".encode())
    sim.run(0.2)
    st = machine.status(sim.state("node-3"))
    assert (st.role, st.writable, st.leader) == ("leader", True, "node-3")
    assert st.lag["node-2"] == 0 and st.lag["node-1"] == 5
    assert st.commit_index == st.applied_index == st.last_index
    follower = machine.status(sim.state("node-2"))
    assert (follower.role, follower.writable, follower.epoch, follower.leader) == (
        "follower",
        False,
        st.epoch,
        "node-3",
    )
    assert follower.lag == {}


def test_group_commit_one_submit_many_commands_one_append():
    sim = RepSim(3, seed=17)
    sim.leader()
    from node.core.replication.messages import Submit

    o = machine.Options()
    count = 3 * o.max_batch_entries + o.max_batch_entries // 2
    ready = sim.input("node-3", Submit(tuple((f"b{i}", f"p{i}".encode()) for i in range(count))))
    assert len(ready.append) == count and ready.truncate_from is None
    appends = [s for s in ready.messages if type(s.message).__name__ == "Append"]
    assert {s.to for s in appends} == {"node-1", "node-2"}
    # Pipelined: the three full batches go at once to each follower; the open tail (the last half batch)
    # waits for an answer, so that what is submitted meanwhile joins it.
    for peer in ("node-1", "node-2"):
        sizes = [len(s.message.entries) for s in appends if s.to == peer]
        assert sizes == [o.max_batch_entries] * 3, sizes
    assert sim.run_until(lambda: converged(sim), 2)


def test_an_open_tail_waits_for_the_answer_then_goes_in_one_append():
    """A lone write goes at once; writes that arrive while it is unanswered are held and then sent to each
    follower together, in one Append (one log write, one fsync, one ack there)."""
    sim = RepSim(3, seed=18)
    sim.leader()
    assert sim.run_until(lambda: converged(sim), 2)
    sent: list[tuple[str, int]] = []
    original = sim._send

    def watch(src, dst, message):
        if src == "node-3" and type(message).__name__ == "Append" and message.entries:
            sent.append((dst, len(message.entries)))
        original(src, dst, message)

    sim._send = watch
    sim.submit("node-3", b"first")
    assert sorted(sent) == [("node-1", 1), ("node-2", 1)]  # nothing in flight: sent at once
    for i in range(5):
        sim.submit("node-3", f"more{i}".encode())
    assert len(sent) == 2  # held: the first Append is unanswered
    assert sim.run_until(lambda: converged(sim), 2), sim.describe()
    assert sorted(sent[2:]) == [("node-1", 5), ("node-2", 5)]


def test_an_inflight_count_left_raised_does_not_hold_the_tail():
    """``inflight`` can stay raised with nothing unanswered (the ack of an earlier Append lost, a later one
    acknowledged up to the end): the tail is still sent at once, since no entry above the match waits."""
    from dataclasses import replace
    from types import MappingProxyType

    sim = RepSim(3, seed=19)
    sim.leader()
    assert sim.run_until(lambda: converged(sim), 2)
    node = sim.nodes["node-3"]
    progress = dict(node.state.progress)
    p = progress["node-1"]
    assert p.next == p.match + 1
    progress["node-1"] = replace(p, inflight=1)
    node.state = replace(node.state, progress=MappingProxyType(progress))
    sent: list[str] = []
    original = sim._send

    def watch(src, dst, message):
        if src == "node-3" and type(message).__name__ == "Append" and message.entries:
            sent.append(dst)
        original(src, dst, message)

    sim._send = watch
    sim.submit("node-3", b"next")
    assert sorted(sent) == ["node-1", "node-2"]


def test_a_node_from_another_cluster_never_takes_that_clusters_history():
    """Two clusters bootstrapped separately both have a committed entry 1 (their own voters). A node of one
    receiving the other's leader's entries refuses them whole: its log and commit do not move."""
    from node.core.replication.messages import Append, LogId, Receive

    sim = RepSim(3, seed=20)
    sim.leader()
    other, _ = machine.bootstrap("node-1", frozenset({"node-1", "stranger"}))
    leader = sim.state("node-3")
    append = Append(leader.hard.epoch + 5, LogId(0, 0), leader.log, leader.commit, 1)
    new, ready = machine.step(other, Receive("node-3", append), 1.0)
    assert new.log == other.log and new.commit == other.commit
    assert ready.messages == () and ready.append == ()
    assert [f.event for f in ready.facts] == ["epoch_adopted", "foreign_history"]
