"""Step-level rules of the replication core, one input at a time (no simulation)."""

import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import node.core.replication as replication
from node.core.replication import machine
from node.core.replication.messages import (
    Append,
    AppendAck,
    AppendReject,
    Config,
    Entry,
    Fetch,
    FetchReply,
    HardState,
    Heartbeat,
    HeartbeatAck,
    Kind,
    LogId,
    LogRead,
    Message,
    Persisted,
    Prepare,
    Promise,
    Receive,
    Refuse,
    SnapshotOffer,
    Stale,
    Submit,
    SubmitAccepted,
    TakeOver,
    Tick,
    ViewChanged,
)
from tests.core.test_purity import violations

VOTERS = frozenset({"a", "b", "c"})
VIEW = ViewChanged({"a": 1, "b": 2, "c": 3})


def test_replication_core_imports_no_io_clock_or_randomness():
    """tests/core/test_purity.py covers node/core/*.py; the subpackage is held to the same rule."""
    package = pathlib.Path(replication.__file__).parent
    files = sorted(package.glob("*.py"))
    assert len(files) >= 3
    found = [v for path in files for v in violations(path, package="node.core.replication")]
    assert found == []


def test_the_subpackage_purity_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ...runtime import clock\nimport time\nfrom node.storage import log\n")
    found = violations(bad, package="node.core.replication")
    assert any("node.runtime" in v for v in found)
    assert any(v.endswith("imports time") for v in found)
    assert any("node.storage" in v for v in found)


def follower(me="a", epoch=1, entries=(), commit=1):
    state, _ = machine.bootstrap(me, VOTERS)
    log = state.log + tuple(entries)
    state = machine.State(
        me,
        state.options,
        HardState(epoch, None, state.hard.configs),
        LogId(0, 0),
        log,
        commit=commit,
        applied=commit,
        verified=commit,
    )
    state, _ = machine.step(state, VIEW, 0.0)
    return state


def cmd(epoch, index, payload=b"x"):
    return Entry(epoch, index, Kind.COMMAND, payload)


def test_messages_from_a_lower_epoch_change_nothing_and_are_told_the_epoch():
    state = follower(epoch=3)
    new, ready = machine.step(state, Receive("c", Append(2, LogId(0, 1), (cmd(2, 2),), 2, 1)), 1.0)
    assert new.last.index == 1 and new.commit == 1 and ready.append == ()
    assert [s.message for s in ready.messages] == [Stale(3)]


def test_a_higher_epoch_append_is_persisted_before_the_ack():
    state = follower(epoch=1)
    new, ready = machine.step(state, Receive("c", Append(2, LogId(0, 1), (cmd(2, 2),), 1, 7)), 1.0)
    assert ready.hard_state == HardState(2, None, state.hard.configs)
    assert ready.append == (cmd(2, 2),)
    assert [s.message for s in ready.messages] == [AppendAck(2, 2, 7)]
    assert new.leader == "c"


def test_a_divergent_uncommitted_suffix_is_truncated_but_a_committed_entry_never():
    state = follower(epoch=2, entries=(cmd(1, 2, b"old"), cmd(1, 3, b"old")), commit=2)
    # The leader of epoch 2 says entry 2 is its (1, 2) and sends its own 3 and 4.
    new, ready = machine.step(state, Receive("c", Append(2, LogId(1, 2), (cmd(2, 3), cmd(2, 4)), 3, 1)), 1.0)
    assert ready.truncate_from == 3 and ready.append == (cmd(2, 3), cmd(2, 4))
    assert new.commit == 3
    # An entry at or below the commit index is skipped, never compared for truncation.
    msg = Append(2, LogId(0, 1), (cmd(9, 2, b"other"), cmd(2, 3)), 3, 2)
    again, ready = machine.step(new, Receive("c", msg), 1.1)
    assert ready.truncate_from is None and again.log == new.log


def test_truncating_a_committed_entry_raises():
    state = follower(epoch=2, entries=(cmd(1, 2),), commit=2)
    s = machine._Step(state, 0.0)
    with pytest.raises(AssertionError, match="refusing to truncate committed entry 2"):
        s.truncate(2)


def test_a_mismatch_is_rejected_with_a_hint_below_the_divergent_epoch():
    state = follower(epoch=3, entries=(cmd(1, 2), cmd(2, 3), cmd(2, 4)), commit=1)
    _, ready = machine.step(state, Receive("c", Append(3, LogId(1, 4), (), 1, 5)), 1.0)
    assert [s.message for s in ready.messages] == [AppendReject(3, 4, 2, 5)]
    _, ready = machine.step(state, Receive("c", Append(3, LogId(3, 9), (), 1, 6)), 1.0)
    assert [s.message for s in ready.messages] == [AppendReject(3, 9, 4, 6)]


def test_commit_learnt_from_a_heartbeat_is_capped_by_what_was_verified():
    state = follower(epoch=2, entries=(cmd(1, 2), cmd(1, 3)), commit=1)
    new, _ = machine.step(state, Receive("c", Heartbeat(2, 3, 1)), 1.0)
    assert new.commit == 1  # entries 2-3 may be from an old leader: not verified against this one
    new, _ = machine.step(new, Receive("c", Append(2, LogId(1, 2), (), 3, 2)), 1.1)
    assert new.commit == 2


def test_a_voter_that_hears_its_leader_refuses_other_candidates_until_the_lease_ends():
    state = follower(epoch=2)
    state, _ = machine.step(state, Receive("c", Heartbeat(2, 1, 1)), 10.0)
    _, ready = machine.step(state, Receive("b", Prepare(3, LogId(0, 1))), 10.1)
    assert [s.message for s in ready.messages] == [Refuse(3, 2, "lease")] and ready.hard_state is None
    new, ready = machine.step(state, Receive("b", Prepare(3, LogId(0, 1))), 10.0 + state.options.lease_s)
    assert ready.hard_state == HardState(3, "b", state.hard.configs)  # durable before the Promise goes out
    assert [s.message for s in ready.messages] == [Promise(3, LogId(0, 1))]
    # The same candidate asking again gets the same answer; another one for the same epoch does not.
    _, ready = machine.step(new, Receive("b", Prepare(3, LogId(0, 1))), 11.0)
    assert [s.message for s in ready.messages] == [Promise(3, LogId(0, 1))]
    _, ready = machine.step(new, Receive("c", Prepare(3, LogId(0, 1))), 11.0)
    assert [s.message for s in ready.messages] == [Refuse(3, 3, "stale")]


def test_a_handover_prepare_is_granted_within_the_lease_and_non_voters_are_refused():
    state = follower(epoch=2)
    state, _ = machine.step(state, Receive("c", Heartbeat(2, 1, 1)), 10.0)
    _, ready = machine.step(state, Receive("b", Prepare(3, LogId(0, 1), handover=True)), 10.1)
    assert [s.message for s in ready.messages] == [Promise(3, LogId(0, 1))]
    _, ready = machine.step(state, Receive("x", Prepare(3, LogId(0, 0))), 20.0)
    assert [s.message for s in ready.messages] == [Refuse(3, 2, "not-a-voter")]


def test_a_candidate_outside_our_configuration_is_judged_by_its_log():
    """A voter promoted by a CONFIG entry we lack (our log is behind its) gets our promise; a non-voter
    whose log is behind ours does not. Handover prepares follow the same rule."""
    state = follower(epoch=2, entries=(Entry(2, 2, Kind.EPOCH_START),), commit=2)
    for last, handover in ((LogId(0, 1), False), (LogId(1, 9), False), (LogId(2, 1), True)):
        new, ready = machine.step(state, Receive("x", Prepare(3, last, handover)), 0.1)
        assert [s.message for s in ready.messages] == [Refuse(3, 2, "not-a-voter")]
        assert ready.hard_state is None and new.hard.epoch == 2
    for last in (LogId(2, 2), LogId(2, 3), LogId(3, 1)):
        new, ready = machine.step(state, Receive("x", Prepare(3, last)), 0.1)
        assert [s.message for s in ready.messages] == [Promise(3, LogId(2, 2))]
        assert ready.hard_state == HardState(3, "x", state.hard.configs)


def test_a_pipelined_single_voter_commits_only_what_it_reported_durable():
    """Options.pipelined: the leader's own copy counts only after Persisted; a report of another epoch, or
    beyond its log, counts for nothing."""
    options = machine.Options(pipelined=True)
    state, _ = machine.bootstrap("a", frozenset({"a"}), options)
    state, ready = machine.step(state, ViewChanged({"a": 1}), 0.0)
    assert not state.writable and ready.append[-1].kind is Kind.EPOCH_START
    state, ready = machine.step(state, Persisted(ready.append[-1].id), 0.01)
    assert state.writable and state.commit == 2
    state, ready = machine.step(state, Submit((("r1", b"p1"), ("r2", b"p2"))), 0.1)
    assert ready.apply == () and state.commit == 2  # appended, not yet durable here
    assert ready.replies == (SubmitAccepted("r1", 1, 3), SubmitAccepted("r2", 1, 4))
    for stale in (LogId(0, 4), LogId(1, 9), LogId(2, 4)):
        state, ignored = machine.step(state, Persisted(stale), 0.11)
        assert state.commit == 2 and ignored.apply == ()
    state, ready = machine.step(state, Persisted(LogId(1, 3)), 0.12)
    assert state.commit == 3 and [e.payload for e in ready.apply] == [b"p1"]
    state, ready = machine.step(state, Persisted(LogId(1, 4)), 0.13)
    assert state.commit == 4 and [e.payload for e in ready.apply] == [b"p2"]


@given(st.lists(st.sampled_from(["append", "ack-b", "ack-c", "persist"]), max_size=40))
def test_a_pipelined_leader_commits_only_what_a_majority_holds_durably(events):
    """Property: in a 3-voter cluster, whatever the order of follower acks and of its own Persisted reports,
    the pipelined leader's commit index never passes the second-highest durable copy (its own included)."""
    options = machine.Options(pipelined=True)
    state, _ = machine.bootstrap("a", frozenset({"a", "b", "c"}), options)
    state, ready = machine.step(state, ViewChanged({"a": 3, "b": 2, "c": 1}), 0.0)
    (prepare,) = {s.message for s in ready.messages}
    state, ready = machine.step(state, Receive("b", Promise(prepare.epoch, LogId(0, 1))), 0.001)
    assert state.role == machine.LEADER
    epoch, now = state.hard.epoch, 0.002
    durable = {"a": 1, "b": 1, "c": 1}
    written = [e.index for e in ready.append]  # appended, not yet reported
    for event in events:
        now += 0.001
        if event == "append":
            state, ready = machine.step(state, Submit((("r", b"x"),)), now)
            written += [e.index for e in ready.append]
        elif event == "persist" and written:
            durable["a"] = written[-1]
            state, ready = machine.step(state, Persisted(LogId(epoch, written[-1])), now)
        elif event.startswith("ack-"):
            peer = event[-1]
            durable[peer] = state.last.index  # the follower persisted everything sent so far
            state, ready = machine.step(state, Receive(peer, AppendAck(epoch, state.last.index, 0)), now)
        assert state.commit <= sorted(durable.values())[1]


def test_a_single_voter_appends_commits_applies_and_answers_in_one_ready():
    state, _ = machine.bootstrap("a", frozenset({"a"}))
    state, ready = machine.step(state, ViewChanged({"a": 1}), 0.0)
    assert state.writable and ready.hard_state.epoch == 1
    state, ready = machine.step(state, Submit((("r1", b"p1"), ("r2", b"p2"))), 0.1)
    assert [e.payload for e in ready.append] == [b"p1", b"p2"]  # one append for the batch
    assert ready.apply == ready.append
    assert ready.replies == (SubmitAccepted("r1", 1, 3), SubmitAccepted("r2", 1, 4))


def test_the_candidate_is_the_highest_id_healthy_voter_and_asks_every_other_voter():
    state, _ = machine.bootstrap("b", VOTERS)
    _, ready = machine.step(state, ViewChanged({"a": 1, "b": 2}), 0.0)  # c is not healthy
    assert sorted(s.to for s in ready.messages) == ["a", "c"]
    assert all(isinstance(s.message, Prepare) and s.message.epoch == 1 for s in ready.messages)
    assert ready.hard_state is None  # its own promise is taken only with the majority
    _, ready = machine.step(state, VIEW, 0.0)
    assert ready.messages == ()


def test_epoch_taken_with_a_majority_then_the_view_change_fetches_from_the_most_advanced():
    state, _ = machine.bootstrap("c", VOTERS)
    state, _ = machine.step(state, VIEW, 0.0)
    state, ready = machine.step(state, Receive("a", Promise(1, LogId(5, 9))), 0.01)
    assert ready.hard_state.epoch == 1 and ready.hard_state.promised_to == "c"
    assert [(s.to, type(s.message).__name__) for s in ready.messages] == [("a", "Fetch")]
    assert not state.writable and state.role == machine.CANDIDATE


def test_memory_window_sends_old_entries_through_read_log():
    options = machine.Options(keep_applied=2, max_batch_entries=4)
    state, _ = machine.bootstrap("a", frozenset({"a"}), options)
    state, _ = machine.step(state, ViewChanged({"a": 1}), 0.0)
    for i in range(10):
        state, _ = machine.step(state, Submit(((f"r{i}", b"x"),)), 0.0)
    assert state.base.index == state.applied - 2 and len(state.log) == 2
    # A learner appears; the leader proposes it, then it needs the entries below the window.
    state, ready = machine.step(state, ViewChanged({"a": 1, "z": 2}), 0.1)
    assert state.config.learners == {"z"}
    state, ready = machine.step(state, Receive("z", AppendReject(1, state.last.index - 1, 0, 0)), 0.2)
    (request,) = ready.read_log
    assert (request.peer, request.purpose, request.first) == ("z", "append", 1)
    entries = tuple(cmd(0, i) for i in range(request.first, request.last + 1))
    _, ready = machine.step(state, LogRead(request, entries), 0.2)
    (send,) = [s for s in ready.messages if isinstance(s.message, Append)]
    # From entry 1 no previous entry is read, so the read holds one more than a batch: one batch is sent.
    assert send.message.prev == LogId(0, 0) and send.message.entries == entries[: options.max_batch_entries]


def test_restore_rederives_the_config_history_from_the_log():
    old = Config(frozenset({"a", "b", "c"}))
    new = Config(frozenset({"a", "b"}))
    hard = HardState(4, "a", ((1, old),))  # crashed before the hard state recorded the change
    entries = (cmd(4, 3), Entry(4, 4, Kind.CONFIG, new.encode()))
    state = machine.restore("a", hard, LogId(2, 2), entries, applied=2)
    assert state.config == new and state.commit == 2 and state.last == LogId(4, 4)
    with pytest.raises(ValueError):
        machine.restore("a", hard, LogId(2, 3), entries, applied=2)


identities = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@given(st.frozensets(identities, max_size=6), st.frozensets(identities, max_size=6))
def test_config_encoding_is_deterministic_and_round_trips(voters, learners):
    config = Config(voters, learners - voters)
    assert Config.decode(config.encode()) == config
    assert Config(frozenset(sorted(voters)), learners - voters).encode() == config.encode()


@given(st.frozensets(identities, max_size=4), st.frozensets(identities, max_size=4))
def test_removed_identities_round_trip_and_an_empty_set_encodes_as_before(voters, removed):
    """The ``removed`` key is written only when set, so every configuration entry written before removals
    existed decodes, and re-encodes, byte for byte the same."""
    plain = Config(voters)
    assert "removed" not in json.loads(plain.encode())  # the key (an identity may be named "removed")
    assert Config.decode(plain.encode()).removed == frozenset()
    config = Config(voters, frozenset(), removed - voters)
    assert Config.decode(config.encode()) == config


@given(st.lists(st.sampled_from([Tick(), VIEW, Submit((("r", b"x"),))]), max_size=30), st.floats(0, 5))
def test_any_sequence_of_local_inputs_on_a_lone_follower_keeps_it_quiet_or_campaigning(inputs, dt):
    """A follower that is not the highest voter sends nothing, whatever it is fed, until it has deferred
    for a lease plus one election timeout per voter above it (two here) with no leader heard; from then on
    it only asks for promises (the end of deference: see machine._campaign_due)."""
    state = follower("a")
    o = state.options
    patience_s = o.lease_s + 2 * o.election_timeout_s
    now = 0.0
    for inp in inputs:
        now += dt
        state, ready = machine.step(state, inp, now)
        assert ready.append == () and ready.hard_state is None
        if now < patience_s:
            assert ready.messages == ()
        else:
            assert all(isinstance(s.message, Prepare) for s in ready.messages)


def _restarted_follower(epoch: int, last: int, applied: int) -> machine.State:
    """A voter restarted with entries 2..last of ``epoch`` durable but only ``applied`` of them applied."""
    config = Config(frozenset({"a", "b", "c"}))
    entries = (Entry(0, 1, Kind.CONFIG, config.encode()), *(cmd(epoch, i) for i in range(2, last + 1)))
    hard = HardState(epoch, "c", ((1, config),))
    return machine.restore("a", hard, LogId(0, 0), entries, applied=applied)


def test_a_heartbeat_naming_a_matching_entry_commits_a_restarted_followers_entries():
    """Regression: a follower restarted with committed but unapplied entries applied nothing until the next
    write reached it, although the leader kept sending heartbeats."""
    state = _restarted_follower(epoch=3, last=6, applied=2)
    beat = Heartbeat(3, commit=6, seq=1, prev=LogId(3, 6))
    state, ready = machine.step(state, Receive("c", beat), 1.0)
    assert state.commit == 6
    assert [e.index for e in ready.apply] == [3, 4, 5, 6]


@given(
    last=st.integers(2, 12),
    applied=st.integers(1, 12),
    prev_index=st.integers(0, 14),
    prev_epoch=st.integers(0, 4),
    commit=st.integers(0, 14),
)
def test_a_heartbeat_commits_only_what_it_proves_matches(last, applied, prev_index, prev_epoch, commit):
    """Whatever the heartbeat says, the follower commits no entry beyond what the named entry proves it
    shares with the leader (same epoch at that index), and never beyond the leader's commit index."""
    applied = min(applied, last)
    state = _restarted_follower(epoch=3, last=last, applied=applied)
    after, _ = machine.step(state, Receive("c", Heartbeat(3, commit, 1, LogId(prev_epoch, prev_index))), 1.0)
    ours = 0 if prev_index == 0 else (0 if prev_index == 1 else 3) if prev_index <= last else None
    proven = prev_index if ours is not None and ours == prev_epoch else applied
    assert after.commit == max(applied, min(commit, max(proven, applied), last))


# --- clusters: epochs and indices mean something only within one cluster --------------------------------------

# One example of every peer message, each of a higher epoch than the receiver's so it would act on it.
EVERY_MESSAGE = (
    Prepare(9, LogId(9, 9)),
    Promise(9, LogId(9, 9)),
    Refuse(9, 9, "stale"),
    Append(9, LogId(0, 1), (Entry(9, 2, Kind.COMMAND, b"theirs"),), 2, 1),
    AppendAck(9, 5, 1),
    AppendReject(9, 5, 1, 1),
    Heartbeat(9, 5, 1),
    HeartbeatAck(9, 1),
    Stale(9),
    Fetch(9, 1),
    FetchReply(9, 1, (), LogId(9, 9)),
    TakeOver(9),
    SnapshotOffer(9, LogId(9, 20)),
)


def test_every_message_type_is_in_the_example_list():
    assert {type(m) for m in EVERY_MESSAGE} == set(Message.__args__)


def clustered(me="a", cluster="cluster-a"):
    state, _ = machine.bootstrap(me, VOTERS, cluster=cluster)
    state, _ = machine.step(state, VIEW, 0.0)
    return state


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_no_message_from_another_cluster_is_read(message):
    state = clustered()
    new, ready = machine.step(state, Receive("c", message, "cluster-b"), 1.0)
    assert new.hard == state.hard and new.log == state.log and new.role == state.role
    assert new.highest_seen == state.highest_seen  # not even its epoch was noted
    assert new.leader == state.leader and ready.messages == () and ready.append == ()
    assert [f.event for f in ready.facts] == ["foreign_cluster"]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_messages_of_its_own_cluster_or_of_a_node_without_one_are_read(message):
    """The control of the test above: the same message, of the same cluster (or of a node that has none,
    as a joiner's answers and an older release's batches are), is acted on or answered."""
    for cluster in ("cluster-a", ""):
        state = clustered()
        new, ready = machine.step(state, Receive("c", message, cluster), 1.0)
        assert "foreign_cluster" not in [f.event for f in ready.facts]
        assert new.hard.epoch == 9 or new.highest_seen == 9 or ready.messages


@pytest.mark.parametrize(
    "message",
    [m for m in EVERY_MESSAGE if not isinstance(m, Append | Heartbeat | SnapshotOffer)],
    ids=lambda m: type(m).__name__,
)
def test_a_node_without_a_cluster_is_moved_only_by_a_leaders_word(message):
    state = machine.joiner("j")
    new, ready = machine.step(state, Receive("c", message, "cluster-b"), 1.0)
    assert new.hard == state.hard and ready.messages == () and ready.hard_state is None


@pytest.mark.parametrize(
    "first", [Append(2, LogId(0, 0), (), 0, 1), Heartbeat(2, 0, 1)], ids=["append", "heartbeat"]
)
def test_a_node_without_a_cluster_joins_the_first_leaders_durably_before_it_answers(first):
    state = machine.joiner("j")
    new, ready = machine.step(state, Receive("a", first, "cluster-a"), 1.0)
    assert new.hard.cluster == "cluster-a"
    assert ready.hard_state is not None and ready.hard_state.cluster == "cluster-a"  # written before sends
    assert [f.event for f in ready.facts][:1] == ["cluster_joined"]
    # From now on the other cluster's leader is not heard, whatever its epoch.
    later, ready = machine.step(new, Receive("b", Append(7, LogId(0, 0), (), 0, 1), "cluster-b"), 1.1)
    assert later.hard == new.hard and later.leader == new.leader and ready.messages == ()


def test_every_message_a_node_makes_carries_its_cluster():
    state = clustered()
    _, ready = machine.step(state, Receive("c", Heartbeat(2, 1, 1), ""), 1.0)  # answered, stamped
    assert ready.messages and {s.cluster for s in ready.messages} == {"cluster-a"}


def test_a_cluster_named_before_names_existed_is_derived_from_entry_1_alike_on_every_member():
    first_a = machine.bootstrap("a", VOTERS)[0].log[0]
    first_b = machine.bootstrap("b", VOTERS)[0].log[0]
    other = machine.bootstrap("a", frozenset({"a"}))[0].log[0]
    assert machine.legacy_cluster(first_a) == machine.legacy_cluster(first_b) != ""
    assert machine.legacy_cluster(other) not in ("", machine.legacy_cluster(first_a))
    assert machine.legacy_cluster(cmd(1, 1)) == "" and machine.legacy_cluster(cmd(1, 2)) == ""


def test_a_voter_stops_deferring_to_a_higher_voter_that_never_leads():
    """Deference ends (machine._campaign_due): "b" defers to "c" while no leader is heard, for a lease plus
    one election timeout per node above it in the view (one: "c"); then it campaigns itself. "a" waits one
    election timeout longer. A Tick before the end changes nothing, and next_deadline names the end."""
    o = machine.Options()
    for me, above in (("b", 1), ("a", 2)):
        state = follower(me)  # its view (at 0.0) shows a, b and c healthy; no leader heard
        end_s = o.lease_s + above * o.election_timeout_s
        assert state.deferred_s == 0.0
        assert machine.next_deadline(state, 0.0) == pytest.approx(end_s, abs=1e-5)
        same, ready = machine.step(state, Tick(), end_s - 0.01)
        assert ready.empty and same == state
        state, ready = machine.step(state, Tick(), end_s)
        assert state.role == machine.CANDIDATE and state.deferred_s == machine.NEVER
        assert sorted(s.to for s in ready.messages if isinstance(s.message, Prepare)) == sorted(VOTERS - {me})
        expired = [f for f in ready.facts if f.event == "deference_expired"]
        assert [dict(f.fields)["deferred_to"] for f in expired] == ["c"]


def test_a_voter_that_hears_a_leader_or_loses_sight_of_the_higher_voter_does_not_defer():
    state = follower("b")
    heard, _ = machine.step(state, Receive("c", Heartbeat(1, 1, 1)), 0.1)
    assert heard.deferred_s == machine.NEVER  # a live leader: nothing to wait for
    alone, ready = machine.step(state, ViewChanged({"a": 1, "b": 2}), 0.1)
    assert alone.role == machine.CANDIDATE  # now the highest healthy voter: campaigns at once
    assert "deference_expired" not in [f.event for f in ready.facts]


def test_a_node_that_promised_lets_that_campaign_run_for_an_election_timeout():
    """Even the highest voter: having promised "b" (healthy) a higher epoch than its own campaign's, "c"
    steps down and starts no campaign of its own for an election timeout; a candidate gone from the view
    is not waited for."""
    o = machine.Options()
    state = follower("c")
    assert state.role == machine.CANDIDATE  # the highest healthy voter campaigns at once
    promised, ready = machine.step(state, Receive("b", Prepare(5, LogId(0, 1))), 0.0)
    assert ready.messages[0].message == Promise(5, LogId(0, 1)) and promised.role == machine.FOLLOWER
    assert machine.next_deadline(promised, 0.0) == pytest.approx(o.election_timeout_s, abs=1e-5)
    same, ready = machine.step(promised, Tick(), o.election_timeout_s - 0.01)
    assert ready.empty and same == promised
    later, _ = machine.step(promised, Tick(), o.election_timeout_s)
    assert later.role == machine.CANDIDATE and later.campaign.epoch == 6
    gone, _ = machine.step(promised, ViewChanged({"a": 1, "c": 3}), 0.1)
    assert gone.role == machine.CANDIDATE
