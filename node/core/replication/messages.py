"""Values of the replication core: log entries, cluster configuration, peer messages, inputs and Ready.

Everything is a frozen, slotted dataclass so a state or a message can be kept, compared and replayed without
copying. Messages carry no sender: the shell's authenticated transport names the sender in ``Receive``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

# --- the log ------------------------------------------------------------------------------------------------


class Kind(enum.Enum):
    COMMAND = "command"  # opaque client payload (a stamped WriteCommand), applied by the state machine
    EPOCH_START = (
        "epoch-start"  # empty; the first entry of every leader's epoch (its commit commits the past)
    )
    CONFIG = "config"  # a new Config, encoded with Config.encode(); effective from the moment it is in a log


@dataclass(frozen=True, slots=True, order=True)
class LogId:
    """(epoch, index) of an entry. The dataclass order is the up-to-date order: higher epoch first, then
    longer log. LogId(0, 0) is the empty log."""

    epoch: int
    index: int


@dataclass(frozen=True, slots=True)
class Entry:
    epoch: int
    index: int
    kind: Kind
    payload: bytes = b""

    @property
    def id(self) -> LogId:
        return LogId(self.epoch, self.index)


@dataclass(frozen=True, slots=True)
class Config:
    """Who votes and who only receives entries, by persistent node identity (never by IP-derived ID).

    ``removed``: identities an operator removed (``RemoveMember``) that the leader must not add back as
    learners while it still sees them healthy. It lives in the replicated configuration, not in one leader's
    memory, so a leader change cannot undo a removal; the leader clears an identity from it (through the
    log) once that node has left its view (stopped, restarted, failing probes), so a removed node that is
    started again later rejoins as a learner like any new node."""

    voters: frozenset[str] = frozenset()
    learners: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()

    @property
    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    @property
    def members(self) -> frozenset[str]:
        return self.voters | self.learners

    def encode(self) -> bytes:
        """Deterministic bytes (sorted, versioned) so every replica stores the same entry."""
        body: dict[str, object] = {"v": 1, "voters": sorted(self.voters), "learners": sorted(self.learners)}
        if self.removed:  # only when set: every configuration written before removals encodes as it did
            body["removed"] = sorted(self.removed)
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def decode(data: bytes) -> Config:
        body = json.loads(data)
        if body.get("v") != 1:
            raise ValueError(f"unknown config version {body.get('v')!r}")
        return Config(
            frozenset(body["voters"]), frozenset(body["learners"]), frozenset(body.get("removed", ()))
        )


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash besides the log: the epoch this node is in, to whom it promised that epoch
    (None when it adopted the epoch from a leader without promising), and the configuration history that
    may still be needed: the last committed Config and every Config entry above the commit index, as
    (index, config) in log order. ``restore`` re-derives the part above the applied index from the log."""

    epoch: int = 0
    promised_to: str | None = None
    configs: tuple[tuple[int, Config], ...] = ((0, Config()),)
    # The cluster this log belongs to: chosen at bootstrap, adopted by a joiner from the first leader whose
    # Append it takes, "" while it has none. Epochs and indices are only unique within one cluster, so a
    # node must never take entries from two clusters: (epoch 1, index 3) of one is not that of another.
    cluster: str = ""

    @property
    def config(self) -> Config:
        return self.configs[-1][1]


# --- peer messages (one union) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepare:
    """A candidate asks for a promise of ``epoch``; ``last`` is its own last LogId (for logs only)."""

    epoch: int
    last: LogId
    handover: bool = False


@dataclass(frozen=True, slots=True)
class Promise:
    """The voter promised ``epoch`` (durably, before this was sent) and reports how far its log goes."""

    epoch: int
    last: LogId


@dataclass(frozen=True, slots=True)
class Refuse:
    epoch: int
    promised: int  # the voter's own epoch, so a candidate can aim higher next time
    reason: str  # "stale" | "lease" | "not-a-voter"


@dataclass(frozen=True, slots=True)
class Append:
    epoch: int
    prev: LogId
    entries: tuple[Entry, ...]
    commit: int
    seq: int


@dataclass(frozen=True, slots=True)
class AppendAck:
    """Sent only after the entries are durable: ``match`` is the last index known equal to the leader's."""

    epoch: int
    match: int
    seq: int


@dataclass(frozen=True, slots=True)
class AppendReject:
    """``prev`` did not match; ``hint`` is an index at or below which the follower's log may match."""

    epoch: int
    rejected: int
    hint: int
    seq: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Leadership proof and commit index; ``seq`` numbers the round for linearizable reads.

    ``prev``: the last entry the leader knows the receiver holds durably in this epoch (its acknowledged
    match). If the receiver's log has that entry, the log-matching property makes its whole prefix up to it
    the leader's, so it may commit up to ``min(commit, prev.index)`` without a new Append: a follower that
    restarted with committed but unapplied entries applies them on the next heartbeat, not the next write.
    Older senders omit it (the codec fills in ``LogId(0, 0)``, which proves nothing)."""

    epoch: int
    commit: int
    seq: int
    prev: LogId = LogId(0, 0)


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class Stale:
    """Answer to a message from a lower epoch: the receiver is in ``epoch``."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """View change: the new leader asks its most advanced promiser for entries from ``start`` on."""

    epoch: int
    start: int


@dataclass(frozen=True, slots=True)
class FetchReply:
    epoch: int
    start: int
    entries: tuple[Entry, ...]
    last: LogId  # the donor's last entry: the fetch is complete when the new leader's log ends there


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Planned handover: the leader of ``epoch`` has brought the receiver up to date; take over at once.
    ``leaving``: the sender is shutting down, so the successor must not hand the lead back to it."""

    epoch: int
    leaving: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotOffer:
    """The receiver needs entries this node no longer keeps (compacted into ``snapshot``): it should fetch
    that snapshot from the sender (``Ready.fetch_snapshot``) and install it. Sent by a leader to a member
    too far behind, and by a view-change donor to the new leader. A snapshot holds only committed entries
    (it is taken at the applied index), so installing it is safe whichever member it comes from."""

    epoch: int
    snapshot: LogId


Message = (
    Prepare
    | Promise
    | Refuse
    | Append
    | AppendAck
    | AppendReject
    | Heartbeat
    | HeartbeatAck
    | Stale
    | Fetch
    | FetchReply
    | TakeOver
    | SnapshotOffer
)

# --- inputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (``now`` comes with every step); run timers: heartbeats, leases, campaigns, reaping."""


@dataclass(frozen=True, slots=True)
class ViewChanged:
    """The membership layer's newest view: persistent identity -> current numeric ID of every *healthy*
    node, this one included. IDs follow addresses and may change; identities do not."""

    healthy: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Receive:
    sender: str  # authenticated by the transport
    message: Message
    cluster: str = ""  # the sender's cluster, from the batch it came in ("" when it has none yet)


@dataclass(frozen=True, slots=True)
class Submit:
    """Client writes, batched by the shell: one Ready appends them all (one append, one fsync)."""

    commands: tuple[tuple[str, bytes], ...]  # (request id, payload)


@dataclass(frozen=True, slots=True)
class Read:
    """Linearizable reads: confirmed after a majority answers a heartbeat round sent after they arrived."""

    read_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LogRead:
    """The shell's answer to a ReadLog action: entries first..last from the durable log (inclusive), or a
    prefix of them, possibly none: the log may have been compacted after the core asked (a snapshot taken
    meanwhile) and the shell then stops at the first index it no longer holds. The core sends what came
    back and asks again from where it stopped; SnapshotTaken tells it the new first index, and a member
    still needing compacted entries is offered the snapshot."""

    request: ReadLog
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class RemoveMember:
    """An operator removes the voter (or learner) ``identity`` through the log. Answered like a Submit:
    ``SubmitAccepted`` with the CONFIG entry's (epoch, index), which the shell answers once that entry is
    applied, or ``SubmitRejected`` with Submit's codes plus "unknown" (not a member), "conflict" (another
    membership change is not committed yet), "is-leader" (remove the leader only after it handed over)
    and "last-voter" (no voter would be left)."""

    request_id: str
    identity: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The node is shutting down: a leader hands over to the highest healthy voter; nobody campaigns."""


@dataclass(frozen=True, slots=True)
class Persisted:
    """Pipelined shells only (``Options.pipelined``): every log write up to and including the one that
    appended the entry ``last`` is durable. A leader counts its own copy toward a majority only up to the
    highest such entry of its own epoch."""

    last: LogId


@dataclass(frozen=True, slots=True)
class SnapshotTaken:
    """The shell finished a ``Ready.take_snapshot``: ``snapshot`` is durable (None: it failed; the core tries
    again after ``Options.snapshot_retry_s``) and the log was compacted, so it now starts at
    ``first_index``."""

    snapshot: LogId | None
    first_index: int


@dataclass(frozen=True, slots=True)
class SnapshotFetched:
    """A ``Ready.fetch_snapshot`` finished: the snapshot ``snapshot`` (holding ``config``) is durable and
    verified in this node's snapshot store, not installed yet. The core decides whether to install it."""

    source: str
    snapshot: LogId
    config: Config


Input = (
    Tick
    | ViewChanged
    | Receive
    | Submit
    | Read
    | LogRead
    | RemoveMember
    | Stop
    | Persisted
    | SnapshotTaken
    | SnapshotFetched
)

# --- outputs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    message: Message
    cluster: str = ""  # the sender's cluster when the message was made: a batch carries it (``Receive``)


@dataclass(frozen=True, slots=True)
class ReadLog:
    """Read entries first..last (inclusive) from the durable log and feed them back as LogRead. Asked when a
    peer needs entries older than the in-memory window (catch-up, or a Fetch during a view change)."""

    peer: str
    purpose: str  # "append" | "fetch"
    epoch: int
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class SubmitAccepted:
    """Appended as (epoch, index). The client's answer comes when index is applied: if the applied entry
    at ``index`` has this ``epoch`` the write took effect, otherwise it was discarded (leader change)."""

    request_id: str
    epoch: int
    index: int


@dataclass(frozen=True, slots=True)
class SubmitRejected:
    request_id: str
    code: str  # "not-leader" | "no-quorum" | "not-writable" | "busy"; RemoveMember adds its own (see there)
    reason: str  # e.g. "no quorum: 1 of 3 voters reachable"
    leader: str | None = None  # identity of the leader this node follows, for forwarding


@dataclass(frozen=True, slots=True)
class ReadConfirmed:
    """Serve the read once this node has applied ``index``."""

    read_id: str
    index: int


@dataclass(frozen=True, slots=True)
class ReadRejected:
    read_id: str
    code: str
    reason: str
    leader: str | None = None


Reply = SubmitAccepted | SubmitRejected | ReadConfirmed | ReadRejected


@dataclass(frozen=True, slots=True)
class FetchSnapshot:
    """Download the snapshot ``snapshot`` from ``source`` into the snapshot store, then step
    ``SnapshotFetched``. Asked again while an offer stands: a shell already fetching it ignores repeats."""

    source: str
    snapshot: LogId


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """Make the snapshot ``snapshot`` (already in the store) this node's database, durably, before the
    Ready's messages (an AppendAck claims it). ``keep_log``: the log holds the snapshot's own entry, so it
    stays as it is (the entries above may be acknowledged ones and must never be off the disk, not even for
    a moment); else the log is reset to start right after the snapshot, after the database was replaced."""

    snapshot: LogId
    config: Config
    keep_log: bool = False


@dataclass(frozen=True, slots=True)
class Fact:
    """Something worth one log line: ``event`` is a constant name, ``fields`` its keys."""

    event: str
    fields: tuple[tuple[str, object], ...] = ()


def early(message: Message) -> bool:
    """Whether a pipelined shell may send ``message`` before the log writes of its Ready are durable: it
    claims nothing about this node's disk (see ``Ready``, pipelined shells)."""
    return not isinstance(message, AppendAck | Promise | FetchReply | TakeOver)


@dataclass(frozen=True, slots=True)
class Ready:
    """What the shell must do after a step, IN THIS ORDER:

    1. ``hard_state``: write and fsync it (epoch, promise, configs) when not None.
    2. ``install``: replace the database by that snapshot and reset the log to start after it (durable).
       Then ``truncate_from`` / ``append``: delete log entries with index >= truncate_from, then append
       ``append`` and fsync. Both 1 and 2 complete BEFORE any message of 3 is sent: a Promise is a promise only once the
       epoch is durable, an AppendAck claims entries are durable, and a leader's Append of a new epoch must
       not exist without that epoch on its own disk.
    3. ``messages``: send (best effort; loss, delay and duplication are tolerated).
    4. ``apply``: committed entries, in index order, to the state machine (after 2: an entry may be appended
       and committed in the same Ready on a single voter).
    5. ``replies``: answers to Submit and Read inputs (a ReadConfirmed is served once ``apply`` reached it).
    6. ``read_log``: read those ranges from the durable log and step each back as a LogRead input (a new
       input, so after this Ready is done).
    7. ``take_snapshot`` / ``fetch_snapshot``: start them in the background (they take seconds) and step
       ``SnapshotTaken`` / ``SnapshotFetched`` when done. A snapshot is taken of the applied database (so
       after every ``apply`` handed out before it); the log is compacted only once it is durable.
    ``facts`` are for logging only.

    Group commit: the shell may step several inputs and carry out their Readys together (their writes in
    one fsync), provided every write of those Readys completes before any of their messages, applies or
    replies, and the Readys keep their order. That is what lets a follower fsync once for many Appends.

    Pipelined shells (``Options.pipelined``, Raft thesis 10.2.1): the shell need not wait for the log
    writes (2) before stepping the next input, and it may send a message for which ``early(message)`` holds
    (Appends, heartbeats and their acks, rejections: none claims anything durable) before or while the
    log writes of its Ready and of every earlier Ready run. What still holds, in this order:

    a. ``hard_state`` is durable before ANY message of its Ready or of any later Ready is sent (early ones
       included): no message of an epoch exists that a restart could forget;
    b. the log writes of all Readys happen in Ready order;
    c. a message for which ``early`` is false (AppendAck, Promise, FetchReply, TakeOver, and every message
       of a Ready with ``hard_state``), ``apply`` and ``read_log`` wait until the log writes of their Ready
       and of every earlier Ready are durable, and are carried out in Ready order (an entry is applied only
       once it is durable here, an ack only claims what is on disk);
    d. when the writes of a Ready with ``append`` are durable, the shell steps ``Persisted(append[-1].id)``:
       only then does a leader count its own copy of those entries toward the commit majority. So a leader
       that crashes after sending an Append but before its own fsync never counted an entry it lost.
    ``replies`` may be handled at once (a SubmitAccepted is answered only when its entry is applied).
    """

    hard_state: HardState | None = None
    truncate_from: int | None = None
    append: tuple[Entry, ...] = ()
    messages: tuple[Send, ...] = ()
    apply: tuple[Entry, ...] = ()
    replies: tuple[Reply, ...] = ()
    read_log: tuple[ReadLog, ...] = ()
    facts: tuple[Fact, ...] = field(default=())
    install: InstallSnapshot | None = None
    take_snapshot: bool = False
    fetch_snapshot: tuple[FetchSnapshot, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.hard_state
            or self.truncate_from
            or self.append
            or self.messages
            or self.read_log
            or self.apply
            or self.replies
            or self.facts
            or self.install
            or self.take_snapshot
            or self.fetch_snapshot
        )
