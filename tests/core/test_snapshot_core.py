"""Snapshot decisions of the replication core, one input at a time: when to take one, how far the log may
be compacted, when a member needs a snapshot rather than the log tail, where it resumes, what an install
keeps."""

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from node.core.replication import machine
from node.core.replication.messages import (
    Append,
    AppendAck,
    AppendReject,
    Config,
    Entry,
    HardState,
    Heartbeat,
    Kind,
    LogId,
    LogRead,
    Promise,
    Receive,
    SnapshotFetched,
    SnapshotOffer,
    SnapshotTaken,
    Tick,
    ViewChanged,
)

CONFIG = Config(frozenset({"a", "b", "c"}))
VIEW = ViewChanged({"a": 1, "b": 2, "c": 3})


def cmd(epoch: int, index: int) -> Entry:
    return Entry(epoch, index, Kind.COMMAND, f"{epoch}.{index}".encode())


def follower(
    last: int, applied: int, epoch: int = 2, options: machine.Options | None = None
) -> machine.State:
    """Node "a", a follower of "c" in ``epoch``, with entries 2..last of that epoch and ``applied`` applied."""
    entries = (Entry(0, 1, Kind.CONFIG, CONFIG.encode()), *(cmd(epoch, i) for i in range(2, last + 1)))
    hard = HardState(epoch, None, ((1, CONFIG),), "cl")
    state = machine.restore("a", hard, LogId(0, 0), entries, applied, options)
    state, _ = machine.step(state, VIEW, 0.0)
    state, _ = machine.step(state, Receive("c", Heartbeat(epoch, applied, 1), "cl"), 0.1)
    assert state.leader == "c"
    return state


# --- when to snapshot, how far to compact ------------------------------------------------------------------


@given(
    applied=st.integers(0, 500),
    snap=st.integers(0, 500),
    entries=st.integers(0, 100),
    nbytes=st.integers(0, 1000),
    applied_bytes=st.integers(0, 2000),
    pending=st.booleans(),
    asked=st.integers(0, 500),
)
def test_a_snapshot_is_due_exactly_when_a_threshold_is_passed(
    applied, snap, entries, nbytes, applied_bytes, pending, asked
):
    snap, asked = min(snap, applied), min(asked, applied)
    options = machine.Options(snapshot_entries=entries, snapshot_bytes=nbytes)
    state = replace(
        follower(2, 1, options=options), applied=applied, snapshot=LogId(1, snap) if snap else LogId(0, 0),
        applied_bytes=applied_bytes, snapshot_pending=pending, snapshot_asked_at=asked,
    )  # fmt: skip
    since = applied - max(snap, asked)  # counted from the newest snapshot, or the last ask if later
    expected = entries > 0 and not pending and since > 0 and (since >= entries or applied_bytes >= nbytes)
    assert machine.snapshot_due(state, 10.0) == expected


def test_a_failed_snapshot_is_retried_only_after_the_retry_pause():
    options = machine.Options(snapshot_entries=3, snapshot_retry_s=30.0)
    state = replace(follower(10, 10), options=options)
    state, ready = machine.step(state, Tick(), 1.0)
    assert ready.take_snapshot and state.snapshot_pending
    state, ready = machine.step(state, Tick(), 1.1)
    assert not ready.take_snapshot  # one at a time
    state, ready = machine.step(state, SnapshotTaken(None, 1), 2.0)
    assert not ready.take_snapshot and not state.snapshot_pending
    state, ready = machine.step(state, Tick(), 31.9)
    assert not ready.take_snapshot
    state, ready = machine.step(state, Tick(), 32.0)
    assert ready.take_snapshot


def test_a_snapshot_older_than_what_was_applied_at_the_ask_is_not_asked_again_at_once():
    """Regression: a pipelined shell applies only once the log writes are durable, so on a slow disk its
    database (what it snapshots) was at 12 when the core, at 20, asked. The core asked again at once, and
    the shell took the same snapshot again, over and over (the simulation recursed without end)."""
    state = replace(follower(30, 20), options=machine.Options(snapshot_entries=3))
    state, ready = machine.step(state, Tick(), 1.0)
    assert ready.take_snapshot and state.snapshot_asked_at == 20
    state, ready = machine.step(state, SnapshotTaken(LogId(2, 12), 5), 1.1)
    assert state.snapshot == LogId(2, 12) and not ready.take_snapshot
    state, ready = machine.step(state, Tick(), 1.2)
    assert not ready.take_snapshot
    state, ready = machine.step(state, Receive("c", Heartbeat(2, 23, 2, LogId(2, 30)), "cl"), 1.3)
    assert state.applied == 23 and ready.take_snapshot  # due again once 3 more were applied


def test_a_taken_snapshot_moves_the_first_index_forward_only():
    state = replace(follower(10, 10), options=machine.Options(snapshot_entries=3))
    state, _ = machine.step(state, Tick(), 1.0)
    state, _ = machine.step(state, SnapshotTaken(LogId(2, 9), 5), 1.1)
    assert state.snapshot == LogId(2, 9) and state.first_index == 5
    state, _ = machine.step(state, SnapshotTaken(LogId(2, 7), 3), 1.2)  # an older one, finished late
    assert state.snapshot == LogId(2, 9) and state.first_index == 5


@given(st.integers(0, 10_000), st.integers(-5, 500))
def test_compaction_keeps_the_trailing_entries_and_at_least_the_snapshots_own(index, trailing):
    upto = machine.compaction_point(index, machine.Options(snapshot_trailing=trailing))
    assert 0 <= upto <= max(0, index - 1)
    assert upto == max(0, index - max(1, trailing))


# --- leader: tail or snapshot -------------------------------------------------------------------------------


def leader_with_compacted_log(first_index: int, snapshot: LogId, trailing: int = 10_000) -> machine.State:
    """Node "c" leads epoch 3 of a log 1..40 whose durable part starts at ``first_index``."""
    entries = (Entry(0, 1, Kind.CONFIG, CONFIG.encode()), *(cmd(2, i) for i in range(2, 41)))
    hard = HardState(2, None, ((1, CONFIG),), "cl")
    options = machine.Options(keep_applied=4, snapshot_entries=0, snapshot_trailing=trailing)
    base = entries[35]
    state = machine.restore(
        "c", hard, base.id, entries[36:], 36, options, snapshot=snapshot, first_index=first_index
    )
    state, _ = machine.step(state, VIEW, 0.0)
    for t in range(1, 40):
        state, ready = machine.step(state, Tick(), t * 0.01)
        for send in ready.messages:
            if type(send.message).__name__ == "Prepare":
                promise = Promise(send.message.epoch, LogId(2, 5))
                state, _ = machine.step(state, Receive(send.to, promise, "cl"), t * 0.01)
        if state.role == machine.LEADER:
            return state
    raise AssertionError("no leader")


def behind(state: machine.State, hint: int, now: float) -> tuple[machine.State, object]:
    """Member "a" rejects the leader's first Append: its log matches up to ``hint`` at most."""
    epoch, rejected = state.hard.epoch, state.progress["a"].next - 1
    return machine.step(state, Receive("a", AppendReject(epoch, rejected, hint, 0), "cl"), now)


def offers_to(ready, peer: str = "a") -> list[LogId]:
    return [
        s.message.snapshot for s in ready.messages if s.to == peer and isinstance(s.message, SnapshotOffer)
    ]


def test_a_member_whose_next_entry_was_compacted_is_offered_the_snapshot_and_nothing_else():
    state = leader_with_compacted_log(first_index=30, snapshot=LogId(2, 32))
    state, ready = behind(state, 5, 1.0)
    assert offers_to(ready) == [LogId(2, 32)]
    assert [r for r in ready.read_log if r.peer == "a"] == []
    assert "a" in machine.status(state).snapshotting
    state, ready = machine.step(state, Tick(), 1.5)
    assert offers_to(ready) == []  # repeated only every snapshot_offer_s
    state, ready = machine.step(state, Tick(), 2.0)
    assert offers_to(ready) == [LogId(2, 32)]
    # Installed: it acknowledges the snapshot's index and gets the tail from the durable log.
    state, ready = machine.step(state, Receive("a", AppendAck(state.hard.epoch, 32, 0), "cl"), 2.1)
    assert "a" not in machine.status(state).snapshotting
    reads = [r for r in ready.read_log if r.peer == "a"]
    assert reads and reads[0].first == 32


@given(hint=st.integers(1, 35), trailing=st.integers(1, 40))
def test_a_member_further_behind_the_snapshot_than_the_trailing_entries_gets_it_though_the_log_has_them(
    hint, trailing
):
    """The log drops whole segments only, so it may hold every entry since the first: a member further
    below the newest snapshot than ``snapshot_trailing`` gets the snapshot anyway (read back a batch a round
    trip, a long history took a new node minutes); one within it gets the tail from the durable log."""
    state = leader_with_compacted_log(first_index=1, snapshot=LogId(2, 32), trailing=trailing)
    state, ready = behind(state, hint, 1.0)
    reads = [r.first for r in ready.read_log if r.peer == "a"]
    if 32 - hint > trailing:
        assert offers_to(ready) == [LogId(2, 32)] and reads == []
        assert "a" in machine.status(state).snapshotting
        # Installed: from the snapshot's index on it is within the trailing entries: the tail, no new offer.
        state, ready = machine.step(state, Receive("a", AppendAck(state.hard.epoch, 32, 0), "cl"), 1.1)
        assert offers_to(ready) == [] and [r.first for r in ready.read_log if r.peer == "a"] == [32]
    else:
        assert offers_to(ready) == [] and reads == [hint]


def test_a_member_at_or_above_the_first_index_gets_the_log_tail():
    state = leader_with_compacted_log(first_index=30, snapshot=LogId(2, 32))
    state, ready = behind(state, 30, 1.0)
    assert offers_to(ready) == []
    assert [r.first for r in ready.read_log if r.peer == "a"] == [30]


def test_after_an_install_with_no_trailing_entries_the_tail_starts_after_the_snapshot():
    """A node whose log starts right after its snapshot (it installed one) sends from there, naming the
    snapshot's entry as the previous one: it must not offer the snapshot again for ever."""
    state = leader_with_compacted_log(first_index=33, snapshot=LogId(2, 32))
    state, ready = behind(state, 32, 1.0)
    assert offers_to(ready) == []
    reads = [r for r in ready.read_log if r.peer == "a"]
    assert [r.first for r in reads] == [33]
    entries = tuple(cmd(2, i) for i in range(33, 36))
    state, ready = machine.step(state, LogRead(reads[0], entries), 1.1)
    appends = [s.message for s in ready.messages if s.to == "a" and isinstance(s.message, Append)]
    assert appends and appends[0].prev == LogId(2, 32) and appends[0].entries[0].index == 33


# --- follower: offers, fetches, installs --------------------------------------------------------------------


def test_an_offer_of_what_a_follower_already_committed_is_acknowledged_not_fetched():
    state = follower(12, 10)
    state, ready = machine.step(state, Receive("c", SnapshotOffer(2, LogId(2, 8)), "cl"), 1.0)
    assert ready.fetch_snapshot == ()
    assert [s.message for s in ready.messages] == [AppendAck(2, 10, 0)]


def test_an_offer_beyond_the_commit_index_is_fetched_from_the_offering_leader():
    state = follower(12, 10)
    state, ready = machine.step(state, Receive("c", SnapshotOffer(2, LogId(2, 50)), "cl"), 1.0)
    assert [(f.source, f.snapshot) for f in ready.fetch_snapshot] == [("c", LogId(2, 50))]
    assert state.leader == "c" and state.leader_contact_s == 1.0


def test_an_offer_from_an_old_epoch_is_answered_stale():
    state = follower(12, 10, epoch=4)
    state, ready = machine.step(state, Receive("b", SnapshotOffer(3, LogId(3, 50)), "cl"), 1.0)
    assert ready.fetch_snapshot == () and ready.install is None


def test_an_install_keeps_the_entries_above_a_matching_snapshot_entry():
    """Log matching: ours at the snapshot's index is the same entry, so the entries above it may be ones we
    acknowledged (a leader may have counted them): they are kept and written back after the reset."""
    state = follower(20, 5)
    new, ready = machine.step(state, SnapshotFetched("c", LogId(2, 15), CONFIG), 1.0)
    assert ready.install is not None and ready.install.snapshot == LogId(2, 15) and ready.install.keep_log
    # Never rewritten: a crash between a reset and a re-append would lose acknowledged entries.
    assert ready.append == () and ready.truncate_from is None
    assert new.base == LogId(2, 15) and new.commit == new.applied == 15 and new.last == LogId(2, 20)
    assert new.first_index == state.first_index and new.snapshot == LogId(2, 15)
    assert [s.message for s in ready.messages] == [AppendAck(2, 15, 0)]
    assert ready.apply == ()  # the database is replaced, not replayed


def test_an_install_drops_a_log_that_differs_at_the_snapshots_entry():
    state = follower(20, 5)
    new, ready = machine.step(state, SnapshotFetched("c", LogId(3, 15), CONFIG), 1.0)
    assert ready.install is not None and not ready.install.keep_log and ready.append == ()
    assert new.last == LogId(3, 15) and new.log == () and new.first_index == 16


def test_an_install_takes_the_snapshots_configuration():
    bigger = Config(frozenset({"a", "b", "c", "d"}))
    state = follower(8, 5)
    new, ready = machine.step(state, SnapshotFetched("c", LogId(2, 30), bigger), 1.0)
    assert new.config == bigger and ready.hard_state is not None and ready.hard_state.config == bigger


def test_a_leader_never_installs():
    state = leader_with_compacted_log(first_index=30, snapshot=LogId(2, 32))
    new, ready = machine.step(state, SnapshotFetched("a", LogId(2, 90), CONFIG), 1.0)
    assert ready.install is None and new.role == machine.LEADER


def test_entries_read_back_from_the_log_are_sent_one_batch_at_a_time():
    """Regression: a member catching up from the durable log got every entry of a read in one Append
    (64 entries of 1 MiB: a 64 MiB message, over the peer's frame limit, refused and resent for ever).
    Entries read from the disk are cut to one batch like entries sent from memory."""
    state = leader_with_compacted_log(first_index=1, snapshot=LogId(0, 0))
    state, ready = behind(state, 10, 1.0)
    (read,) = [r for r in ready.read_log if r.peer == "a"]
    big = tuple(Entry(2, i, Kind.COMMAND, b"x" * (600 << 10)) for i in range(read.first, read.last + 1))
    state, ready = machine.step(state, LogRead(read, big), 1.1)
    appends = [s.message for s in ready.messages if s.to == "a" and isinstance(s.message, Append)]
    assert len(appends) == 1
    sent = appends[0].entries
    assert len(sent) == 1  # two of 600 KiB would pass max_batch_bytes (1 MiB): at least one, never more
    assert appends[0].prev == big[0].id and sent[0] == big[1]
    assert state.progress["a"].next == sent[-1].index + 1  # the rest is read again from there


@given(sizes=st.lists(st.integers(0, 3 << 20), min_size=2, max_size=70))
def test_every_append_from_the_log_respects_the_batch_bounds(sizes):
    options = machine.Options()
    state = leader_with_compacted_log(first_index=1, snapshot=LogId(0, 0))
    state, ready = behind(state, 10, 1.0)
    (read,) = [r for r in ready.read_log if r.peer == "a"]
    count = min(len(sizes), read.last - read.first + 1)
    entries = tuple(Entry(2, read.first + i, Kind.COMMAND, b"y" * sizes[i]) for i in range(count))
    state, ready = machine.step(state, LogRead(read, entries), 1.1)
    for s in ready.messages:
        if isinstance(s.message, Append):
            sent = s.message.entries
            assert 1 <= len(sent) <= options.max_batch_entries
            assert len(sent) == 1 or sum(len(e.payload) for e in sent) <= options.max_batch_bytes
