"""The replication state machine: ``step(state, input, now) -> (state, Ready)``. Rules: see the package
docstring (``node/core/replication/__init__.py``); this module's comments say where each rule is enforced.

A step copies the frozen State into a ``_Step`` working object, applies one input, runs the timers
(``_maintain``: heartbeats, resends, campaigns, leases, membership, handover), hands committed entries to
the shell and freezes the result. The output order in ``Ready`` is the protocol: see ``messages.Ready``.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from node.core.replication.messages import (
    Append,
    AppendAck,
    AppendReject,
    Config,
    Entry,
    Fact,
    Fetch,
    FetchReply,
    FetchSnapshot,
    HardState,
    Heartbeat,
    HeartbeatAck,
    Input,
    InstallSnapshot,
    Kind,
    LogId,
    LogRead,
    Message,
    Persisted,
    Prepare,
    Promise,
    Read,
    ReadConfirmed,
    ReadLog,
    ReadRejected,
    Ready,
    Receive,
    Refuse,
    RemoveMember,
    Reply,
    Send,
    SnapshotFetched,
    SnapshotOffer,
    SnapshotTaken,
    Stale,
    Stop,
    Submit,
    SubmitAccepted,
    SubmitRejected,
    TakeOver,
    Tick,
    ViewChanged,
)
from node.core.slots import slot_builder

FOLLOWER, CANDIDATE, LEADER = "follower", "candidate", "leader"
NEVER = float("-inf")
NO_SNAPSHOT = LogId(0, 0)


@dataclass(frozen=True, slots=True)
class Options:
    """Timers and bounds. The lease is the failure-detection time of the replication layer: a leader
    without majority contact for ``lease_s`` stops being writable, and a voter that heard its leader within
    ``lease_s`` refuses other candidates. Defaults suit a LAN; the shell may pass its own."""

    heartbeat_s: float = 0.05  # leader -> every member; also carries the commit index to followers
    lease_s: float = 0.5  # > several heartbeats, so one lost heartbeat never costs the lease
    election_timeout_s: float = 0.5  # a campaign with no progress for this long is abandoned and retried
    resend_s: float = 0.15  # unacknowledged appends / fetches / prepares are sent again after this
    reap_timeout_s: float = 60.0  # a voter silent this long is removed through the log (>> node timeout)
    handover_timeout_s: float = 1.0  # a handover not done by then is abandoned; the leader writes again
    max_batch_entries: int = 64  # entries per Append / FetchReply
    max_batch_bytes: int = 1 << 20  # payload bytes per Append / FetchReply (at least one entry is sent)
    max_inflight: int = 8  # pipelined Appends per follower not yet acknowledged
    max_uncommitted: int = 4096  # leader's appended-but-uncommitted entries; beyond: Submit -> busy
    keep_applied: int = 256  # applied entries kept in memory for cheap catch-up; older ones via ReadLog
    # The shell sends Appends while its own log write runs and reports that write's end (``Persisted``);
    # a leader then counts its own copy toward the majority only once reported. False: the shell finishes
    # each Ready's writes before sending anything, and a leader counts its whole log. See messages.Ready.
    pipelined: bool = False
    # Snapshots (see ``snapshot_due``): taken when this many entries, or this many payload bytes, were applied
    # since the newest one (0 entries: never); the log then keeps ``snapshot_trailing`` entries below the
    # snapshot (>= 1), so a follower only a little behind still gets the tail instead of a whole snapshot.
    snapshot_entries: int = 50_000
    snapshot_bytes: int = 256 << 20
    snapshot_trailing: int = 10_000
    snapshot_offer_s: float = 1.0  # an offer not answered by an install is repeated this often
    snapshot_retry_s: float = 30.0  # after a failed snapshot (disk full), the next try waits this long


@dataclass(frozen=True, slots=True)
class Progress:
    """The leader's view of one member's log."""

    next: int  # next index to send
    match: int = 0  # highest index known to be durable there and equal to ours
    inflight: int = 0  # Appends with entries sent and not yet acknowledged
    last_ack_s: float = NEVER  # any answer in this epoch (lease, reaping, handover readiness)
    last_progress_s: float = NEVER  # last time match moved or a batch was sent from a clean state
    acked_seq: int = 0  # highest heartbeat round it answered (linearizable reads)
    probing: bool = False  # after a reject: one Append at a time until an ack says where logs match
    reading: bool = False  # a ReadLog for it is outstanding
    offered_s: float = NEVER  # a SnapshotOffer was last sent then (NEVER: no offer stands)


@dataclass(frozen=True, slots=True)
class Campaign:
    epoch: int
    started_s: float  # moved forward on progress; a campaign stalled for election_timeout_s is dropped
    handover: bool
    promises: tuple[tuple[str, LogId], ...] = ()
    phase: str = "prepare"  # "prepare" | "fetch"
    donor: str | None = None
    fetched_to: int = 0
    sent_s: float = NEVER


@dataclass(frozen=True, slots=True)
class PendingRead:
    read_id: str
    index: int
    seq: int
    at_s: float


@dataclass(frozen=True, slots=True)
class State:
    me: str
    options: Options
    hard: HardState
    base: LogId  # the entry just below the in-memory window (its payload is only on disk)
    log: tuple[Entry, ...]  # entries base.index+1 .. last
    commit: int
    applied: int  # handed to the shell in some Ready
    role: str = FOLLOWER
    leader: str | None = None  # leader of hard.epoch that this node heard from
    leader_contact_s: float = NEVER
    leader_commit: int = 0  # follower: the commit index the leader reported last (at leader_contact_s)
    view: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    highest_seen: int = 0  # highest epoch heard of (volatile): where the next campaign aims
    stopping: bool = False
    verified: int = 0  # follower: highest index known equal to the current leader's log
    campaign: Campaign | None = None
    progress: Mapping[str, Progress] = field(default_factory=lambda: MappingProxyType({}))
    seq: int = 0
    heartbeat_sent_s: float = NEVER
    epoch_start: int = 0  # index of this leader's EpochStart entry
    reads: tuple[PendingRead, ...] = ()
    handover_to: str | None = None
    handover_since_s: float = NEVER  # when writes stopped for the handover (NEVER: still catching it up)
    handover_retry_s: float = NEVER  # after an abandoned handover, none before this time
    takeover_sent_s: float = NEVER
    writable: bool = False
    departing: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # identity -> until
    durable: int = 0  # pipelined leader: its own log is durable up to here (Persisted of its own epoch)
    snapshot: LogId = LogId(0, 0)  # the newest snapshot in this node's store (index 0: none)
    first_index: int = 1  # the durable log starts here; entries below were compacted into ``snapshot``
    snapshot_pending: bool = False  # a take_snapshot was asked and its SnapshotTaken has not come back
    snapshot_retry_s: float = NEVER  # after a failed snapshot: none before this time
    # ``applied`` when the last take_snapshot was asked. The shell snapshots what its database holds, which
    # may be less (a pipelined shell applies only once the log writes are durable): a snapshot that comes
    # back older is not asked again before more is applied, so a slow disk does not get copy after copy.
    snapshot_asked_at: int = 0
    applied_bytes: int = 0  # payload bytes applied since ``snapshot`` (a threshold; 0 again after restarts)
    # The node ID each member was last seen healthy at (volatile; members and the view only): a voter gone
    # from the view whose node ID a new identity now answers at was replaced (see maintain_membership).
    last_ids: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # Leader choice when members disagree on who is a voter (volatile; see _campaign_due): since when this
    # voter defers to a higher-ID healthy voter while it hears no leader (NEVER: it does not defer), and
    # when it last promised a new epoch to another candidate.
    deferred_s: float = NEVER
    promised_s: float = NEVER

    @property
    def config(self) -> Config:
        return self.hard.config

    @property
    def last(self) -> LogId:
        return self.log[-1].id if self.log else self.base


# --- construction -------------------------------------------------------------------------------------------


def bootstrap(
    me: str, voters: frozenset[str], options: Options | None = None, cluster: str = ""
) -> tuple[State, Ready]:
    """A brand-new cluster's first members: every one of them starts with the same committed entry 1 (the
    initial Config), so their logs agree from the start. The shell persists the Ready like any other.
    ``cluster`` names the new cluster (the shell draws it at random: the core reads no randomness)."""
    config = Config(frozenset(voters))
    first = Entry(0, 1, Kind.CONFIG, config.encode())
    hard = HardState(0, None, ((1, config),), cluster)
    state = State(me, options or Options(), hard, LogId(0, 0), (first,), commit=1, applied=1, verified=1)
    return state, Ready(hard_state=hard, append=(first,), apply=(first,))


def joiner(me: str, options: Options | None = None) -> State:
    """A node with an empty log that waits to be added (as a learner) by a leader."""
    return State(me, options or Options(), HardState(), LogId(0, 0), (), commit=0, applied=0)


def restore(
    me: str,
    hard: HardState,
    base: LogId,
    entries: tuple[Entry, ...],
    applied: int,
    options: Options | None = None,
    *,
    snapshot: LogId = NO_SNAPSHOT,
    first_index: int = 1,
) -> State:
    """Restart from durable state: the hard state, the log above ``base`` (base.index <= applied, the state
    machine's durably applied index) and the applied index. Entries at or below ``applied`` are committed;
    the rest wait for a leader. The Config history above ``base`` is re-derived from the log, so a crash
    between the hard-state write and the log write cannot leave them disagreeing."""
    if base.index > applied:
        raise ValueError("base must not be above the applied index")
    if entries and entries[0].index != base.index + 1:
        raise ValueError("entries must start right after base")
    if first_index > base.index + 1:
        raise ValueError("the log must hold every entry above base")
    below = [c for c in hard.configs if c[0] <= base.index]
    configs = list(below[-1:] or hard.configs[:1])
    configs += [(e.index, Config.decode(e.payload)) for e in entries if e.kind is Kind.CONFIG]
    # In index order: after an install cut short (hard state written with the snapshot's configuration,
    # database not replaced yet) the hard state's one is newer than configurations in the log below it.
    configs.sort(key=lambda c: c[0])
    hard = replace(hard, configs=tuple(configs))
    return State(
        me,
        options or Options(),
        hard,
        base,
        tuple(entries),
        commit=applied,
        applied=applied,
        verified=applied,
        snapshot=snapshot,
        first_index=first_index,
    )


def legacy_cluster(first: Entry) -> str:
    """The cluster of a log written before clusters were named, from its entry 1 (the bootstrap Config,
    the same on every member of that cluster, so all of them derive the same name); "" if ``first`` is
    not such an entry."""
    if first.index != 1 or first.kind is not Kind.CONFIG:
        return ""
    return "log1-" + hashlib.sha256(first.payload).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Status:
    """What /cluster/status reports from the replication core."""

    role: str
    epoch: int
    leader: str | None  # the leader of ``epoch`` this node follows (itself when leading)
    writable: bool
    commit_index: int
    applied_index: int
    last_index: int
    voters: frozenset[str]
    learners: frozenset[str]
    lag: Mapping[str, int]  # leader only: entries each member is behind this node's log
    # Follower: when (the ``now`` of the step) it last heard from the leader of ``epoch``, and the commit
    # index that leader reported then; what a bounded-staleness read (``freshness``) is checked against.
    leader_contact_s: float = NEVER
    leader_commit: int = 0
    removed: frozenset[str] = frozenset()  # identities an operator removed that are not re-added yet
    snapshot: LogId = LogId(0, 0)  # newest snapshot in the store
    first_index: int = 1  # first entry still in the log
    snapshotting: frozenset[str] = frozenset()  # leader: members offered a snapshot and not caught up yet


def status(state: State) -> Status:
    last = state.last.index
    lag = {peer: max(0, last - p.match) for peer, p in state.progress.items()} if state.role == LEADER else {}
    return Status(
        state.role,
        state.hard.epoch,
        state.leader,
        state.writable,
        state.commit,
        state.applied,
        last,
        state.config.voters,
        state.config.learners,
        MappingProxyType(lag),
        state.leader_contact_s,
        state.leader_commit,
        state.config.removed,
        state.snapshot,
        state.first_index,
        frozenset(peer for peer, p in state.progress.items() if p.offered_s != NEVER)
        if state.role == LEADER
        else frozenset(),
    )


# --- quorum arithmetic (module-level so a test can break it on purpose and see the invariants fail) -------


def quorum(config: Config) -> int:
    return config.quorum


def compaction_point(snapshot_index: int, options: Options) -> int:
    """The log may drop entries up to here once the snapshot at ``snapshot_index`` is durable: it keeps
    ``snapshot_trailing`` entries (at least the snapshot's own entry, so the entry after it always has its
    predecessor at hand) for members only a little behind."""
    return max(0, snapshot_index - max(1, options.snapshot_trailing))


def snapshot_due(state: State | _Step, now: float) -> bool:
    """Whether this node should take a snapshot now: enough was applied since the newest one, none is being
    taken, and the last failure is old enough. Every member decides for itself (snapshots are local)."""
    o = state.options
    if o.snapshot_entries <= 0 or state.snapshot_pending or now < state.snapshot_retry_s:
        return False
    since = state.applied - max(state.snapshot.index, state.snapshot_asked_at)
    return since > 0 and (since >= o.snapshot_entries or state.applied_bytes >= o.snapshot_bytes)


def pick_donor(me: str, mine: LogId, promises: tuple[tuple[str, LogId], ...]) -> tuple[str, LogId]:
    """The most advanced log among the promisers (self included, preferred on ties): by the up-to-date
    order it holds every committed entry (any committed entry is on a majority, which meets this one)."""
    best = (me, mine)
    for peer, last in promises:
        if last > best[1]:
            best = (peer, last)
    return best


# --- rules shared by the step and next_deadline (on a State or a _Step: the same fields) -----------------


def _healthy(s: State | _Step, who: str) -> bool:
    """In the view and not shutting down (a leaving leader told us so in its TakeOver)."""
    return who in s.view and who not in s.departing


def _highest_healthy_voter(s: State | _Step) -> str | None:
    voters = [v for v in s.config.voters if _healthy(s, v) or v == s.me]
    return max(voters, key=lambda v: (s.view.get(v, -1), v)) if voters else None


def _leader_alive(s: State | _Step, now: float) -> bool:
    return s.leader not in (None, s.me) and now - s.leader_contact_s < s.options.lease_s


def _deferring(s: State | _Step, now: float) -> bool:
    """A voter that would campaign but for a higher-ID healthy voter: it waits for that one to lead."""
    return (
        s.role != LEADER
        and s.campaign is None
        and not s.stopping
        and s.me in s.config.voters
        and not _leader_alive(s, now)
        and _highest_healthy_voter(s) != s.me
    )


def _deference_s(s: State | _Step) -> float:
    """How long a voter defers before it campaigns itself: a lease plus one election timeout per node of
    its view ranked above it. Ranked in the view, not among the voters of its configuration (which is
    what the members disagree on), so two deferring voters with one view never wait equally long and
    campaign against each other: the next in rank tries first, the others promise to it. The highest-ID
    voter, when it can win, leads within an election timeout, well before this."""
    mine = (s.view.get(s.me, -1), s.me)
    above = sum(1 for who, nid in s.view.items() if _healthy(s, who) and (nid, who) > mine)
    return s.options.lease_s + above * s.options.election_timeout_s


def _letting_campaign_run(s: State | _Step, now: float) -> bool:
    """We promised our epoch to another candidate, still healthy, less than an election timeout ago."""
    candidate = s.hard.promised_to
    return (
        candidate not in (None, s.me)
        and _healthy(s, candidate)
        and now - s.promised_s < s.options.election_timeout_s
    )


def _campaign_due(s: State | _Step, now: float) -> bool:
    """A non-leader without a campaign starts one: it is the highest healthy voter and no leader is alive
    (a live leader hands over to it, planned, instead of being deposed); or it has deferred to a higher
    one for ``_deference_s`` and still hears no leader. Not within an election timeout of promising its
    epoch to another candidate that is still healthy: that campaign runs first.

    Why deference must end (liveness): who is a voter is read from each node's own log, and the logs
    disagree about a CONFIG entry until it is committed and delivered. A learner promoted by an entry that
    reached some members but not itself (it crashed, or lost the Append, before the leader died) is the
    highest-ID voter for them, and a learner for itself: it never campaigns, and without this rule they
    would wait for it for ever. Or the highest voter campaigns and cannot win (the voters it needs hold an
    older configuration and a log ahead of its own, ``may_lead``). So a deferring voter campaigns itself
    in the end, the next in rank first. The pause after a promise keeps the candidates from deposing each
    other: the highest voter, refused by the others, would otherwise campaign again at once and end every
    campaign of the one that can win.

    Why it is safe: only who campaigns changes. A candidate still needs promises from a majority of the
    voters of its configuration, one per epoch, refused within a live leader's lease (so a leader that
    merely cannot be heard by this node is not deposed), and takes every entry it lacks from the most
    advanced promiser before it serves; so it never leads behind. Once it leads, the highest-ID healthy
    voter gets the lead by the planned handover (after it has the whole log, as a voter of the leader's
    configuration), so the documented leader rule holds again."""
    if _leader_alive(s, now) or s.stopping or s.me not in s.config.voters:
        return False
    if _letting_campaign_run(s, now):
        return False
    if _highest_healthy_voter(s) == s.me:
        return True
    return s.deferred_s != NEVER and now - s.deferred_s >= _deference_s(s)


def _handover_target(s: State | _Step, now: float) -> str | None:
    """The voter a leader hands over to now (see maintain_handover): the highest-ID voter that is healthy
    and answering, if it outranks this node (any, when stopping); None outside the retry pause's end."""
    if now < s.handover_retry_s:
        return None
    # One pass, no list (this runs twice per leader step: maintain_handover and next_deadline). Unless
    # stopping, only voters that outrank this node can be the answer: the best answering voter is returned
    # only if it outranks us, and then it is also the best of those that do. Ranks (view ID, identity) are
    # unique, so the order of ``voters`` cannot change the result.
    me, view, progress, departing = s.me, s.view, s.progress, s.departing
    lease_s = s.options.lease_s
    best: str | None = None
    best_rank = None if s.stopping else (view.get(me, -1), me)
    for v in s.hard.configs[-1][1].voters:  # s.config.voters, without its two property calls
        nid = view.get(v)
        if nid is None or v == me or v in departing:  # not healthy (or ourselves)
            continue
        rank = (nid, v)
        if best_rank is not None and rank <= best_rank:
            continue
        p = progress.get(v)
        if p is not None and now - p.last_ack_s <= lease_s:
            best, best_rank = v, rank
    return best


def _reachable_voters(s: State | _Step, now: float) -> int:
    """What ``_Step.reachable_voters`` counts (from scratch; the step keeps the result while it holds)."""
    count = 0
    me, view = s.me, s.view
    leading = s.role == LEADER
    progress, lease_s = s.progress, s.options.lease_s
    for v in s.hard.configs[-1][1].voters:  # s.config.voters, without its property calls
        if v == me:
            count += 1
        elif v in view:
            if not leading:
                count += 1
            else:
                p = progress.get(v)
                count += p is not None and now - p.last_ack_s <= lease_s
    return count


def _read_confirmed(s: State | _Step, r: PendingRead) -> bool:
    """A majority answered a heartbeat round sent after the read arrived, and the view change is over."""
    cfg = s.config
    votes = sum(1 for v in cfg.voters if v == s.me or (v in s.progress and s.progress[v].acked_seq >= r.seq))
    return votes >= quorum(cfg) and s.commit >= s.epoch_start


# --- timers -------------------------------------------------------------------------------------------------


def next_deadline(state: State, now: float) -> float:
    """The earliest time (at or after ``now``, the time of the step that made ``state``) at which a ``Tick``
    could change anything; ``inf`` if none. Before it, a Tick is a no-op (the same State, an empty Ready):
    every timer of ``_Step.maintain`` compares the step's time with a time in the State, and this lists
    them all. So a shell need not tick on a fixed period: ticking at this time (or later) behaves as ticking
    all along. The simulation checks that every Tick before it changes nothing.

    Each timer is a pair (x, d) of a comparison ``now - x`` against ``d`` that may still change its result
    (``now - x <= d``, written as the step writes it, so float rounding agrees with the step); it is due at
    ``x + d``, given a little early (``_EARLY_S``) so rounding never makes the tick late."""
    o = state.options
    # Work a step leaves for the next one: a campaign that timed out is only retried by the next step; a
    # membership change made by maintain_membership can change the handover target and the read quorum
    # (both checked before it).
    leading = state.role == LEADER
    if leading:
        if _handover_target(state, now) != state.handover_to or (
            state.reads and any(_read_confirmed(state, r) for r in state.reads)
        ):
            return now
    elif state.campaign is None and _campaign_due(state, now):
        return now
    # The earliest due time, kept as it goes (the shell asks this once per idle loop round: no list of
    # pairs). ``_due`` keeps the step's comparison and sum, so the result is the same float.
    due = float("inf")
    for until_s in state.departing.values():
        due = _due(due, now, until_s, 0.0)  # a departing mark expires
    # snapshot_due: the pause after a failed snapshot ends (``_due`` written out: asked on every loop round)
    x = state.snapshot_retry_s
    if now - x <= 0.0 and x + 0.0 < due:
        due = x + 0.0
    if leading:
        x, d = state.heartbeat_sent_s, o.heartbeat_s  # heartbeats, resends, snapshot offers (``_due``)
        if now - x <= d and x + d < due:
            due = x + d
        lease_s, reap_s = o.lease_s, o.reap_timeout_s
        for p in state.progress.values():
            # The lease of each member's last answer (quorum, writable, handover target, replacement)
            # and its reaping.
            x = p.last_ack_s
            if now - x <= lease_s and x + lease_s < due:
                due = x + lease_s
            if now - x <= reap_s and x + reap_s < due:
                due = x + reap_s
        for r in state.reads:
            due = _due(due, now, r.at_s, o.lease_s)  # a read not confirmed within the lease
        x = state.handover_retry_s  # ``_due`` written out
        if now - x <= 0.0 and x + 0.0 < due:
            due = x + 0.0
        if state.handover_to is not None:
            due = _due(due, now, state.handover_since_s, o.handover_timeout_s)
            due = _due(due, now, state.takeover_sent_s, o.heartbeat_s)
    elif state.campaign is not None:
        due = _due(due, now, state.campaign.started_s, o.election_timeout_s)
        due = _due(due, now, state.campaign.sent_s, o.resend_s)
    elif _leader_alive(state, now):
        due = _due(due, now, state.leader_contact_s, o.lease_s)  # the leader's lease runs out: campaign
    else:
        due = _due(due, now, state.deferred_s, _deference_s(state))  # deferred long enough: campaign
        due = _due(due, now, state.promised_s, o.election_timeout_s)  # the pause after a promise ends
    return max(now, due - _EARLY_S) if due != float("inf") else float("inf")


def _due(due: float, now: float, x: float, d: float) -> float:
    """``min(due, x + d)`` if the timer (x, d) may still change its comparison at or after ``now``."""
    if now - x <= d and x + d < due:
        return x + d
    return due


_EARLY_S = 1e-6


# --- the step -----------------------------------------------------------------------------------------------


def step(state: State, inp: Input, now: float) -> tuple[State, Ready]:
    s = _Step(state, now)
    # A leader's inputs first (acks, Persisted, Submit, Tick): the input classes are unrelated (each
    # derives from object alone), so the order of the tests cannot change which branch an input takes.
    if isinstance(inp, Receive):
        cluster = inp.cluster
        # same_cluster's first test (the same cluster, or none named), without the call when it holds.
        if not cluster or cluster == s.hard.cluster or s.same_cluster(inp.sender, inp.message, cluster):
            s.receive(inp.sender, inp.message)
    elif isinstance(inp, Persisted):
        s.persisted(inp.last)
    elif isinstance(inp, Submit):
        s.submit(inp)
    elif isinstance(inp, Tick):
        pass
    elif isinstance(inp, ViewChanged):
        s.view = MappingProxyType(dict(inp.healthy))
        members = s.hard.config.members
        kept = {who: nid for who, nid in s.last_ids.items() if who in members and who not in inp.healthy}
        s.last_ids = MappingProxyType({**kept, **inp.healthy})
    elif isinstance(inp, Read):
        s.read(inp)
    elif isinstance(inp, LogRead):
        s.log_read(inp)
    elif isinstance(inp, RemoveMember):
        s.remove_member(inp)
    elif isinstance(inp, SnapshotTaken):
        s.snapshot_taken(inp)
    elif isinstance(inp, SnapshotFetched):
        s.snapshot_fetched(inp)
    elif isinstance(inp, Stop):
        s.stopping = True
        s.fact("replication_stopping")
        if s.role == CANDIDATE:
            s.step_down("stopping")
    else:  # pragma: no cover - the union is closed
        raise TypeError(f"unknown input {inp!r}")
    s.maintain()
    return s.finish()


_ACKS = (AppendAck, AppendReject, HeartbeatAck)
_NOTHING = Ready()  # the Ready of a step with nothing to do (frozen: one instance serves every such step)
_STATE_FIELDS = tuple(State.__dataclass_fields__)
_state_values = operator.attrgetter(*_STATE_FIELDS)  # every State field of an object, in field order
_LAST_ACK = operator.attrgetter("last_ack_s")


# Every field, in field order, set through the slots (node.core.slots): the callers pass State's own
# attrgetter or a literal tuple checked by test_direct_constructor_calls_follow_the_field_order.
_new_state: Callable[[Sequence[object]], State] = slot_builder(State)
_new_ready: Callable[[Sequence[object]], Ready] = slot_builder(Ready)
_new_progress: Callable[[Sequence[object]], Progress] = slot_builder(Progress)


class _Step:
    """Mutable working copy of one State for the duration of one step."""

    def __init__(self, st: State, now: float) -> None:
        self.st = st
        self.now = now
        self.o = st.options
        # Every State field, in one C-level copy (a setattr/getattr loop was a fifth of a step).
        self.__dict__.update(zip(_STATE_FIELDS, _state_values(st), strict=True))
        self.progress = dict(st.progress)
        self.departing = dict(st.departing)
        self.log: tuple[Entry, ...] | list[Entry] = st.log  # copied on first write (it can hold thousands)
        self.dirty: int | None = None  # lowest log index changed in this step
        self.out_messages: list[Send] = []
        self.out_read_log: list[ReadLog] = []
        self.out_apply: list[Entry] = []
        self.out_replies: list[Reply] = []
        self.out_facts: list[Fact] = []
        self.out_install: InstallSnapshot | None = None
        self.out_take_snapshot = False
        self.out_fetch: list[FetchSnapshot] = []
        # reachable_voters, computed once for as long as what it reads is unchanged (see there).
        self._reachable_key: tuple[HardState, Mapping[str, int], str] | None = None
        self._reachable = 0
        self._no_quorum: str | None = None

    # ---- log helpers

    def writable_log(self) -> list[Entry]:
        if not isinstance(self.log, list):
            self.log = list(self.log)
        return self.log

    @property
    def last_index(self) -> int:
        return self.log[-1].index if self.log else self.base.index

    @property
    def last_id(self) -> LogId:
        return self.log[-1].id if self.log else self.base

    @property
    def config(self) -> Config:
        return self.hard.configs[-1][1]  # HardState.config, without a second property call (~9 per step)

    def epoch_at(self, index: int) -> int | None:
        if index == 0:
            return 0
        if index == self.base.index:
            return self.base.epoch
        if index == self.snapshot.index:
            return self.snapshot.epoch
        offset = index - self.base.index - 1
        if 0 <= offset < len(self.log):
            return self.log[offset].epoch
        return None

    def entries_from(self, first: int) -> list[Entry]:
        """In-memory entries first.. limited by the batch bounds (at least one entry)."""
        return self.bounded(self.log, first - self.base.index - 1)

    def bounded(self, entries: tuple[Entry, ...] | list[Entry], start: int = 0) -> list[Entry]:
        """``entries[start:]`` cut to one batch: at most max_batch_entries and max_batch_bytes of payload
        (at least one entry). Every Append and FetchReply is one batch, whether its entries come from
        memory or from the disk, so a member catching up on large entries never gets one huge message."""
        out: list[Entry] = []
        size = 0
        for i in range(start, len(entries)):
            e = entries[i]
            if out and (
                len(out) >= self.o.max_batch_entries or size + len(e.payload) > self.o.max_batch_bytes
            ):
                break
            out.append(e)
            size += len(e.payload)
        return out

    def truncate(self, index: int) -> None:
        # The central safety guard: a committed entry is never removed.
        if index <= self.commit:
            raise AssertionError(f"refusing to truncate committed entry {index} (commit {self.commit})")
        del self.writable_log()[index - self.base.index - 1 :]
        self.dirty = index if self.dirty is None else min(self.dirty, index)
        configs = tuple(c for c in self.hard.configs if c[0] < index)
        if configs != self.hard.configs:
            self.hard = replace(self.hard, configs=configs)
        self.fact("log_truncated", from_index=index)

    def append(self, entry: Entry) -> None:
        self.append_all((entry,))

    def append_all(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Append each entry in turn, each after the last one; the lookups done once per batch, not per entry:
        a follower appends every entry it receives through here."""
        log = self.writable_log()
        last = self.last_index
        first = None
        for entry in entries:
            if entry.index != last + 1:
                raise AssertionError(f"append of {entry.index} after {last}")
            log.append(entry)
            last = entry.index
            if first is None:
                first = last
                self.dirty = first if self.dirty is None else min(self.dirty, first)
            if entry.kind is Kind.CONFIG:
                self.hard = replace(
                    self.hard, configs=(*self.hard.configs, (entry.index, Config.decode(entry.payload)))
                )

    def committed_conflict(self, entries: tuple[Entry, ...] | list[Entry]) -> int | None:
        """The first index at or below our commit where ``entries`` differ from our (in-memory) log. A real
        leader's committed entries equal ours, so this means another cluster's history (two separately
        bootstrapped clusters) or a damaged log: such a message must change nothing."""
        for e in entries:
            if e.index > self.commit:
                break
            offset = e.index - self.base.index - 1
            if 0 <= offset < len(self.log) and self.log[offset] != e:
                return e.index
        return None

    def merge(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Make our log agree with ``entries`` (contiguous, from a log of the current epoch's leader):
        skip what we have, truncate at the first divergence (never at or below commit), append the rest.
        The caller has checked ``committed_conflict`` first."""
        for i, e in enumerate(entries):
            if e.index <= self.commit:
                continue
            if e.index <= self.last_index:
                if self.epoch_at(e.index) == e.epoch:
                    continue
                self.truncate(e.index)
            self.append_all(entries[i:])
            return

    # ---- output helpers

    def send(self, to: str, message: Message) -> None:
        self.out_messages.append(Send(to, message, self.hard.cluster))

    def fact(self, event: str, **fields: object) -> None:
        self.out_facts.append(Fact(event, tuple(fields.items())))

    def set_epoch(self, epoch: int, promised_to: str | None) -> None:
        self.hard = replace(self.hard, epoch=epoch, promised_to=promised_to)
        self.highest_seen = max(self.highest_seen, epoch)

    # ---- views and quorum

    def node_id(self, who: str) -> int:
        return self.view.get(who, -1)

    def healthy(self, who: str) -> bool:
        return _healthy(self, who)

    def highest_healthy_voter(self) -> str | None:
        return _highest_healthy_voter(self)

    def reachable_voters(self) -> int:
        """Voters this node can count on now: itself, plus (as leader) voters healthy in the view that
        answered within the lease, or (otherwise) voters healthy in the view.

        Asked two or three times per step (submit, maintain_leader, maintain), so the count is kept while
        what it reads is unchanged: the configuration (in ``hard``, replaced whenever it changes), the view
        (replaced, never mutated), the role, and the members' ``last_ack_s``. Only ``on_ack`` changes a
        ``last_ack_s`` of a member already in ``progress`` (and clears the key); members enter and leave
        ``progress`` only with a configuration or role change. ``now`` is fixed for the step."""
        key = self._reachable_key
        if key is None or key[0] is not self.hard or key[1] is not self.view or key[2] != self.role:
            self._count_reachable()
        return self._reachable

    def no_quorum_reason(self) -> str | None:
        key = self._reachable_key
        if key is None or key[0] is not self.hard or key[1] is not self.view or key[2] != self.role:
            self._count_reachable()
        return self._no_quorum

    def _count_reachable(self) -> None:
        """Count the reachable voters from scratch and keep the count and no_quorum_reason's answer."""
        reachable = _reachable_voters(self, self.now)
        cfg = self.config
        self._reachable = reachable
        self._no_quorum = (
            None
            if reachable >= quorum(cfg)
            else f"no quorum: {reachable} of {len(cfg.voters)} voters reachable"
        )
        self._reachable_key = (self.hard, self.view, self.role)

    # ---- role changes

    def step_down(self, reason: str) -> None:
        if self.role == LEADER:
            self.fact("leader_stepped_down", epoch=self.hard.epoch, reason=reason)
            for r in self.reads:
                self.out_replies.append(ReadRejected(r.read_id, "not-leader", f"leadership lost: {reason}"))
        elif self.role == CANDIDATE:
            self.fact(
                "campaign_abandoned", epoch=self.campaign.epoch if self.campaign else None, reason=reason
            )
        self.role = FOLLOWER
        self.campaign = None
        self.progress = {}
        self.reads = ()
        self.handover_to = None
        self.handover_since_s = NEVER
        self.verified = self.commit

    def adopt(self, epoch: int, leader: str | None) -> None:
        """A higher epoch exists (its leader wrote to us, or a peer told us): join it. The epoch is durable
        before anything we send in reply (Ready order), so we never promise it to someone else later."""
        self.step_down(f"epoch {epoch} seen")
        if epoch > self.hard.epoch:
            self.set_epoch(epoch, None)
        self.leader = leader
        self.fact("epoch_adopted", epoch=epoch, leader=leader)

    # ---- inputs

    def same_cluster(self, sender: str, m: Message, cluster: str) -> bool:
        """Whether a message may be read at all: never one from another cluster (its epochs and indices
        mean other entries). A node without a cluster joins the one of the first leader it hears (an Append
        or a Heartbeat; nothing else from a node of a cluster is meant for it), durably (hard state) before
        it answers. From then on another cluster's leader is not heard, and the formation rules
        (``formation``) move this node later if its cluster must dissolve."""
        mine = self.hard.cluster
        if not cluster or cluster == mine:
            return True
        if mine:
            self.fact("foreign_cluster", sender=sender, cluster=cluster)
            return False
        if not isinstance(m, Append | Heartbeat | SnapshotOffer):
            return False  # only a leader's word makes a node without a cluster join one
        self.hard = replace(self.hard, cluster=cluster)
        self.fact("cluster_joined", cluster=cluster, leader=sender)
        return True

    def receive(self, sender: str, m: Message) -> None:
        epoch = self.hard.epoch
        if isinstance(m, Prepare):
            self.on_prepare(sender, m)
            return
        self.highest_seen = max(self.highest_seen, m.epoch)
        if m.epoch < epoch:
            # Lower epochs change nothing; requests are told the current epoch so old leaders step down.
            if isinstance(m, Append | Heartbeat | Fetch | TakeOver):
                self.send(sender, Stale(epoch))
            return
        # A leader's most frequent input goes straight to on_ack (none of the branches below is about acks).
        if isinstance(m, _ACKS):
            if m.epoch == epoch:
                self.on_ack(sender, m)
            return  # a higher epoch: answers to requests we never sent in that epoch
        if isinstance(m, SnapshotOffer) and self.from_donor(sender, m.epoch):
            c = self.campaign
            assert c is not None
            self.campaign = replace(c, started_s=self.now)
            self.fetch_snapshot(sender, m.snapshot)
            return
        if isinstance(m, SnapshotOffer) and m.epoch == epoch and self.hard.promised_to == self.me:
            # We took this epoch, so only we lead it: an offer in it is our donor's, late or duplicated
            # after our view change moved on (it is no leader's word, and must not make us follow it).
            return
        if isinstance(m, Append | Heartbeat | SnapshotOffer):
            if self.handover_candidate_of(sender, m.epoch):
                pass  # the leader that asked us to take over, still in its epoch: keep the campaign
            elif m.epoch > epoch or self.role != FOLLOWER:
                if m.epoch == epoch and self.role == LEADER:  # pragma: no cover - two leaders in one epoch
                    raise AssertionError(f"two leaders in epoch {epoch}: {self.me} and {sender}")
                self.adopt(m.epoch, sender)
            if self.leader != sender:
                self.leader = sender
                self.verified = self.commit
                self.leader_commit = 0
                self.fact("following", epoch=m.epoch, leader=sender)
            self.leader_contact_s = self.now
            if not isinstance(m, SnapshotOffer):  # messages of one leader may be reordered: the highest
                self.leader_commit = max(self.leader_commit, m.commit)
            if isinstance(m, Append):
                self.on_append(sender, m)
            elif isinstance(m, SnapshotOffer):
                self.on_snapshot_offer(sender, m)
            else:
                if m.prev.index > self.verified and self.epoch_at(m.prev.index) == m.prev.epoch:
                    self.verified = m.prev.index  # log matching: our prefix up to it is the leader's
                self.commit_to(min(m.commit, self.verified))
                self.send(sender, HeartbeatAck(m.epoch, m.seq))
        elif isinstance(m, Stale):
            if m.epoch > epoch:
                self.adopt(m.epoch, None)
        elif isinstance(m, Promise):
            self.on_promise(sender, m)  # for a campaign epoch, which is above ours until it is taken
        elif isinstance(m, Refuse):
            self.highest_seen = max(self.highest_seen, m.promised)
        elif m.epoch > epoch:
            return  # answers to requests we never sent in that epoch
        elif isinstance(m, AppendAck | AppendReject | HeartbeatAck):
            self.on_ack(sender, m)
        elif isinstance(m, Fetch):
            self.on_fetch(sender, m)
        elif isinstance(m, FetchReply):
            self.on_fetch_reply(sender, m)
        elif isinstance(m, TakeOver):
            if m.leaving:
                self.departing[sender] = self.now + 10 * self.o.lease_s
            if sender == self.leader and self.role == FOLLOWER and self.me in self.config.voters:
                if not self.stopping and self.campaign is None:
                    self.fact("takeover_requested", epoch=m.epoch, by=sender)
                    self.start_campaign(handover=True)

    def from_donor(self, sender: str, epoch: int) -> bool:
        """A message of our own campaign's view change, from the donor we fetch entries from."""
        c = self.campaign
        return (
            self.role == CANDIDATE
            and c is not None
            and c.phase == "fetch"
            and c.donor == sender
            and epoch == c.epoch == self.hard.epoch
        )

    def handover_candidate_of(self, sender: str, epoch: int) -> bool:
        """We campaign because ``sender``, our leader of ``epoch``, handed over to us, and the campaign's
        epoch is not taken yet. Its heartbeats go on until our Prepare reaches it (they cross on the wire):
        they must not end the campaign it asked for, or the lead passes only after the lease."""
        c = self.campaign
        return (
            self.role == CANDIDATE
            and c is not None
            and c.handover
            and c.phase == "prepare"
            and sender == self.leader
            and epoch == self.hard.epoch < c.epoch
        )

    def may_lead(self, candidate: str, last: LogId) -> bool:
        """Membership check of a Prepare: ``candidate`` (its log ending at ``last``) may get our promise if
        it is a voter of our configuration, or if its log is at least as up to date as ours (the order of
        ``LogId``: last epoch, then last index).

        Why the second case (liveness): a configuration takes effect when appended, so the members of one
        cluster can hold different ones for a while. A learner promoted by a CONFIG entry that reached the
        leader and some members, but not us (we crashed, or lost the Append, before that leader died), is a
        voter only in the logs holding that entry. Those members defer to it as their highest-ID voter;
        judged by our configuration alone it never got our promise, so with us needed for its majority
        nobody ever led. A log at least as up to date as ours is the one a view change would keep over
        ours, so the candidate is judged by the configuration of its log, not by our older one.

        Why it is safe: the promise rule itself is unchanged (one candidate per epoch, durable before the
        Promise leaves, the lease), and the candidate still counts only voters of its own configuration
        toward its majority (``on_promise``) and takes every entry it lacks from the most advanced promiser
        before serving. It also ends a voter of the log it serves: a donor other than itself holds a
        strictly more advanced log (ties go to the candidate, ``pick_donor``), so that donor promised
        because the candidate is a voter of the donor's configuration, which it then takes with the log.
        A learner or a removed node whose log is behind ours is still refused, so it cannot move the
        epoch."""
        return candidate in self.config.voters or last >= self.last_id

    def on_prepare(self, sender: str, m: Prepare) -> None:
        epoch, h = self.hard.epoch, self.hard
        if m.epoch < epoch or (m.epoch == epoch and h.promised_to != sender):
            self.send(sender, Refuse(m.epoch, epoch, "stale"))
            return
        if not self.may_lead(sender, m.last):
            self.send(sender, Refuse(m.epoch, epoch, "not-a-voter"))
            return
        if m.epoch > epoch and not m.handover:
            # The lease rule: while a current leader is heard from (or we lead with majority contact), no
            # other candidate gets a promise. So a node that merely cannot hear the leader (one-way cut)
            # cannot move the epoch.
            if self.role == LEADER and self.reachable_voters() >= quorum(self.config):
                self.send(sender, Refuse(m.epoch, epoch, "lease"))
                return
            if self.role != LEADER and self.leader not in (None, sender):
                if self.now - self.leader_contact_s < self.o.lease_s:
                    self.send(sender, Refuse(m.epoch, epoch, "lease"))
                    return
        if m.epoch > epoch:
            if self.role != FOLLOWER:
                self.step_down(f"promised epoch {m.epoch} to {sender}")
            self.set_epoch(m.epoch, sender)
            self.leader = None
            self.promised_s = self.now
            self.fact("epoch_promised", epoch=m.epoch, candidate=sender, handover=m.handover)
        self.send(sender, Promise(m.epoch, self.last_id))

    def on_append(self, sender: str, m: Append) -> None:
        prev = m.prev
        conflict = self.committed_conflict(m.entries)
        if conflict is None and prev.index <= self.commit:
            known = self.epoch_at(prev.index)
            conflict = prev.index if known is not None and known != prev.epoch else None
        if conflict is not None:
            self.fact("foreign_history", leader=sender, epoch=m.epoch, index=conflict)
            return  # no ack, no reject: nothing the sender could send would make this log its own
        if prev.index > self.last_index:
            self.send(sender, AppendReject(m.epoch, prev.index, self.last_index, m.seq))
            return
        if prev.index > self.commit and self.epoch_at(prev.index) != prev.epoch:
            # Back off to the last index whose epoch is not above the leader's: everything of a newer
            # epoch than prev can only be a divergent suffix.
            hint = prev.index - 1
            while hint > self.commit and (self.epoch_at(hint) or 0) > prev.epoch:
                hint -= 1
            self.send(sender, AppendReject(m.epoch, prev.index, hint, m.seq))
            return
        self.merge(m.entries)
        matched = prev.index + len(m.entries)
        self.verified = max(self.verified, matched)
        self.commit_to(min(m.commit, self.verified))
        self.send(sender, AppendAck(m.epoch, matched, m.seq))

    def on_snapshot_offer(self, sender: str, m: SnapshotOffer) -> None:
        """Our leader no longer keeps the entries we need. If we already hold everything up to the snapshot
        (committed entries are the same on every member), say so; else fetch it."""
        if m.snapshot.index <= self.commit:
            self.send(sender, AppendAck(m.epoch, self.commit, 0))
            return
        self.fetch_snapshot(sender, m.snapshot)

    def fetch_snapshot(self, source: str, snapshot: LogId) -> None:
        if not any(f.snapshot == snapshot for f in self.out_fetch):
            self.out_fetch.append(FetchSnapshot(source, snapshot))

    def snapshot_fetched(self, inp: SnapshotFetched) -> None:
        """A fetched snapshot is in the store. Install it unless we already hold everything in it: it holds
        only committed entries, so the entries it covers are the ones every member has or will have; our
        own entries above it are kept if ours at its index is the same entry (log matching: then they may be
        entries we acknowledged, which a leader may have counted), else dropped with the rest."""
        sid = inp.snapshot
        if sid.index > self.snapshot.index and sid.index <= self.applied:
            self.snapshot = sid  # a newer snapshot of what we hold: serve it, compact up to it
        if sid.index <= self.commit or self.role == LEADER:
            self.fact("snapshot_not_needed", index=sid.index, commit=self.commit)
            return
        keep: list[Entry] | None = None
        if sid.index <= self.last_index and self.epoch_at(sid.index) == sid.epoch:
            keep = list(self.log[sid.index - self.base.index :])
        self.log = keep or []
        self.base = sid
        self.dirty = None  # kept entries stay where they are on disk (see InstallSnapshot.keep_log)
        self.commit = self.applied = self.verified = sid.index
        self.snapshot = sid
        if keep is None:
            self.first_index = sid.index + 1
        self.applied_bytes = 0
        configs = ((sid.index, inp.config),) + tuple(
            (e.index, Config.decode(e.payload)) for e in keep or () if e.kind is Kind.CONFIG
        )
        self.hard = replace(self.hard, configs=configs)
        self.out_install = InstallSnapshot(sid, inp.config, keep_log=keep is not None)
        kept = len(keep or ())
        self.fact("snapshot_installing", index=sid.index, epoch=sid.epoch, source=inp.source, kept=kept)
        c = self.campaign
        if self.role == CANDIDATE and c is not None and c.phase == "fetch":
            self.campaign = replace(c, fetched_to=max(c.fetched_to, sid.index), started_s=self.now)
            self.send_fetch()
        elif self.role == FOLLOWER and self.leader is not None:
            self.send(self.leader, AppendAck(self.hard.epoch, sid.index, 0))

    def snapshot_taken(self, inp: SnapshotTaken) -> None:
        self.snapshot_pending = False
        if inp.snapshot is None:
            self.snapshot_asked_at = 0  # nothing was taken: the retry is due on what is applied already
            self.snapshot_retry_s = self.now + self.o.snapshot_retry_s
            self.fact("snapshot_failed", retry_in_s=self.o.snapshot_retry_s)
            return
        if inp.snapshot.index > self.snapshot.index:
            self.snapshot = inp.snapshot
            self.applied_bytes = 0
        # Entries between base and the new first index stay in memory: they are sent from there.
        self.first_index = max(self.first_index, inp.first_index)

    def commit_to(self, index: int) -> None:
        index = min(index, self.last_index)
        if index > self.commit:
            self.commit = index

    def on_ack(self, sender: str, m: AppendAck | AppendReject | HeartbeatAck) -> None:
        if self.role != LEADER or sender not in self.progress:
            return
        p = self.progress[sender]
        now, acked_seq = self.now, max(p.acked_seq, m.seq)
        # Built from all fields in declaration order (node.core.slots): dataclasses.replace was most of an ack.
        if isinstance(m, AppendAck):
            moved = m.match > p.match
            p = _new_progress(
                (
                    max(p.next, m.match + 1),  # next
                    max(p.match, m.match),  # match
                    max(0, p.inflight - 1),  # inflight
                    now,  # last_ack_s
                    now if moved else p.last_progress_s,  # last_progress_s
                    acked_seq,
                    False,  # probing
                    p.reading,
                    NEVER if moved else p.offered_s,  # offered_s
                )
            )
        elif isinstance(m, AppendReject) and m.rejected > p.match:
            # (a reject about what is already matched is an old, reordered one)
            p = _new_progress(
                (
                    max(p.match + 1, min(m.rejected, m.hint + 1)),  # next
                    p.match,
                    0,  # inflight
                    now,  # last_ack_s
                    now,  # last_progress_s
                    acked_seq,
                    True,  # probing
                    p.reading,
                    p.offered_s,
                )
            )
        else:
            p = _new_progress(
                (
                    p.next,
                    p.match,
                    p.inflight,
                    now,
                    p.last_progress_s,
                    acked_seq,
                    p.probing,
                    p.reading,
                    p.offered_s,
                )
            )
        self.progress[sender] = p
        self._reachable_key = None  # last_ack_s moved (see reachable_voters)
        if isinstance(m, AppendAck):
            self.advance_commit()
        if not isinstance(m, HeartbeatAck):
            self.replicate(sender)

    def advance_commit(self) -> None:
        """Commit rule: the highest index durable on a majority of voters, and only an entry of our own
        epoch (an older entry commits through it: Raft §5.4.2; our EpochStart entry is what makes it
        happen at once). The leader's own entries: with a pipelined shell, only what it reported durable
        (``Persisted``); otherwise all of them (the shell persisted every earlier Ready before this input, and
        this Ready's appends are persisted before its commits are applied or sent)."""
        cfg = self.config
        last = self.log[-1].index if self.log else self.base.index
        mine = min(self.durable, last) if self.o.pipelined else last
        me, progress = self.me, self.progress
        matches = [
            mine if v == me else (p.match if (p := progress.get(v)) is not None else 0) for v in cfg.voters
        ]
        if not matches:
            return
        matches.sort()
        q = quorum(cfg)
        if q > len(matches):
            return
        n = matches[len(matches) - q]
        if n > self.commit and self.epoch_at(n) == self.hard.epoch:
            self.commit = n

    def replicate(self, peer: str) -> None:
        """Pipeline Appends to ``peer`` up to the in-flight window (one at a time while probing); entries
        older than the in-memory window are read from disk first (ReadLog).

        Only full batches are pipelined. A batch that reaches the end of the log is open: while an Append
        to the peer is unanswered it is held back until the answer comes (an ack calls this again), and
        whatever was appended meanwhile goes with it. Under concurrent writes a follower then gets one
        Append, one log write, one fsync and one ack per round trip rather than one per loop step of the
        leader (about 40% fewer frames per write at 32 clients); a lone write, with nothing in flight, is
        sent at once, so its latency is unchanged. A lost Append holds the tail until ``resend_s``, as a
        full window did before. Unanswered means both an Append counted in flight and entries sent above
        the match: ``inflight`` alone stays raised when the ack of an earlier Append is lost and a later
        one is acknowledged, and ``next > match + 1`` alone holds for a new leader that has heard no
        match yet.

        While probing, nothing more is sent until the Append in flight is answered (or given up on after
        ``resend_s``): a second one, above it, would be rejected with the follower's last index as hint,
        and that reject would move ``next`` back up past where the probe had got to. A batch read from
        disk ends at the in-memory window, so the next batch could always be sent at once, and a follower
        with a divergent suffix reaching below the window was probed up and down for ever."""
        p = self.progress.get(peer)
        if p is None or p.reading or (p.probing and p.inflight > 0):
            return
        while p.next <= self.last_index and p.inflight < self.o.max_inflight:
            if p.next - 1 < self.base.index:
                # Compacted away, or further behind the newest snapshot than the log is meant to keep below
                # it (snapshot_trailing): the member gets the snapshot. The log drops whole segments only, so
                # it may still hold far more; read back and sent max_batch_entries a round trip, those took a
                # new node minutes on a cluster with a long history (a newcomer under load was not caught up
                # 90 s after joining), where a snapshot takes seconds.
                start = self.disk_start(p.next)
                if start is None or self.snapshot.index - (p.next - 1) > max(1, self.o.snapshot_trailing):
                    p = self.offer_snapshot(peer, p)
                    break
                first = start[0]
                last = min(self.base.index, first + self.o.max_batch_entries)
                self.out_read_log.append(ReadLog(peer, "append", self.hard.epoch, first, last))
                p = replace(p, reading=True)
                break
            batch = self.entries_from(p.next)
            if p.inflight and p.next > p.match + 1 and p.next + len(batch) > self.last_index:
                break  # the log's open tail waits for an answer (see the docstring)
            prev = LogId(self.epoch_at(p.next - 1) or 0, p.next - 1)
            self.send(peer, Append(self.hard.epoch, prev, tuple(batch), self.commit, self.seq))
            p = _new_progress(  # fields in declaration order (replace is several times slower)
                (
                    p.next + len(batch),  # next
                    p.match,
                    p.inflight + 1,  # inflight
                    p.last_ack_s,
                    self.now if p.inflight == 0 else p.last_progress_s,  # last_progress_s
                    p.acked_seq,
                    p.probing,
                    p.reading,
                    p.offered_s,
                )
            )
            if p.probing:
                break
        self.progress[peer] = p

    def disk_start(self, next_index: int) -> tuple[int, LogId | None] | None:
        """Where to read the durable log to send entries from ``next_index`` on: (first index to read, the
        previous entry's id when it is not read itself, else None); None when they are compacted away."""
        if next_index == 1 and self.first_index == 1:
            return 1, LogId(0, 0)
        if next_index - 1 >= self.first_index:
            return next_index - 1, None
        if next_index - 1 == self.snapshot.index and next_index >= self.first_index:
            return next_index, self.snapshot
        return None

    def offer_snapshot(self, peer: str, p: Progress) -> Progress:
        if self.snapshot.index == 0:  # pragma: no cover - the log is only compacted after a snapshot
            raise AssertionError(f"{peer} needs compacted entries, and there is no snapshot")
        if self.now - p.offered_s >= self.o.snapshot_offer_s:
            if p.offered_s == NEVER:
                self.fact("snapshot_offered", peer=peer, index=self.snapshot.index, next=p.next)
            self.send(peer, SnapshotOffer(self.hard.epoch, self.snapshot))
            p = replace(p, offered_s=self.now, last_progress_s=self.now)
        return p

    def on_promise(self, sender: str, m: Promise) -> None:
        c = self.campaign
        if self.role != CANDIDATE or c is None or c.epoch != m.epoch or c.phase != "prepare":
            return
        if sender not in self.config.voters:
            return
        promises = tuple(x for x in c.promises if x[0] != sender) + ((sender, m.last),)
        self.campaign = replace(c, promises=promises)
        self.check_promises()

    def check_promises(self) -> None:
        c = self.campaign
        assert c is not None
        h = self.hard
        # Our own promise counts only if we have not promised this epoch to someone else meanwhile.
        self_ok = h.epoch < c.epoch or (h.epoch == c.epoch and h.promised_to == self.me)
        if not self_ok:
            self.step_down(f"epoch {c.epoch} promised elsewhere")
            return
        if 1 + len(c.promises) < quorum(self.config):
            return
        # Epoch taken: persisted (Ready.hard_state) before any message of this epoch goes out.
        self.set_epoch(c.epoch, self.me)
        donor, donor_last = pick_donor(self.me, self.last_id, c.promises)
        self.fact("epoch_taken", epoch=c.epoch, promises=len(c.promises) + 1, donor=donor)
        if donor == self.me:
            self.become_leader()
            return
        # View change: take every entry we lack from the most advanced promiser before serving.
        self.campaign = replace(c, phase="fetch", donor=donor, fetched_to=self.commit, started_s=self.now)
        self.send_fetch()

    def send_fetch(self) -> None:
        c = self.campaign
        assert c is not None and c.donor is not None
        self.send(c.donor, Fetch(c.epoch, c.fetched_to + 1))
        self.campaign = replace(c, sent_s=self.now)

    def on_fetch(self, sender: str, m: Fetch) -> None:
        if self.hard.epoch != m.epoch or self.hard.promised_to != sender:
            return
        if m.start <= self.base.index:
            if m.start < self.first_index:  # compacted: the new leader takes our snapshot first
                self.send(sender, SnapshotOffer(m.epoch, self.snapshot))
                return
            last = min(self.base.index, m.start + self.o.max_batch_entries - 1)
            self.out_read_log.append(ReadLog(sender, "fetch", m.epoch, m.start, last))
            return
        batch = self.entries_from(m.start) if m.start <= self.last_index else []
        self.send(sender, FetchReply(m.epoch, m.start, tuple(batch), self.last_id))

    def on_fetch_reply(self, sender: str, m: FetchReply) -> None:
        c = self.campaign
        if c is None or c.phase != "fetch" or c.donor != sender or m.start != c.fetched_to + 1:
            return
        conflict = self.committed_conflict(m.entries)
        if conflict is not None:
            self.fact("foreign_history", leader=sender, epoch=m.epoch, index=conflict)
            self.step_down(f"donor {sender} holds another history")
            return
        self.merge(m.entries)
        fetched_to = c.fetched_to + len(m.entries)
        self.campaign = c = replace(c, fetched_to=fetched_to, started_s=self.now)
        if fetched_to >= m.last.index:
            if self.last_index > m.last.index:
                self.truncate(m.last.index + 1)  # our longer suffix lost against a more advanced log
            if self.last_id != m.last:  # pragma: no cover - would mean the donor's log changed
                raise AssertionError(f"view change ended at {self.last_id}, donor at {m.last}")
            self.become_leader()
        else:
            self.send_fetch()

    def become_leader(self) -> None:
        epoch = self.hard.epoch
        self.role = LEADER
        self.leader = self.me
        self.leader_contact_s = self.now
        self.campaign = None
        self.reads = ()
        self.handover_to = None
        self.handover_since_s = NEVER
        self.handover_retry_s = NEVER
        self.progress = {}
        start = self.last_index + 1
        for peer in self.config.members - {self.me}:
            self.progress[peer] = Progress(next=start, last_ack_s=self.now, last_progress_s=self.now)
        self.epoch_start = start
        self.durable = 0  # nothing of this epoch is written yet
        self.append(Entry(epoch, start, Kind.EPOCH_START))
        self.fact("became_leader", epoch=epoch, epoch_start=start)
        for peer in sorted(self.progress):
            self.replicate(peer)
        self.advance_commit()

    def start_campaign(self, handover: bool) -> None:
        epoch = max(self.hard.epoch, self.highest_seen) + 1
        self.role = CANDIDATE
        self.campaign = Campaign(epoch, self.now, handover)
        self.fact("campaign_started", epoch=epoch, handover=handover)
        self.send_prepares()
        self.check_promises()

    def send_prepares(self) -> None:
        c = self.campaign
        assert c is not None
        have = {p for p, _ in c.promises}
        for v in sorted(self.config.voters - {self.me} - have):
            self.send(v, Prepare(c.epoch, self.last_id, c.handover))
        self.campaign = replace(c, sent_s=self.now)

    def submit(self, inp: Submit) -> None:
        rejection = self.write_rejection()
        if rejection is not None:
            code, reason = rejection
            leader = self.leader if self.role != LEADER else None
            self.out_replies.extend(SubmitRejected(rid, code, reason, leader) for rid, _ in inp.commands)
            return
        epoch = self.hard.epoch
        first = self.last_index + 1
        # What ``append`` does for each (no CONFIG among them), with one copy of the log for the whole batch
        # instead of a list copy now and a tuple copy in finish (the log holds keep_applied entries and more).
        entries, replies, index = [], self.out_replies, first
        for rid, payload in inp.commands:
            entries.append(Entry(epoch, index, Kind.COMMAND, payload))
            replies.append(SubmitAccepted(rid, epoch, index))
            index += 1
        if entries:
            if isinstance(self.log, list):
                self.log.extend(entries)
            else:
                self.log = (*self.log, *entries)
            self.dirty = first if self.dirty is None else min(self.dirty, first)
        for peer in sorted(self.progress):
            self.replicate(peer)
        self.advance_commit()

    def remove_member(self, inp: RemoveMember) -> None:
        """An operator's removal: the same path as maintain_membership's changes (through the log, one at a
        time, only by a writable leader). The leader itself is refused rather than handed over and removed in
        one request: that would span two leaders, and a handover that fails half way would leave the request
        with no clear outcome; stopping the leader hands over (Stop), after which it is an ordinary voter."""
        rid, who = inp.request_id, inp.identity
        rejection = self.write_rejection()
        cfg = self.config
        pending = self.hard.configs[-1][0]
        if rejection is None:
            if who not in cfg.members:
                rejection = "unknown", f"{who} is not a voter or learner of this cluster"
            elif who == self.me:
                why = "this node is the leader; stop it first (SIGTERM hands the lead over), then remove it"
                rejection = "is-leader", why
            elif pending > self.commit:
                why = f"the membership change at index {pending} is not committed yet; one change at a time"
                rejection = "conflict", why
            elif self.handover_to is not None:
                rejection = "conflict", "a leadership handover is in progress; retry once it is done"
            elif not cfg.voters - {who}:
                rejection = "last-voter", "removing it would leave no voter"
        if rejection is not None:
            code, reason = rejection
            leader = self.leader if self.role != LEADER else None
            self.out_replies.append(SubmitRejected(rid, code, reason, leader))
            return
        change = replace(
            cfg, voters=cfg.voters - {who}, learners=cfg.learners - {who}, removed=cfg.removed | {who}
        )
        index = self.propose(change, f"removed by an operator: {who}")
        self.out_replies.append(SubmitAccepted(rid, self.hard.epoch, index))

    def write_rejection(self) -> tuple[str, str] | None:
        if self.role != LEADER:
            if self.highest_healthy_voter() == self.me:
                reason = self.no_quorum_reason()
                if reason:
                    return "no-quorum", reason
                return "not-leader", "no leader yet: election in progress"
            return "not-leader", f"not the leader (leader: {self.leader})"
        reason = self.no_quorum_reason()
        if reason:
            return "no-quorum", reason
        if self.draining or self.stopping:
            return "not-writable", "leadership handover in progress"
        if self.commit < self.epoch_start:
            return "not-writable", "view change in progress"
        if self.last_index - self.commit >= self.o.max_uncommitted:
            return "busy", f"{self.last_index - self.commit} entries await commit"
        return None

    def read(self, inp: Read) -> None:
        rejection = self.write_rejection()
        if rejection is not None and rejection[0] != "busy":
            code, reason = rejection
            leader = self.leader if self.role != LEADER else None
            self.out_replies.extend(ReadRejected(rid, code, reason, leader) for rid in inp.read_ids)
            return
        # ReadIndex: the commit index now covers every write acknowledged before the read arrived; a
        # heartbeat round sent after it proves we still lead when a majority answers.
        self.seq += 1
        self.reads = (
            *self.reads,
            *(PendingRead(rid, self.commit, self.seq, self.now) for rid in inp.read_ids),
        )
        self.send_heartbeats(new_round=False)

    def persisted(self, last: LogId) -> None:
        """A pipelined shell's log write ended. Only entries of this leader's own epoch count: they were
        appended by it alone, after every truncation and fetch of its view change (writes run in order),
        and a leader never truncates its own log, so the entry at ``last.index`` is still the one written."""
        if self.role != LEADER or last.epoch != self.hard.epoch or self.epoch_at(last.index) != last.epoch:
            return
        if last.index > self.durable:
            self.durable = last.index
            self.advance_commit()

    def log_read(self, inp: LogRead) -> None:
        req = inp.request
        if req.epoch != self.hard.epoch:
            return
        if req.purpose == "fetch":
            if self.hard.promised_to == req.peer:
                batch = tuple(self.bounded(inp.entries))
                self.send(req.peer, FetchReply(req.epoch, req.first, batch, self.last_id))
            return
        p = self.progress.get(req.peer)
        if self.role != LEADER or p is None or not p.reading:
            return
        p = replace(p, reading=False)
        start = self.disk_start(p.next)
        entries = inp.entries
        if start is not None and req.first == start[0] and entries and entries[0].index == req.first:
            if start[1] is not None:
                prev, batch = start[1], self.bounded(entries)
            else:
                prev, batch = entries[0].id, self.bounded(entries, 1)
            if batch:
                self.send(req.peer, Append(self.hard.epoch, prev, tuple(batch), self.commit, self.seq))
                p = replace(p, next=p.next + len(batch), inflight=p.inflight + 1)
        self.progress[req.peer] = p
        self.replicate(req.peer)

    # ---- timers

    def send_heartbeats(self, new_round: bool = True) -> None:
        if new_round:
            self.seq += 1
        for peer in sorted(self.progress):
            match = self.progress[peer].match
            matched = LogId(self.epoch_at(match) or 0, match) if match else LogId(0, 0)
            self.send(peer, Heartbeat(self.hard.epoch, self.commit, self.seq, matched))
        self.heartbeat_sent_s = self.now

    def maintain(self) -> None:
        if self.departing:
            for who, until_s in list(self.departing.items()):
                if until_s <= self.now or who not in self.view:
                    del self.departing[who]
        if self.role == LEADER:
            self.maintain_leader()
        else:
            self.maintain_other()
        # A leader never defers (the first test of _deferring): skip the call.
        if self.role == LEADER or not _deferring(self, self.now):
            self.deferred_s = NEVER
        elif self.deferred_s == NEVER:
            self.deferred_s = self.now
        if self.commit > self.applied:  # apply_committed's own first test, without the call
            self.apply_committed()
        if snapshot_due(self, self.now):
            self.snapshot_pending = True
            self.snapshot_asked_at = self.applied
            self.applied_bytes = 0  # counted again from this ask (see snapshot_asked_at)
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

    def maintain_other(self) -> None:
        c = self.campaign
        if c is not None:
            if self.now - c.started_s >= self.o.election_timeout_s:
                self.step_down("campaign timed out")
            elif self.now - c.sent_s >= self.o.resend_s:
                if c.phase == "prepare":
                    self.send_prepares()
                else:
                    self.send_fetch()
            return
        if _campaign_due(self, self.now):
            highest = self.highest_healthy_voter()
            if highest != self.me:
                waited_s = round(self.now - self.deferred_s, 6)
                self.fact("deference_expired", deferred_to=highest, waited_s=waited_s)
            self.start_campaign(handover=False)

    def maintain_leader(self) -> None:
        now, o = self.now, self.o
        if now - self.heartbeat_sent_s >= o.heartbeat_s:
            self.send_heartbeats()
            for peer in sorted(self.progress):
                p = self.progress[peer]
                if p.next > p.match + 1 and not p.reading and now - p.last_progress_s >= o.resend_s:
                    # Lost appends (or acks): go back to what is known to match and send again.
                    self.progress[peer] = replace(p, next=p.match + 1, inflight=0, last_progress_s=now)
                self.replicate(peer)
        if self.reads:  # confirm_reads' own first test, without the call
            self.confirm_reads()
        self.maintain_handover()
        if self.writable_now() and self.handover_to is None:
            self.maintain_membership()

    @property
    def draining(self) -> bool:
        return self.handover_to is not None and self.handover_since_s != NEVER

    def writable_now(self) -> bool:
        return self.commit >= self.epoch_start and not self.stopping and self.no_quorum_reason() is None

    def confirm_reads(self) -> None:
        if not self.reads:
            return
        keep = []
        for r in self.reads:
            if _read_confirmed(self, r):
                self.out_replies.append(ReadConfirmed(r.read_id, r.index))
            elif self.now - r.at_s > self.o.lease_s:
                reason = self.no_quorum_reason() or "no majority confirmed the read within the lease"
                self.out_replies.append(ReadRejected(r.read_id, "no-quorum", reason))
            else:
                keep.append(r)
        self.reads = tuple(keep)

    def maintain_handover(self) -> None:
        """Planned handover: a higher-ID voter that is healthy and answering (or any, when stopping) gets
        the lead. While it is more than one batch behind, writes go on and it is caught up like any
        follower; then writes stop (``draining``), it receives the rest, and gets TakeOver. A handover that
        does not finish within handover_timeout_s of the stop is abandoned (writes resume)."""
        now, o = self.now, self.o
        target = _handover_target(self, now)
        if target != self.handover_to:
            if target is not None:
                self.fact("handover_started", epoch=self.hard.epoch, to=target)
            self.handover_to = target
            self.handover_since_s = NEVER
            self.takeover_sent_s = NEVER
        if self.handover_to is None:
            return
        p = self.progress[self.handover_to]
        if not self.draining:
            if p.match < self.last_index - o.max_batch_entries and not self.stopping:
                return
            self.handover_since_s = now
        if now - self.handover_since_s > o.handover_timeout_s:
            self.fact("handover_abandoned", epoch=self.hard.epoch, to=self.handover_to)
            self.handover_to = None
            self.handover_since_s = NEVER
            self.handover_retry_s = now + 4 * o.handover_timeout_s
            return
        if p.match == self.last_index and now - self.takeover_sent_s >= o.heartbeat_s:
            self.send(self.handover_to, TakeOver(self.hard.epoch, leaving=self.stopping))
            self.takeover_sent_s = now

    def maintain_membership(self) -> None:
        """One change at a time, through the log, only once the previous change is committed:
        reap silent voters, then silent learners, promote a caught-up learner, add a new healthy node (not
        one an operator removed while it is still in the view), forget a removal once its node left the
        view (so it rejoins as a learner when it comes back)."""
        cfg = self.config
        if self.hard.configs[-1][0] > self.commit:
            return
        now, o = self.now, self.o
        if (
            not cfg.learners
            and not cfg.removed
            and self.view.keys() == cfg.voters  # cfg.members, which is cfg.voters without learners
            # Every member answered within reap_timeout_s: ``now - x`` only grows as x falls (rounding is
            # monotonic), so it holds for all of them if it holds for the oldest answer.
            and (not self.progress or now - min(map(_LAST_ACK, self.progress.values())) <= o.reap_timeout_s)
        ):
            # The steady state, checked on every step of a leader: every member is in the view (none
            # replaced, no new node, no removal to forget), no learner, no silent member. Nothing below
            # could find a change.
            return
        change: Config | None = None
        for v in sorted(cfg.members - {self.me}):
            successor = self.replaced_by(v)
            if successor is not None:
                # The node at v's address lost its data and came back as a new identity (a wiped or
                # quarantined DATA_DIR), or another node took the address of a dead one: v is gone for good.
                # Removing it at once keeps the quorum reachable; waiting for reap_timeout_s would let the new
                # identity's promotion make a 4-voter cluster with 2 members gone at the next such loss,
                # which no reaping could ever repair (reaping needs a majority too).
                change = replace(cfg, voters=cfg.voters - {v}, learners=cfg.learners - {v})
                why = f"member {v} replaced by {successor} at node ID {self.last_ids[v]}"
                break
        if change is None:
            for v in sorted(cfg.voters - {self.me}):
                p = self.progress.get(v)
                if p is not None and now - p.last_ack_s > o.reap_timeout_s:
                    change, why = replace(cfg, voters=cfg.voters - {v}), f"voter {v} silent"
                    break
        if change is None:
            for v in sorted(cfg.learners):
                p = self.progress.get(v)
                if p is not None and now - p.last_ack_s > o.reap_timeout_s:
                    change, why = replace(cfg, learners=cfg.learners - {v}), f"learner {v} silent"
                    break
        if change is None:
            for v in sorted(cfg.learners):
                p = self.progress.get(v)
                if (
                    p is not None
                    and v in self.view
                    and p.match >= self.commit
                    and now - p.last_ack_s <= o.lease_s
                ):
                    change = replace(cfg, voters=cfg.voters | {v}, learners=cfg.learners - {v})
                    why = f"learner {v} caught up"
                    break
        if change is None:
            for v in sorted(set(self.view) - cfg.members - cfg.removed - {self.me}):
                change, why = replace(cfg, learners=cfg.learners | {v}), f"new node {v}"
                break
        if change is None:
            for v in sorted(cfg.removed - set(self.view)):
                change, why = replace(cfg, removed=cfg.removed - {v}), f"removed node {v} left the view"
                break
        if change is None:
            return
        self.propose(change, why)

    def replaced_by(self, member: str) -> str | None:
        """Another identity healthy at the node ID ``member`` was last seen at, while
        ``member`` is out of the view and has not answered within the lease: one address serves one node,
        so ``member`` is not there any more."""
        if member in self.view:
            return None
        nid = self.last_ids.get(member)
        p = self.progress.get(member)
        if nid is None or (p is not None and self.now - p.last_ack_s <= self.o.lease_s):
            return None
        found = sorted(w for w, i in self.view.items() if i == nid and w != member)
        return found[0] if found else None

    def propose(self, change: Config, why: str) -> int:
        """Append a CONFIG entry (effective at once) and replicate it; returns its index."""
        now = self.now
        entry = Entry(self.hard.epoch, self.last_index + 1, Kind.CONFIG, change.encode())
        self.append(entry)
        for peer in change.members - {self.me} - set(self.progress):
            self.progress[peer] = Progress(next=self.last_index, last_ack_s=now, last_progress_s=now)
        for peer in set(self.progress) - change.members:
            del self.progress[peer]
        self.fact(
            "config_proposed",
            epoch=self.hard.epoch,
            index=entry.index,
            reason=why,
            voters=sorted(change.voters),
            learners=sorted(change.learners),
        )
        for peer in sorted(self.progress):
            self.replicate(peer)
        self.advance_commit()
        return entry.index

    def apply_committed(self) -> None:
        if self.commit > self.applied:
            first = self.applied + 1
            applying = self.log[first - self.base.index - 1 : self.commit - self.base.index]
            self.out_apply.extend(applying)
            self.applied_bytes += sum(len(e.payload) for e in applying)
            self.applied = self.commit
            # Config history below the commit index: only the latest committed one is still needed.
            configs = self.hard.configs
            if len(configs) < 2 or configs[1][0] > self.commit:
                return  # at most one committed configuration: nothing to prune (the usual case)
            committed = [c for c in configs if c[0] <= self.commit]
            pruned = (*committed[-1:], *(c for c in configs if c[0] > self.commit))
            if pruned != configs:
                self.hard = replace(self.hard, configs=pruned)

    def trim(self) -> None:
        """Memory bound: keep at most keep_applied applied entries; older ones are read back via ReadLog."""
        new_base = self.applied - self.o.keep_applied
        if new_base > self.base.index:
            cut = new_base - self.base.index
            self.base = self.log[cut - 1].id
            if isinstance(self.log, list):
                del self.log[:cut]
            else:
                self.log = self.log[cut:]  # one copy, not a list and then a tuple again

    def finish(self) -> tuple[State, Ready]:
        st = self.st
        truncate_from = append = None
        if self.dirty is not None:
            # st.last.index, without the two property calls and the LogId they build
            last = st.log[-1].index if st.log else st.base.index
            truncate_from = self.dirty if self.dirty <= last else None
            append = tuple(self.log[self.dirty - self.base.index - 1 :])
        self.trim()
        # The working copy is done with: freeze its fields in place and build the State from them in field
        # order (one C-level read of every field, one C-level pass setting the slots: node.core.slots).
        if isinstance(self.log, list):
            self.log = tuple(self.log)
        self.progress = MappingProxyType(self.progress)  # type: ignore[assignment]
        # Nobody departing before or after (the usual case): keep the State's own empty mapping.
        self.departing = (  # type: ignore[assignment]
            MappingProxyType(self.departing) if self.departing or st.departing else st.departing
        )
        new = _new_state(_state_values(self))
        hard = self.hard if self.hard is not st.hard and self.hard != st.hard else None
        if (
            hard is None
            and truncate_from is None
            and not append
            and not self.out_messages
            and not self.out_apply
            and not self.out_replies
            and not self.out_read_log
            and not self.out_facts
            and self.out_install is None
            and not self.out_take_snapshot
            and not self.out_fetch
        ):
            return new, _NOTHING  # about half a leader's steps (an ack that commits nothing, a Persisted)
        ready = _new_ready(
            (  # in Ready's field order
                hard,  # hard_state
                truncate_from,
                append or (),  # append
                tuple(self.out_messages),  # messages
                tuple(self.out_apply),  # apply
                tuple(self.out_replies),  # replies
                tuple(self.out_read_log),  # read_log
                tuple(self.out_facts),  # facts
                self.out_install,  # install
                self.out_take_snapshot,  # take_snapshot
                tuple(self.out_fetch),  # fetch_snapshot
            )
        )
        return new, ready
