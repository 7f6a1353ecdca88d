"""The Replicator: the shell around the pure replication core (``node.core.replication``).

It owns the core's State and is the only code that steps it. Inputs, fed one at a time with the loop clock:
``Tick`` when the core has a timer due (``machine.next_deadline``: a leader's next heartbeat, a lease running
out...; at least ``TICK_S`` after the previous step, at most ``MAX_TICK_S``) and no other input came meanwhile
(every step runs the core's timers), ``ViewChanged`` when the membership view (or what we know of identities) changes,
``Receive`` for every authenticated peer message, ``Submit`` and ``Read`` batched from clients (a leader
under load holds submits for a moment so that more share one Submit: ``node.core.replication.gather``), ``LogRead``
answering the core's ``ReadLog``, ``Stop`` at shutdown.

Each loop round steps every input that is waiting and carries out their Readys as a pipelined shell
(``Options.pipelined``, the rules in ``messages.Ready``): every write is queued, in order, on the durable
log's thread (hard state saved atomically and fsynced, truncate, append + fsync: consecutive appends share
one fsync) and the loop goes on stepping inputs while they run. Messages that ``messages.early`` allows
(Appends, heartbeats, their acks) are sent at once, unless a hard-state write is still running (then they
wait like the rest); replies and facts are handled at once. Everything else of a Ready (AppendAcks and the
other late messages, applies, ``read_log``) goes to the completer's queue, whose Readys are carried out in
order, each once its writes and all earlier ones are durable, and then ``Persisted`` is stepped for its
append (a leader counts its own copy toward the majority only then). Who carries them out costs hand-offs,
not order (``_advance``): the writes' done callbacks, or ``_carry_out`` itself for a Ready without writes
behind an empty queue (the commit an ack brings), and the completer task only for what needs waiting (a
log read, a full apply backlog) or may stop the node (a failed write). So a leader's Appends are on the
wire while its own fsync runs, a follower keeps receiving while it fsyncs, and concurrent writes share
fsyncs.
A log append or truncate that fails cleanly (disk full, an I/O error the log undid) stops everything of that
Ready and of every later one from going out (no ack for what the disk does not hold) and the core is
rebuilt from what is durable (``restore``, as at a restart) after LOG_FAILURE_BACKOFF_S, without exiting:
/readyz says why, a follower is caught up by its leader once space returns. Any other write failure (the
hard state, a log left in doubt) raises: the Node fails and is started again from what is durable
(in the same process, node.runtime.restart; or by the node's supervisor with RESTART_ON_CRASH=off).

Apply: committed entries go, in order, to the applier task, which gives each run of them to
``Database.apply(last index, all their commands)``: one SQLite transaction whose applied index moves to the
last entry, so a run is applied all or nothing (a later entry can never be recorded while an earlier one
failed). A failed apply is retried (the replica reports the entries as not applied meanwhile): a local
failure is never a result. A file load (``LoadFile``: /db/load of an SQLite file) replaces the whole
database, so it applies alone; staging, fetching, applying and pruning those files is
:mod:`node.replication.file_loads`.

Clients: ``submit`` answers when the entry is applied (the real results), as discarded when the entry
applied at its index has another epoch (a leader change overwrote it), at once with the core's reason when
rejected, and as "outcome unknown" when this node loses its quorum or its leadership while the entry
waits (it may still commit: a retry with the same X-Request-Id is applied at most once).

Bounded queues and their overflow policies:

* peer messages in: ``MAX_INBOX`` messages, the oldest dropped (the core resends what matters);
* client submits and reads waiting for the next round: ``MAX_PENDING_CLIENTS``, beyond it 503 busy;
* committed entries waiting for the applier: ``MAX_APPLY_BACKLOG``; beyond it the loop waits (backpressure);
* Readys waiting for their writes (the completer's queue): ``MAX_UNSYNCED_READYS``; beyond it the loop
  waits (backpressure).

Start-up integrity and quarantine (:mod:`node.replication.startup`, read its docstring): before the core
state is built, the database and the log are checked and the identity and hard state read; damaged
replicated state is quarantined as one event and the node starts again empty under a new identity, and
while a quarantine is kept and the node holds no replicated state it only rejoins a cluster, never
bootstraps one (``rejoin_only``).

Formation and merge: the rules are pure, in ``node.core.replication.formation`` (read its docstring);
this actor gathers the facts and acts. An empty node waits ``FORMATION_WINDOW`` (plus at most one more
window until its view is settled), then joins a cluster it sees, or bootstraps if it has the highest ID.
Every ``REFORM_CHECK_S`` an empty joiner re-decides, and a member compares itself with the other clusters
it sees: two groups that bootstrapped apart (they did not see each other within the window) merge, the
one without client data dissolving into the other; two clusters that both hold data never merge: each
node logs ``cluster_conflict`` (at most once per ``CONFLICT_LOG_INTERVAL_S``) and reports it in
/cluster/status. Each peer's answer to a replication batch carries what the rules need (``cluster_facts``:
the leader it follows, that leader's ID, whether it holds data).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import errors
from node.core import membership as m
from node.core.ids import Endpoint
from node.core.replication import formation, gather, machine
from node.core.replication import messages as msg
from node.replication import codec
from node.replication import snapshot_transfer as transfer
from node.replication.codec import from_log_entry, to_log_entries
from node.replication.file_loads import FileLoads, load_sources
from node.replication.own_commands import decoded_form
from node.replication.snapshotting import Snapshots
from node.replication.startup import Restore, StorageOpener, read_restore
from node.replication.transport import ReplicationTransport
from node.runtime import logging as nodelog
from node.runtime.mailbox import LatestCell
from node.storage import corestate, statemachine
from node.storage.asynclog import AsyncLog
from node.storage.corestate import REPLICATION_STATE_FILE
from node.storage.durable import is_disk_full
from node.storage.log import (
    DurableLog,
    LogCompacted,
    LogDiskFull,
    LogError,
    LogIOError,
)
from node.storage.sqlite import ApplyFailed, Database
from node.storage.statemachine import Applied

# Ticks: never sooner than TICK_S after the previous step (work a step leaves for the next one is done one
# tick later, as with a fixed tick), never later than MAX_TICK_S (a bound, should a timer ever be missed).
# A fixed 10 ms tick cost an idle node ~100 core steps and loop rounds a second.
TICK_S = 0.01
MAX_TICK_S = 0.25
MAX_INBOX = 8192
MAX_PENDING_CLIENTS = 4096
MAX_APPLY_BACKLOG = 8192
MAX_APPLY_RUN = 512  # entries per Database.apply call
MAX_APPLY_RUN_BYTES = 8 << 20
# A follower gathers committed entries into larger apply runs: it applies once FOLLOWER_APPLY_BATCH entries
# wait, or FOLLOWER_APPLY_DELAY_S after the first of them was handed to the applier, whichever comes first
# (at once while a linearizable read waits on the applied index, or once it leads). Its database lags the
# commit by that much more; in exchange one transaction serves several writes instead of one each, which
# on a machine the nodes share is CPU taken from the leader's critical path (see _gather_applies).
FOLLOWER_APPLY_BATCH = 64
FOLLOWER_APPLY_DELAY_S = 0.02
# A leader runs its own entries in SQLite while their Append is on its way (see _stage_sent), and only
# COMMITs that transaction once the log has committed them: the apply overlaps the followers' round trip.
STAGE_OWN_ENTRIES = True
# When the log has committed only the first entries of a staged group (the leader's own fsync or an ack
# covered part of it), the applier waits this long at most for the rest before it applies them as usual.
STAGED_WAIT_S = 0.02
LOG_READ_BYTES = 4 << 20
APPLY_RETRY_S = 0.5
APPLY_FAILURE_LOG_S = 30.0  # the same apply failure is logged again at most this often (it is retried)
REFORM_CHECK_S = 1.0
LOG_FAILURE_BACKOFF_S = 1.0  # after a failed log write, before the state is rebuilt from the disk
# Facts that repeat for every message of another cluster's leader: logged at most once per FACT_REPEAT_S
# per (event, sender), with a ``suppressed`` count.
REPEATING_FACTS = frozenset({"foreign_history", "foreign_cluster"})
FACT_REPEAT_S = 10.0
CONFLICT_LOG_INTERVAL_S = 30.0
DISSOLVE_CHECKS = 2  # the same DISSOLVE decision on this many checks in a row before acting on it
INLINE_DECODE_BYTES = 64 << 10
MAX_UNSYNCED_READYS = 1024
REFUSED_HOLD_S = 2.0




def _remove_durably(path: Path) -> None:
    """Blocking: the file is gone, and its directory entry removal is on disk, when this returns."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- client-facing errors -----------------------------------------------------------------------------------


class NotWritable(errors.NodeError):
    status = 503
    code = "not_writable"


class Discarded(errors.NodeError):
    status = 503
    code = "discarded"


class OutcomeUnknown(errors.NodeError):
    status = 503
    code = "outcome_unknown"


class UnknownMember(errors.NodeError):
    status = 404
    code = "unknown_voter"


class MembershipConflict(errors.NodeError):
    """A removal the cluster's state refuses now: another change in flight, the leader itself, the last voter."""

    status = 409
    code = "membership_conflict"


_CONFLICT_CODES = {
    "conflict": "membership_conflict",
    "is-leader": "remove_leader",
    "last-voter": "last_voter",
}


def _queued(queue: Any, *args: Any) -> asyncio.Future:
    """``queue(*args)`` puts a request in the durable log's queue and returns its future; a request the log
    refused at once (busy, closed) becomes a future failed with that error, met where writes are awaited."""
    try:
        return queue(*args)
    except LogError as exc:
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(exc)
        return failed


def _write_timed_out(future: asyncio.Future, timeout_s: float) -> None:
    """``submit``'s deadline: the write is in the log (or on its way there), so its outcome is unknown."""
    if not future.done():
        future.set_exception(
            OutcomeUnknown(
                f"the write was not committed within {timeout_s:g} s; it may still be applied: retry with "
                "the same X-Request-Id"
            )
        )


def rejection_error(code: str, reason: str, leader_url: str | None) -> errors.NodeError:
    if code == "unknown":
        return UnknownMember(reason)
    if code in _CONFLICT_CODES:
        error = MembershipConflict(reason)
        error.code = _CONFLICT_CODES[code]
        return error
    if code == "no-quorum":
        return errors.NoQuorum(reason)
    if code == "not-writable":
        return NotWritable(reason)
    if code == "busy":
        return errors.Busy(reason)
    return errors.NotLeader(reason, leader_url)


@dataclass(slots=True)
class _Unsynced:
    """What of one Ready waits for its writes (and every earlier one) to be durable."""

    writes: list[asyncio.Future]
    messages: list[msg.Send]
    apply: tuple[msg.Entry, ...]
    read_log: tuple[msg.ReadLog, ...]
    appended: msg.LogId | None  # stepped as Persisted once durable


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future
    epoch: int = 0
    index: int = 0
    kind: msg.Kind = msg.Kind.COMMAND  # the entry kind it waits for (CONFIG: an operator's removal)
    # The payload submitted and its command as decoding it gives (None: not known, decode): the applier
    # uses the command for the entry at ``index`` only if that entry holds this very payload object.
    payload: bytes | None = None
    command: statemachine.Command | None = None


@dataclass(frozen=True, slots=True)
class _Staged:
    """A leader's own entries run in a transaction left open (Database.stage_entries): committed only if the
    log commits entries holding these very payloads at these indices, right after the applied index."""

    token: object
    first: int
    payloads: tuple[bytes, ...]
    outcomes: tuple[tuple[Applied, ...], ...]


def _staged_entries(picked: list[tuple[int, bytes, statemachine.Command]]) -> list[statemachine.Entry]:
    return [statemachine.Entry(index, (command,)) for index, _, command in picked]


class Replicator:
    def __init__(
        self,
        *,
        me: Endpoint,
        data_dir: Path,
        database: Database,
        views: LatestCell[m.View],
        secret: str,
        formation_window_s: float,
        log: Any,
        options: machine.Options | None = None,
        peer_timeout_s: float = 2.0,
        handover_budget_s: float = 0.5,
        snapshot_rate: transfer.RateLimiter | None = None,
        log_segment_bytes: int | None = None,
        gathering: gather.Gather | None = None,
    ) -> None:
        self.me = me
        self.data_dir = data_dir
        self.database = database
        self.views = views
        self.formation_window_s = formation_window_s
        self.options = options or machine.Options(pipelined=True)
        self.log = log
        self._log_segment_bytes = log_segment_bytes
        self._secret = secret
        self._peer_timeout_s = peer_timeout_s
        self._handover_budget = handover_budget_s
        # Set when the loop is over (handed over, nothing to hand over, or out of budget; or never
        # started): from then on the node may say goodbye and stop serving HTTP (see the supervisor).
        self.done = asyncio.Event()
        # The node is shutting down (from the signal on): requests that find no leader here are told that,
        # not "no leader", so clients retry elsewhere for the right reason.
        self.stopping = False
        self.identity: str | None = None
        self.state: machine.State | None = None
        self.transport: ReplicationTransport | None = None
        self._asynclog: AsyncLog | None = None
        self.incarnation = 0
        self.ready = asyncio.Event()  # set once the core state exists (restored, bootstrapped or joining)
        # Peer identities: address <-> identity, and whether that peer said it belongs to a cluster.
        self.identities: dict[Endpoint, str] = {}
        self.members: dict[Endpoint, bool] = {}
        # What each peer's last answer said of its cluster: (leader identity, leader ID, holds data).
        self.peer_clusters: dict[Endpoint, tuple[str | None, int, bool, str]] = {}
        self.holds_data = False  # any COMMAND entry in the log, or a table in the database
        self.conflict: formation.Decision | None = None  # set while facing another cluster with data
        self._conflict_logged_at: float | None = None
        self._dissolve_votes = 0
        # Clusters this node dissolved out of (bounded: one per dissolve, the newest kept): while it has no
        # cluster, it takes no leader of those back, or a leader that has not dissolved yet could re-add it.
        self._left_clusters: collections.deque[str] = collections.deque(maxlen=8)
        self._fact_limiter = nodelog.RateLimiter(FACT_REPEAT_S)  # see _log_fact
        self._log_failure: BaseException | None = None  # set from a failed log write until _resync is done
        self.log_write_problem: str | None = None  # for /readyz: until an append succeeds again
        self._view_dirty = True
        self._last_view: dict[str, int] | None = None
        # Inputs waiting for the next round.
        self._inbox: collections.deque[msg.Receive] = collections.deque()
        self._submits: list[tuple[str, bytes]] = []
        # Group commit: submits are held here while others are under way (node.core.replication.gather).
        self._gathering = gathering or gather.Gather()
        self._held_since = 0.0  # loop time the first of the held submits arrived
        self._gather_timer: asyncio.TimerHandle | None = None  # wakes the loop when they are due
        self._gather_over = False  # that timer ran: the held submits are due
        self._reads: list[str] = []
        self._removals: list[msg.RemoveMember] = []  # operator requests (bounded with the client queue)
        self._log_reads: list[msg.LogRead] = []
        self._stop_requested = False
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._waiters: dict[str, _Waiter] = {}  # request id -> waiter (submitted, not yet accepted)
        self._by_index: dict[int, tuple[str, _Waiter]] = {}  # accepted, waiting for apply
        self._read_waiters: dict[str, asyncio.Future] = {}
        self._confirmed: list[tuple[int, asyncio.Future]] = []  # (index, future): serve once applied
        self._apply_queue: collections.deque[msg.Entry] = collections.deque()
        self._apply_wake = asyncio.Event()
        self._apply_room = asyncio.Event()
        self._apply_room.set()
        self._sent_through = 0  # the highest index this node has sent in an Append (as leader)
        self._staged: _Staged | None = None
        self._staged_wait_until: float | None = None  # loop time: a partly committed staged group waits
        self._stage_refused_at = 0  # staging from this index gave nothing: not tried again there
        # Pipelined Readys waiting for their writes, in order (the completer's queue), and what it feeds back.
        self._unsynced: collections.deque[_Unsynced] = collections.deque()
        self._unsynced_wake = asyncio.Event()
        self._unsynced_room = asyncio.Event()
        self._unsynced_room.set()
        self._unsynced_empty = asyncio.Event()
        self._unsynced_empty.set()
        self._completer_busy = False  # the completer task is carrying out the head item (see _advance)
        self._advance_failure: Exception | None = None  # raised in a write's done callback, for the task
        self._hard_writes = 0  # hard-state writes running: no message leaves before they are durable
        self._persisted: list[msg.Persisted] = []
        self.applied_index = 0
        # Snapshot work (taking, fetching, installing): see node.replication.snapshotting. Its results come
        # back as core inputs through _snapshot_inputs.
        self._snapshot_inputs: list[msg.Input] = []
        self.snapshots = Snapshots(
            data_dir=data_dir, database=database, log=log, options=self.options, feed=self._feed_snapshot,
            rate=snapshot_rate,
        )  # fmt: skip
        self.snapshots.on_installed = self._installed
        self.snapshots.url_of = self.url_of
        # Set at start while DATA_DIR/quarantine holds damaged state and this node holds none: it only joins
        # an existing cluster, never starts one of its own (that would serve an empty database in place of
        # the data it lost, silently). Why, for /readyz and data calls, until it is a member.
        self.rejoin_only: str | None = None
        self._rejoin_logged = False
        # Start-up integrity and quarantine: see node.replication.startup.
        self._opener = StorageOpener(
            data_dir=data_dir, database=database, snapshots=self.snapshots, log=log,
            log_segment_bytes=log_segment_bytes, read_bytes=LOG_READ_BYTES, adopt=self._adopt_storage,
            hold=self._set_rejoin_only,
        )  # fmt: skip
        self.stats = {
            "dropped_inbox": 0, "apply_failures": 0, "unroutable": 0,
            "staged": 0, "staged_committed": 0, "staged_dropped": 0,
            "write_groups": 0, "write_groups_gathered": 0,
        }  # fmt: skip
        self._apply_failure_logged: tuple[str, float] | None = None  # (reason, loop time) of the last line
        # Staged SQLite-file loads (applying, fetching a missed file, staging, pruning): see
        # node.replication.file_loads.
        self.file_loads = FileLoads(
            data_dir=data_dir, database=database, snapshots=self.snapshots, log=log,
            sources=lambda: load_sources(self.state, self.identity, self.url_of),
        )  # fmt: skip

    # --- what other components ask ---------------------------------------------------------------------

    def begin(self, incarnation: int) -> None:
        self.incarnation = incarnation

    @property
    def is_member(self) -> bool:
        """Belongs to a cluster: has a configuration or a log (even before its state is restored)."""
        s = self.state
        if s is not None:
            return bool(s.config.voters) or s.last.index > 0
        return self._asynclog is not None and self._asynclog.last[1] > 0

    def status(self) -> machine.Status | None:
        return machine.status(self.state) if self.state is not None else None

    def endpoint_of(self, identity: str | None) -> Endpoint | None:
        if identity is None:
            return None
        for endpoint, who in self.identities.items():
            if who == identity:
                return endpoint
        return None

    def leader_endpoint(self) -> Endpoint | None:
        """The healthy leader this node follows, if it is another node (None when it leads or knows none)."""
        s = self.state
        if s is None or s.role == machine.LEADER or s.leader is None or s.leader == self.identity:
            return None
        if s.leader not in s.view:
            return None
        return self.endpoint_of(s.leader)

    def is_leader(self) -> bool:
        return self.state is not None and self.state.role == machine.LEADER

    def receive(self, sender: str, address: Endpoint, messages: list[msg.Message], cluster: str = "") -> None:
        """From the HTTP endpoint, after the batch was authenticated. Never blocks; overflow drops oldest.
        ``cluster``: the sender's, from the batch (the core refuses another cluster's messages)."""
        if (
            cluster
            and cluster in self._left_clusters
            and self.state is not None
            and not self.state.hard.cluster
        ):
            return  # the cluster this node dissolved out of: it must not take this node back
        self.learn(address, sender, None)
        if self.transport is not None:
            self.transport.note_alive(address)
        for message in messages:
            if len(self._inbox) >= MAX_INBOX:
                self._inbox.popleft()
                self.stats["dropped_inbox"] += 1
            self._inbox.append(msg.Receive(sender, message, cluster))
        self._wake.set()

    @property
    def cluster_facts(self) -> dict[str, Any]:
        """What this node's answer to a replication batch tells the sender about its cluster."""
        s = self.state
        leader = None if s is None else (self.identity if s.role == machine.LEADER else s.leader)
        name = "" if s is None else s.hard.cluster
        return {
            "leader": leader,
            "leader_id": self._node_id_of(leader),
            "data": self.holds_data,
            "name": name,
        }

    def _node_id_of(self, identity: str | None) -> int:
        if identity is None:
            return 0
        if identity == self.identity:
            return self.me.node_id
        endpoint = self.endpoint_of(identity)
        return 0 if endpoint is None else endpoint.node_id

    def learn(
        self,
        endpoint: Endpoint,
        identity: str,
        member: bool | None,
        cluster: tuple[str | None, int, bool, str] | None = None,
    ) -> None:
        if endpoint == self.me:
            return
        if cluster is not None and self.peer_clusters.get(endpoint) != cluster:
            self.peer_clusters[endpoint] = cluster
            self._view_dirty = True
        if self.identities.get(endpoint) != identity:
            # An address now answered by another identity (a re-created container): drop the old mapping.
            for other, who in list(self.identities.items()):
                if who == identity and other != endpoint:
                    del self.identities[other]
            self.identities[endpoint] = identity
            self._view_dirty = True
            self._wake.set()
        if member is not None and self.members.get(endpoint) != member:
            self.members[endpoint] = member
            self._view_dirty = True

    def _refuse_when_done(self) -> None:
        """After the loop is over (stopping: handed over, or nothing to hand over) nobody would ever step a
        new request: it would hang until the HTTP server's shutdown cancelled it, holding its client
        (and the exit) for up to a second. Answer at once so the client retries on another node."""
        if self.done.is_set():
            raise errors.Unavailable("this node is shutting down; retry on another node")

    async def submit(
        self, payload: bytes, timeout_s: float, command: statemachine.Command | None = None
    ) -> tuple[int, int, Applied | None]:
        """Append a command as leader and wait for its apply: (epoch, index, outcome). ``command``: what
        ``payload`` encodes, if the caller has it: the applier then need not decode it back (see
        node.replication.own_commands; it is used only in the form decoding gives, else decoded)."""
        if len(self._submits) + len(self._reads) >= MAX_PENDING_CLIENTS:
            raise errors.Busy("replication queue is full; retry shortly")
        self._refuse_when_done()
        if self.state is None:
            raise errors.Unavailable("replication is starting (forming or joining a cluster)")
        rid = f"w{next(self._ids)}"
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future())
        if command is not None:
            waiter.payload, waiter.command = payload, decoded_form(command)
        self._waiters[rid] = waiter
        now = loop.time()
        if not self._submits:
            self._held_since = now
        self._submits.append((rid, payload))
        if self._submits_due(now):  # else held: the gathering timer wakes the loop (_submits_due)
            self._wake.set()
        # The deadline fails the waiter's future itself: what asyncio.timeout did (this task cancelled, the
        # cancellation turned into TimeoutError, then into this answer) for a timer and a context object on
        # every write.
        timer = loop.call_later(timeout_s, _write_timed_out, waiter.future, timeout_s)
        try:
            return await waiter.future
        finally:
            timer.cancel()
            self._waiters.pop(rid, None)
            if waiter.index and self._by_index.get(waiter.index, (None,))[0] == rid:
                del self._by_index[waiter.index]

    async def remove_member(self, identity: str, timeout_s: float) -> tuple[int, int]:
        """Operator: remove a voter (or learner) through the log; (epoch, index) once the change is applied.
        Rejections raise (404 unknown, 409 conflict, 503 no quorum / not leader); a change accepted but not
        applied within ``timeout_s`` raises OutcomeUnknown (look at /cluster/status)."""
        if len(self._submits) + len(self._reads) + len(self._removals) >= MAX_PENDING_CLIENTS:
            raise errors.Busy("replication queue is full; retry shortly")
        if self.state is None:
            raise errors.Unavailable("replication is starting (forming or joining a cluster)")
        rid = f"m{next(self._ids)}"
        waiter = _Waiter(asyncio.get_running_loop().create_future(), kind=msg.Kind.CONFIG)
        self._waiters[rid] = waiter
        self._removals.append(msg.RemoveMember(rid, identity))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                epoch, index, _ = await waiter.future
                return epoch, index
        except TimeoutError:
            raise OutcomeUnknown(
                f"the removal was not committed within {timeout_s:g} s; see /cluster/status for the voters"
            ) from None
        finally:
            self._waiters.pop(rid, None)
            if waiter.index and self._by_index.get(waiter.index, (None,))[0] == rid:
                del self._by_index[waiter.index]

    def identity_of_node_id(self, node_id: int) -> list[str]:
        """Identities of cluster members known under the numeric ID (as /cluster/status shows it)."""
        s = self.state
        if s is None:
            return []
        members = s.config.members
        found = {who for endpoint, who in self.identities.items() if endpoint.node_id == node_id}
        if node_id == self.me.node_id and self.identity is not None:
            found.add(self.identity)
        found |= {who for who, nid in s.view.items() if nid == node_id}
        return sorted(who for who in found if who in members)

    async def confirm_read(self, timeout_s: float) -> int:
        """Linearizable read: the index this node has applied once a majority confirmed it still leads."""
        if len(self._submits) + len(self._reads) >= MAX_PENDING_CLIENTS:
            raise errors.Busy("replication queue is full; retry shortly")
        self._refuse_when_done()
        if self.state is None:
            raise errors.Unavailable("replication is starting (forming or joining a cluster)")
        rid = f"r{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._read_waiters[rid] = future
        self._reads.append(rid)
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise errors.Unavailable(
                f"the read was not confirmed by a majority within {timeout_s:g} s"
            ) from None
        finally:
            self._read_waiters.pop(rid, None)

    # --- life cycle -------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.database.announce_check()  # before the first await: no data call sees "not open" meanwhile
        try:
            restore = await self._opener.open(stop)
            if restore is None:
                return  # stopping, or a database that cannot be opened (the node stays not ready)
            assert self.identity is not None and self._asynclog is not None
            self.log.info("replication_starting", identity=self.identity)
            self.transport = ReplicationTransport(
                secret=self._secret,
                me=self.me,
                identity=self.identity,
                timeout_s=self._peer_timeout_s,
                learn=self.learn,
                log=self.log,
                refused=self._peer_refused,
            )
            self.transport.begin(self.incarnation)
            self.snapshots.sign_headers = transfer.peer_headers(self.transport.signer)
            async with asyncio.TaskGroup() as tg:
                transport = tg.create_task(self.transport.run(), name="replication-transport")
                snapshots = tg.create_task(self.snapshots.run(), name="replication-snapshots")
                watcher = tg.create_task(self._watch_views(), name="replication-views")
                completer = tg.create_task(self._completer(), name="replication-completer")
                stopper = tg.create_task(self._wake_on(stop), name="replication-stop")
                if not stop.is_set():
                    await self._start_state(stop, restore)
                applier = tg.create_task(self._applier(), name="replication-applier")
                if self.state is not None:
                    await self._loop(stop)
                for task in (transport, watcher, applier, completer, snapshots, stopper):
                    task.cancel()
        finally:
            self._completer_busy = True  # the loop is over: nothing more is carried out (see _advance)
            if self._gather_timer is not None:
                self._gather_timer.cancel()
            self.done.set()
            self._fail_all(errors.Unavailable("the node is shutting down"))
            if self._asynclog is not None:
                await self._asynclog.close()

    async def _start_state(self, stop: asyncio.Event, restore: Restore | None = None) -> None:
        assert self._asynclog is not None and self.identity is not None
        if restore is None:
            restore = await read_restore(
                self.data_dir, self._asynclog, self.identity, self.database, self.snapshots, LOG_READ_BYTES
            )
        hard, applied = restore.hard, restore.applied
        last_epoch, last_index = restore.last
        if hard is None and (last_index == 0 or last_epoch == 0):
            if applied or last_index:
                # Data written without replication (its own log's entries carry epoch 0): refuse to pretend
                # it is a replicated history, or the node would follow no one for ever.
                raise errors.RefusedToRun(
                    f"DATA_DIR holds a database written without replication (applied index {applied}, "
                    f"log up to {last_index}); "
                    "start with REPLICATION=off, or load a backup into an empty replicated cluster"
                )
            await self._form(stop)
            return
        if applied > last_index:
            raise errors.RefusedToRun(
                f"the database applied index {applied} is beyond the log's last {last_index}"
            )
        first_index = self._asynclog.first_index
        if applied < first_index - 1:
            raise errors.RefusedToRun(
                f"the database applied index {applied} is below the log's first entry {first_index}: the "
                "entries between are compacted away (an older copy of the database?)"
            )
        hard = hard or msg.HardState()
        self.state = machine.restore(
            self.identity, hard, msg.LogId(restore.base_epoch, applied), restore.entries, applied, self.options,
            snapshot=self.snapshots.newest_id(hard.cluster), first_index=first_index,
        )  # fmt: skip
        self.snapshots.cluster = hard.cluster
        self.snapshots.reset_configs(tuple(c for c in self.state.hard.configs if c[0] <= applied))
        self.applied_index = applied
        self.holds_data = await self._log_holds_data()
        self.log.info(
            "replication_restored", epoch=self.state.hard.epoch, applied_index=applied, last_index=last_index,
            voters=len(self.state.config.voters),
        )  # fmt: skip
        self.ready.set()

    async def _form(self, stop: asyncio.Event) -> None:
        """See the module docstring (Formation)."""
        deadline = asyncio.get_running_loop().time() + self.formation_window_s
        while not stop.is_set():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.1)):
                    await stop.wait()
        # Then, bounded by one more window: wait until every peer in the view is healthy and has told us who
        # it is and whether it belongs to a cluster (a peer DNS just listed is still being probed).
        extra_deadline = asyncio.get_running_loop().time() + self.formation_window_s
        while not stop.is_set() and not self._view_settled():
            if asyncio.get_running_loop().time() >= extra_deadline:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await stop.wait()
        assert self.identity is not None
        if stop.is_set():
            return  # stopping during formation: decide nothing (the next start forms again)
        decision = formation.decide_empty(self.me.node_id, self._formation_peers(), window_over=True)
        if decision.action is formation.Action.BOOTSTRAP and not self._refuse_bootstrap():
            await self._bootstrap()
        else:
            self.state = machine.joiner(self.identity, self.options)
            self.log.info("replication_joining", reason=decision.reason)
        self.ready.set()

    def _healthy_peers(self) -> list[m.Member]:
        view = self.views.get()
        return [] if view is None else [p for p in view.healthy if not p.is_self]

    def _formation_peers(self, *, healthy_only: bool = True) -> list[formation.Peer]:
        """The view's peers with what this node knows of them, for the pure rules."""
        view = self.views.get()
        if view is None:
            return []
        out = []
        for p in view.members:
            if p.is_self or (healthy_only and not p.healthy):
                continue
            leader, leader_id, data, name = self.peer_clusters.get(p.endpoint, (None, 0, False, ""))
            out.append(
                formation.Peer(
                    p.node_id, p.healthy, self.identities.get(p.endpoint), self.members.get(p.endpoint),
                    leader, leader_id, data, name,
                )
            )  # fmt: skip
        return out

    def _formation_me(self) -> formation.Me:
        assert self.identity is not None
        s = self.state
        config: frozenset[str] = frozenset()
        if s is not None:
            config = frozenset(s.config.voters) | frozenset(s.config.learners)
        facts = self.cluster_facts
        return formation.Me(
            self.me.node_id, self.identity, self.is_member, self.holds_data, facts["leader"],
            facts["leader_id"], config, facts["name"],
        )  # fmt: skip

    def _view_settled(self) -> bool:
        view = self.views.get()
        if view is None:
            return False
        return formation.settled(self._formation_peers(healthy_only=False))

    def awaiting_rejoin(self) -> str | None:
        """Why this node serves nothing yet: its data was quarantined and no cluster has taken it back."""
        return None if self.rejoin_only is None or self.is_member else self.rejoin_only

    def _refuse_bootstrap(self) -> bool:
        """The formation rules say "bootstrap", but this node lost its data (see ``rejoin_only``)."""
        if self.rejoin_only is None:
            return False
        if not self._rejoin_logged:
            self._rejoin_logged = True
            self.log.warning("replication_waits_for_cluster", reason=self.rejoin_only)
        return True

    async def _bootstrap(self) -> None:
        assert self.identity is not None
        cluster = uuid.uuid4().hex
        self.state, ready = machine.bootstrap(
            self.identity, frozenset({self.identity}), self.options, cluster
        )
        self.log.info("replication_bootstrapped", voters=1, identity=self.identity, cluster=cluster)
        await self._carry_out([ready])
        await self._drain()  # a bootstrap is durable before anything else runs

    def _adopt_storage(self, alog: AsyncLog | None, identity: str | None) -> None:
        """What the StorageOpener opened (None: closed again for a quarantine)."""
        self._asynclog, self.identity = alog, identity

    def _set_rejoin_only(self, reason: str | None) -> None:
        self.rejoin_only = reason

    # --- the loop ---------------------------------------------------------------------------------------

    async def _wake_on(self, stop: asyncio.Event) -> None:
        """The loop sleeps until its next input or timer: a stop must wake it too, at once. The applier's
        last write job may still run on the database's writer thread when this run ends: whoever closes the
        database afterwards (the node's data service, after the handover; the tests) has that close queued
        behind the job on the same thread, and Database.close checkpoints the WAL whatever the shutdown
        interrupted (it no longer needs the TICK_S this once waited)."""
        await stop.wait()
        self._wake.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        next_reform = loop.time() + REFORM_CHECK_S
        stop_sent_at: float | None = None
        led_at_stop = False
        stepped: machine.State | None = None  # the State the last step made (next_tick is its deadline)
        stepped_at = 0.0
        deadline_due = False  # next_tick is still to be worked out from (stepped, stepped_at)
        while True:
            if self._log_failure is not None and not stop.is_set():
                await self._resync(stop)
                continue
            now = loop.time()
            if self.state is not stepped:
                next_tick = now  # replaced outside the loop's steps (resync, bootstrap, dissolve): tick it
                deadline_due = False
            elif deadline_due and not self._has_inputs():
                # Only when the loop is about to sleep (or tick): under load the next round's inputs run
                # the core's timers anyway, and the deadline of every intermediate State is not needed.
                deadline_due = False
                deadline = machine.next_deadline(stepped, stepped_at)
                next_tick = min(max(deadline, stepped_at + TICK_S), stepped_at + MAX_TICK_S)
            if stop.is_set() and stop_sent_at is None:
                stop_sent_at = now
                self._stop_requested = True
                self.stopping = True
                led_at_stop = self.state is not None and self.state.role == machine.LEADER
            if (
                stop_sent_at is not None
                and not self._stop_requested  # the core has seen Stop, so handover_to is its decision
                and (now - stop_sent_at > self._handover_budget_s() or not self._handing_over())
            ):
                self.log.info(
                    "replication_stopped", led=led_at_stop,
                    handed_over=led_at_stop and self.state is not None and self.state.role != machine.LEADER,
                    took_ms=round((now - stop_sent_at) * 1000, 1),
                )  # fmt: skip
                return
            if not self._has_inputs():
                wake_at = min(next_tick, next_reform)
                if stop_sent_at is not None:
                    wake_at = min(wake_at, now + TICK_S)  # the handover budget is checked above
                self._wake.clear()
                timer = loop.call_at(wake_at, self._wake.set)  # no timeout context: no exception a tick
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                now = loop.time()
            inputs: list[msg.Input] = []
            if self._persisted:
                inputs.extend(self._persisted)
                self._persisted = []
            if self._snapshot_inputs:
                inputs.extend(self._snapshot_inputs)
                self._snapshot_inputs = []
            if self._log_reads:
                inputs.extend(self._log_reads)
                self._log_reads = []
            if self._view_dirty:
                self._view_dirty = False
                healthy = self._healthy_identities()
                if healthy != self._last_view:
                    self._last_view = healthy
                    inputs.append(msg.ViewChanged(healthy))
            if self._stop_requested:
                self._stop_requested = False
                inputs.append(msg.Stop())
            for _ in range(min(len(self._inbox), 1024)):
                inputs.append(self._inbox.popleft())
            if self._submits and self._submits_due(now):
                inputs.append(msg.Submit(tuple(self._submits)))
                self._submits = []
                self.stats["write_groups"] += 1
                if self._gather_timer is not None:
                    self._gather_timer.cancel()
                    self._gather_timer = None
                    self._gather_over = False
                    self.stats["write_groups_gathered"] += 1
            if self._reads:
                inputs.append(msg.Read(tuple(self._reads)))
                self._reads = []
            inputs.extend(self._removals)
            self._removals = []
            if not inputs and not deadline_due and now >= next_tick:
                inputs.append(msg.Tick())  # (any other input runs the core's timers as well)
            readys = []
            assert self.state is not None
            step_at = now
            for inp in inputs:
                step_at = loop.time()
                self.state, ready = machine.step(self.state, inp, step_at)
                if not ready.empty:
                    readys.append(ready)
            if inputs:
                stepped, stepped_at, deadline_due = self.state, step_at, True
            self.snapshots.cluster = self.state.hard.cluster
            if readys:
                await self._carry_out(readys)
            self._settle_lost_quorum()
            if now >= next_reform:
                next_reform = now + REFORM_CHECK_S
                await self._reform(now)

    async def _reform(self, now: float) -> None:
        """Re-decide formation (an empty joiner) or merge/conflict (a member); see formation's rules."""
        peers = self._formation_peers()
        if not self.is_member:
            self.conflict = None
            self._dissolve_votes = 0
            if formation.decide_empty(self.me.node_id, peers, window_over=True).action is (
                formation.Action.BOOTSTRAP
            ) and not self._refuse_bootstrap():
                await self._bootstrap()
            return
        decision = formation.decide_member(self._formation_me(), peers)
        if decision.action is formation.Action.CONFLICT:
            self.conflict = decision
            if self._conflict_logged_at is None or now - self._conflict_logged_at >= CONFLICT_LOG_INTERVAL_S:
                self._conflict_logged_at = now
                self.log.warning(
                    "cluster_conflict", other_leader=decision.other_leader,
                    other_leader_id=decision.other_leader_id, reason=decision.reason,
                )  # fmt: skip
        else:
            if self.conflict is not None:
                self.log.info("cluster_conflict_over")
            self.conflict = None
            self._conflict_logged_at = None
        if decision.action is not formation.Action.DISSOLVE:
            self._dissolve_votes = 0
            return
        self._dissolve_votes += 1
        if self._dissolve_votes >= DISSOLVE_CHECKS:
            self._dissolve_votes = 0
            await self._dissolve(decision)

    async def _log_holds_data(self) -> bool:
        """Any COMMAND entry in the durable log, or any table (besides ours) in the database. A log compacted
        after a snapshot counts as data (its history is in the database): such a cluster never dissolves."""
        assert self._asynclog is not None
        if self._asynclog.first_index > 1:
            return True
        index, last = 1, self._asynclog.last[1]
        while index <= last:
            chunk = await self._asynclog.read(index, LOG_READ_BYTES)
            if not chunk:
                break
            if any(codec.KINDS_BY_CODE[e.kind] is msg.Kind.COMMAND for e in chunk):
                return True
            index = chunk[-1].index + 1
        return await self._database_has_tables()

    async def _database_has_tables(self) -> bool:
        prefix = statemachine.INTERNAL_PREFIX

        def count(job: Any) -> int:
            rows = self.database._ops(job).internal(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                "AND substr(name, 1, ?) != ?",
                (len(prefix), prefix),
            )
            return int(rows[0][0])

        return await self.database._write(count) > 0

    async def _dissolve(self, decision: formation.Decision) -> None:
        """Leave a cluster without client data for the other one: clear the log, become a joiner.

        Checked again, exactly, just before (any COMMAND entry or table: refuse). Crash-safe order: the
        database's applied index goes to 0 first (it may never exceed the log's last index), then the hard
        state file goes, then the log: a restart in between restores a cluster without data again, which
        the same rule dissolves.
        """
        assert self._asynclog is not None and self.identity is not None
        await self._drain()  # nothing queued may apply or write after the reset below
        if self.holds_data or await self._log_holds_data():
            self.holds_data = True
            return
        self.log.warning(
            "replication_dissolving", other_leader=decision.other_leader,
            other_leader_id=decision.other_leader_id, reason=decision.reason,
        )  # fmt: skip
        # Entries not yet applied are configuration entries only; an apply in flight is queued on the
        # database's writer before the reset below, so the reset comes after it.
        self._apply_queue.clear()
        self._apply_room.set()
        self._fail_all(errors.Unavailable("this node is joining another cluster; retry"))
        self._waiters.clear()
        self._by_index.clear()
        self._confirmed.clear()
        self._staged = None  # rolled back by the next job on the writer
        await self.database._write(lambda job: statemachine.set_applied(self.database._ops(job), 0))
        await asyncio.to_thread(_remove_durably, self.data_dir / REPLICATION_STATE_FILE)
        await self.snapshots.forget_all()
        if self._asynclog.first_index > 1:
            await self._asynclog.reset(0, 0)
        else:
            await self._asynclog.truncate_after(0)
        self.applied_index = 0
        if self.state is not None and self.state.hard.cluster:
            self._left_clusters.append(self.state.hard.cluster)
        self.state = machine.joiner(self.identity, self.options)
        self._last_view = None
        self._view_dirty = True
        self._wake.set()

    def _handover_budget_s(self) -> float:
        return self._handover_budget

    def _handing_over(self) -> bool:
        """Stopping as leader with a successor to hand to: the loop goes on until it took the lead (this
        node then follows it) or the budget is spent. A leader without an answering voter to hand to (a
        cluster of one, or every other voter away) has nothing to wait for."""
        s = self.state
        return s is not None and s.role == machine.LEADER and s.handover_to is not None

    def _submits_due(self, now: float) -> bool:
        """Whether the held submits enter the log now (``gather.release_at``); if not, a timer wakes the loop
        when they do. Only a leader gathers: anywhere else the core answers them at once (not leading)."""
        s = self.state
        if s is None or s.role != machine.LEADER or self._gather_over:
            return True
        due = gather.release_at(self._gathering, len(self._submits), len(self._waiters), self._held_since)
        if due <= now:
            return True
        if self._gather_timer is None:
            self._gather_timer = asyncio.get_running_loop().call_at(due, self._gathered)
        return False

    def _gathered(self) -> None:
        # A flag, not a comparison with loop.time(): uvloop may run a timer a little before the loop's clock
        # reaches its deadline, and the held submits would then wait for the next tick.
        self._gather_over = True
        self._wake.set()

    def _has_inputs(self) -> bool:
        return bool(
            self._inbox or (self._submits and self._submits_due(asyncio.get_running_loop().time()))
            or self._reads or self._log_reads or self._view_dirty
            or self._stop_requested or self._removals or self._persisted or self._snapshot_inputs
        )  # fmt: skip

    def _healthy_identities(self) -> dict[str, int]:
        """The view given to the core. A member leaves out the nodes of other clusters (and peers whose
        membership it does not know yet), so its leader never adds them as learners: merging is only
        ever the formation rules' decision."""
        assert self.identity is not None
        healthy = {self.identity: self.me.node_id}
        me = self._formation_me() if self.is_member else None
        peers = self._formation_peers()
        recruit = me is not None and formation.may_recruit(me, peers)
        for peer in peers:
            if peer.identity is None:
                continue
            if me is not None and formation.is_foreign(me, peer):
                continue  # by name, also a node this cluster added before it joined another one
            if me is not None and peer.identity not in me.config:
                if peer.member is None:
                    continue
                if not peer.member and not recruit:
                    continue  # a joiner is for the cluster that wins the formation rules
            healthy[peer.identity] = peer.node_id
        if self.transport is not None:
            # A peer whose port refused us is gone (SIGKILL, crash) even if failure detection has not
            # counted its missed probes yet: leave it out until anything works with it again, for at most
            # REFUSED_HOLD_S (by then the membership view says so itself). See the transport's docstring.
            now = asyncio.get_running_loop().time()
            for endpoint, identity in self.identities.items():
                if identity in healthy and self.transport.recently_refused(endpoint, now, REFUSED_HOLD_S):
                    del healthy[identity]
        return healthy

    def _peer_refused(self, _endpoint: Endpoint) -> None:
        """The transport found a peer gone (connection refused) or back: give the core a new view now."""
        self._view_dirty = True
        self._wake.set()

    async def _watch_views(self) -> None:
        """Mark the view dirty when membership changes; ping healthy peers whose identity we do not know."""
        seen = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    seen, _ = await self.views.wait_newer(seen)
            self._view_dirty = True
            self._wake.set()
            if self.transport is not None:
                # Peers of this node's own cluster answer its batches anyway; any other peer is asked
                # again and again, since what it says (member or not, its leader, its data) drives the
                # formation rules and changes (a node that dissolved, a cluster that got data).
                config = self._formation_me().config if self.identity is not None else frozenset()
                for peer in self._healthy_peers():
                    identity = self.identities.get(peer.endpoint)
                    if identity is None or not self.members.get(peer.endpoint) or identity not in config:
                        self.transport.ping(peer.endpoint)

    # --- carrying out Readys ----------------------------------------------------------------------------

    async def _carry_out(self, readys: list[msg.Ready]) -> None:
        """Queue every write of the Readys (in order), send what may go now, hand the rest to the completer.
        The orders kept are those of ``messages.Ready`` (pipelined shells)."""
        assert self._asynclog is not None and self.transport is not None
        alog, identity = self._asynclog, self.identity
        assert identity is not None
        # Persisted only counts for a leader, for entries of the epoch it leads (``machine.persisted``). A node
        # that is not leading after these steps either never led the epochs of these entries or stepped down
        # from it, and epochs only grow: its Persisted could never count, so a follower skips that step (and
        # the loop round it costs) for every batch it appends.
        pipelined = self.options.pipelined
        persist_steps = pipelined and self.state is not None and self.state.role == machine.LEADER
        for ready in readys:
            # Futures (not coroutines): each request is in the log's queue when this returns, so the log
            # thread sees them in Ready order.
            writes: list[asyncio.Future] = []
            if ready.hard_state is not None:
                self._hard_writes += 1
                hard = ready.hard_state
                write = _queued(
                    alog.run_future,
                    lambda _log, h=hard: corestate.save_core_hard_state(self.data_dir, h, identity),
                )
                write.add_done_callback(self._hard_write_done)
                writes.append(write)
            if ready.install is not None:
                # On the log's thread, in order with the writes around it (see node.replication.snapshotting).
                loop = asyncio.get_running_loop()
                writes.append(
                    _queued(alog.run_future, self.snapshots.install_on_log_thread, loop, ready.install)
                )
            if ready.truncate_from is not None:
                writes.append(_queued(alog.run_future, DurableLog.truncate_after, ready.truncate_from - 1))
            if ready.append:
                if not self.holds_data and any(e.kind is msg.Kind.COMMAND for e in ready.append):
                    self.holds_data = True
                entries = to_log_entries(ready.append)
                writes.append(_queued(alog.append_and_sync_future, entries))
            late = list(ready.messages)
            if pipelined and self._hard_writes == 0:
                late = []
                for send in ready.messages:
                    if msg.early(send.message):
                        self._send(send)
                    else:
                        late.append(send)
            for reply in ready.replies:
                self._reply(reply)
            for fact in ready.facts:
                self._log_fact(fact)
            if ready.take_snapshot:
                self.snapshots.take()
            for fetch in ready.fetch_snapshot:
                self.snapshots.fetch(fetch.source, fetch.snapshot)
            if writes or late or ready.apply or ready.read_log:
                appended = ready.append[-1].id if ready.append and persist_steps else None
                await self._queue_unsynced(_Unsynced(writes, late, ready.apply, ready.read_log, appended))

    def _feed_snapshot(self, inp: msg.Input) -> None:
        self._snapshot_inputs.append(inp)  # at most one per taken or fetched snapshot: bounded by those
        self._wake.set()

    def _installed(self, install: msg.InstallSnapshot) -> None:
        """The database now holds the snapshot (on the loop, before the log reset and the ack). Entries at or
        below it that wait in the apply queue are in it already; writes waiting for them learn nothing
        more of their outcome here."""
        index = install.snapshot.index
        self.applied_index = max(self.applied_index, index)
        for at, (_, waiter) in list(self._by_index.items()):
            if at <= index:
                if not waiter.future.done():
                    waiter.future.set_exception(
                        OutcomeUnknown("this node installed a snapshot; retry with the same X-Request-Id")
                    )
                del self._by_index[at]
        self._serve_confirmed()

    def _log_fact(self, fact: msg.Fact) -> None:
        """One line per fact; a fact that repeats for every message of another cluster's leader (see
        REPEATING_FACTS) at most once per FACT_REPEAT_S per (event, sender), with the count it stood for."""
        fields = dict(fact.fields)
        if fact.event in REPEATING_FACTS:
            held = self._fact_limiter.admit((fact.event, str(fields.get("leader") or fields.get("sender"))))
            if held is None:
                return
            if held:
                fields["suppressed"] = held
        self.log.info("replication_" + fact.event, **fields)

    def _hard_write_done(self, _future: asyncio.Future) -> None:
        self._hard_writes -= 1

    def _send(self, send: msg.Send) -> None:
        assert self.transport is not None
        endpoint = self.endpoint_of(send.to)
        if endpoint is not None:
            self.transport.send(endpoint, send.message, send.cluster)
            message = send.message
            if type(message) is msg.Append and message.entries:
                self._sent_through = max(self._sent_through, message.entries[-1].index)
                if self._staged is None:
                    self._apply_wake.set()  # the applier may stage them (_stage_sent)
        else:
            self.stats["unroutable"] += 1  # no address known for that identity yet: the core resends

    async def _queue_unsynced(self, item: _Unsynced) -> None:
        while len(self._unsynced) >= MAX_UNSYNCED_READYS:
            self._unsynced_room.clear()
            await self._unsynced_room.wait()
        self._unsynced.append(item)
        self._unsynced_empty.clear()
        for write in item.writes:
            write.add_done_callback(self._write_done)
        # A Ready without writes (the commit of an ack: apply and messages only) behind nothing is carried out
        # here and now: see _advance for why the order is the completer's.
        self._advance()

    async def _drain(self) -> None:
        """Wait until every queued Ready is carried out (its writes durable, its sends and applies done)."""
        await self._unsynced_empty.wait()

    def _write_done(self, _write: asyncio.Future) -> None:
        """A log write finished (a done callback, on the loop): carry out what it held up. A failure here is
        the completer task's to raise, so that the node stops as it would have in the task."""
        try:
            self._advance()
        except Exception as exc:  # noqa: BLE001 - re-raised by the completer task
            self._advance_failure = self._advance_failure or exc
            self._unsynced_wake.set()

    def _advance(self) -> None:
        """Carry out, in order, the queued Readys (the completer's queue, ``_unsynced``) whose writes are all
        durable, as far as that needs no waiting; leave the rest to the completer task.

        Why the order is exactly the one ``messages.Ready`` (c, d) and the completer task give: items are only
        ever carried out from the head of the one FIFO queue they were put in, in Ready order, each only once
        every write of it is done (and the log thread runs writes in queue order, so every earlier Ready's
        writes are durable too), and never while the completer task is carrying out the head itself
        (``_completer_busy``: it pops its item only when done with it). So this does what the completer would
        do next, only without the two wake-ups (write done -> completer task -> loop) it cost: a Ready
        without writes behind an empty queue goes out at once, and a write's done callback sends the acks,
        queues the applies and feeds ``Persisted`` back to the loop directly. What needs waiting (a log
        read, the applier's backlog full) or may have to stop the node (a failed or cancelled write) is the
        completer task's, in the same place of the order."""
        unsynced = self._unsynced
        while unsynced and not self._completer_busy:
            item = unsynced[0]
            for write in item.writes:
                if not write.done():
                    return  # its done callback (_write_done) comes back here
            if (
                item.read_log
                or (item.apply and len(self._apply_queue) >= MAX_APPLY_BACKLOG)
                or any(w.cancelled() or w.exception() is not None for w in item.writes)
            ):
                self._unsynced_wake.set()
                return
            unsynced.popleft()
            self._unsynced_room.set()
            if self._log_failure is not None:
                continue  # dropped, as the completer drops it (see there)
            if item.writes:
                self.log_write_problem = None  # the log takes writes again
            for send in item.messages:
                self._send(send)
            if item.apply:
                self._apply_queue.extend(item.apply)
                self._apply_wake.set()
            if item.appended is not None:
                self._persisted.append(msg.Persisted(item.appended))
                self._wake.set()
        if not unsynced:
            self._unsynced_empty.set()

    async def _completer(self) -> None:
        """Carry out, in order, what each Ready left for after its writes (see ``_carry_out``) when that needs
        waiting or may stop the node; the rest is carried out by ``_advance`` without this task. Every write
        of an item is awaited to its end (none is left running unobserved), then the first failure
        propagates: the node restarts from what is durable."""
        while True:
            if self._advance_failure is not None:
                raise self._advance_failure
            self._advance()
            if not self._unsynced or not all(w.done() for w in self._unsynced[0].writes):
                # Nothing queued, or the head's writes still run: their done callbacks carry it out, or wake
                # this task for what it must do itself.
                self._unsynced_wake.clear()
                await self._unsynced_wake.wait()
                continue
            self._completer_busy = True
            try:
                await self._complete_head()
            finally:
                self._completer_busy = False

    async def _complete_head(self) -> None:
        """The completer task's part: the head item, whose writes are all done (some may have failed). It is
        popped only at the end, so that ``_advance`` never carries out a later item meanwhile."""
        item = self._unsynced[0]
        failure: BaseException | None = None
        for write in item.writes:
            if write.cancelled():
                raise errors.Unavailable("a log write was cancelled; what it wrote is unknown")
            failure = failure or write.exception()
        if failure is not None and not self._recoverable(failure):
            raise failure
        if failure is not None:
            self._log_write_failed(failure)
        if self._log_failure is None:
            # (Otherwise nothing of this Ready goes out, nor of any Ready queued after it: their acks would
            # claim entries the disk does not hold. The loop rebuilds the state from the disk: _resync.)
            if item.writes:
                self.log_write_problem = None  # the log takes writes again
            for send in item.messages:
                self._send(send)
            if item.apply:
                await self._enqueue_apply(item.apply)
            for request in item.read_log:
                entries = await self._read_range(request.first, request.last)
                self._log_reads.append(msg.LogRead(request, entries))
            if item.appended is not None:
                self._persisted.append(msg.Persisted(item.appended))
            if item.read_log or item.appended is not None:
                self._wake.set()
        self._unsynced.popleft()
        self._unsynced_room.set()

    def _recoverable(self, failure: BaseException) -> bool:
        """A log write that failed without leaving the log in doubt (disk full, an I/O error undone), or an
        append queued behind such a failure (it no longer follows the log): resync, do not exit."""
        if isinstance(failure, LogDiskFull | LogIOError):
            return True
        if is_disk_full(failure):
            # The hard state (written to a temp file, fsynced, renamed: a full disk fails the first two, which
            # leave the old file) or a snapshot's database install: nothing of it took effect, and nothing of
            # its Ready was sent (messages wait for hard-state writes).
            return True
        return self._log_failure is not None and isinstance(failure, ValueError)

    def _log_write_failed(self, failure: BaseException) -> None:
        if self._log_failure is not None:
            return
        self._log_failure = failure
        self.log_write_problem = f"log write failed: {failure}"[:300]
        assert self._asynclog is not None
        self.log.error(
            "replication_log_write_failed", reason=str(failure)[:300], durable_index=self._asynclog.last[1]
        )
        self._wake.set()

    async def _resync(self, stop: asyncio.Event) -> None:
        """After a log write failed (see ``_recoverable``): the core's log is ahead of the disk. Answer the
        waiting clients (outcome unknown: an entry sent to followers may still commit), drop every Ready
        queued meanwhile (the completer does), wait LOG_FAILURE_BACKOFF_S so a full disk is not retried in
        a tight loop, and restore the core from what is durable, exactly as a restart would, without
        exiting: the node keeps serving reads and /readyz says why it is not ready. A leader comes back as
        a follower; a follower acknowledges nothing it does not hold and is caught up by its leader."""
        failure = self._log_failure
        self._fail_all(
            OutcomeUnknown(f"this node could not write its log ({failure}); the write may still commit")
        )
        self._waiters.clear()
        self._by_index.clear()
        self._confirmed.clear()
        self._staged = None  # rolled back by the next job on the writer
        self._submits.clear()
        self._reads.clear()
        await self._drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LOG_FAILURE_BACKOFF_S):
                await stop.wait()
        self._inbox.clear()  # what arrived meanwhile was for the state being replaced; leaders resend
        self._apply_queue.clear()  # re-committed (and so re-applied, idempotently) from the restored state
        self._apply_room.set()
        await self._start_state(stop)
        self._log_failure = None
        self._last_view = None
        self._view_dirty = True

    async def _read_range(self, first: int, last: int) -> tuple[msg.Entry, ...]:
        """Entries first..last from the log, or fewer: reading stops once one batch's worth is in hand (the
        previous entry and ``max_batch_bytes`` of payload), since the core sends one batch per read; large
        entries are then never read (and held) by the dozen to send one."""
        assert self._asynclog is not None
        out: list[msg.Entry] = []
        index = first
        size = 0
        while index <= last and not (len(out) >= 2 and size >= self.options.max_batch_bytes):
            try:
                chunk = await self._asynclog.read(index, LOG_READ_BYTES)
            except LogCompacted:
                break  # compacted meanwhile: the core learns it from SnapshotTaken and offers a snapshot
            chunk = [e for e in chunk if e.index <= last]
            if not chunk:
                break
            out.extend(from_log_entry(e) for e in chunk)
            size += sum(len(e.payload) for e in chunk)
            index = chunk[-1].index + 1
        return tuple(out)

    def _reply(self, reply: msg.Reply) -> None:
        if isinstance(reply, msg.SubmitAccepted):
            waiter = self._waiters.get(reply.request_id)
            if waiter is not None and not waiter.future.done():
                waiter.epoch, waiter.index = reply.epoch, reply.index
                self._by_index[reply.index] = (reply.request_id, waiter)
        elif isinstance(reply, msg.SubmitRejected):
            waiter = self._waiters.get(reply.request_id)
            if waiter is not None and not waiter.future.done():
                url = self.url_of(reply.leader)
                waiter.future.set_exception(rejection_error(reply.code, reply.reason, url))
        elif isinstance(reply, msg.ReadConfirmed):
            future = self._read_waiters.get(reply.read_id)
            if future is not None and not future.done():
                if self.applied_index >= reply.index:
                    future.set_result(self.applied_index)
                else:
                    self._confirmed.append((reply.index, future))
                    self._apply_wake.set()  # a follower gathering applies (_gather_applies) applies now
        elif isinstance(reply, msg.ReadRejected):
            future = self._read_waiters.get(reply.read_id)
            if future is not None and not future.done():
                future.set_exception(rejection_error(reply.code, reply.reason, self.url_of(reply.leader)))

    def url_of(self, identity: str | None) -> str | None:
        """The base URL of the node with ``identity`` (as last heard), or None if unknown."""
        endpoint = self.endpoint_of(identity)
        return endpoint.url if endpoint is not None else None

    def _settle_lost_quorum(self) -> None:
        """Accepted writes waiting while this node cannot commit (not writable, not leading): answer now
        rather than hang; they may still commit later, so the answer says the outcome is unknown."""
        s = self.state
        if not self._by_index or s is None:
            return
        if s.role == machine.LEADER and (s.writable or s.stopping or s.commit < s.epoch_start):
            return  # still able to commit them (a handover keeps replicating until the successor has all)
        reason = "leadership lost" if s.role != machine.LEADER else "this leader lost its quorum"
        for index, (_, waiter) in list(self._by_index.items()):
            if index > self.applied_index and not waiter.future.done():
                waiter.future.set_exception(
                    OutcomeUnknown(
                        f"{reason} before the write committed; it may still be applied: retry with the same "
                        "X-Request-Id"
                    )
                )
            del self._by_index[index]

    def _fail_all(self, error: errors.NodeError) -> None:
        futures = [w.future for w in self._waiters.values()] + list(self._read_waiters.values())
        for future in futures:
            if not future.done():
                future.set_exception(error)

    # --- apply ------------------------------------------------------------------------------------------

    async def _enqueue_apply(self, entries: tuple[msg.Entry, ...]) -> None:
        while len(self._apply_queue) >= MAX_APPLY_BACKLOG:
            self._apply_room.clear()
            await self._apply_room.wait()
        self._apply_queue.extend(entries)
        self._apply_wake.set()

    def _apply_may_wait(self) -> bool:
        """Whether the applier may hold committed entries back to gather a larger run: only a follower, and
        only while no linearizable read waits for the applied index to reach its confirmed one."""
        state = self.state
        return (
            state is not None
            and state.role != machine.LEADER
            and not self._confirmed
            and len(self._apply_queue) < FOLLOWER_APPLY_BATCH
        )

    async def _gather_applies(self) -> None:
        """Wait until ``_apply_may_wait`` no longer holds or FOLLOWER_APPLY_DELAY_S have passed. Woken by every
        hand-off to the applier (``_apply_wake``): new entries, a read confirmed, a role change's first
        commit; the delay is a timer that sets the same event.

        Why a follower waits: it learns that entries are committed one message after their Append, so at one
        client it applies one entry per write, each a transaction of its own, at the moment the leader
        applies and answers the next write on the same cores. Measured with bench/replication_profile.py
        (3 nodes on 2 cores, runs alternated with the previous code): CPU per write of each follower relative
        to the leader's fell from 0.58-0.62 to 0.47-0.48 at one client and from 0.46-0.47 to 0.42-0.43 at 32.
        What is committed is decided by the log alone: the delay changes only how soon a follower's own copy
        shows it."""
        expired = False

        def expire() -> None:
            # A flag, not a comparison with loop.time(): uvloop runs a timer up to a millisecond before the
            # loop's own clock reaches its deadline, and a comparison would then wait for the next hand-off,
            # which after a cluster's last write never comes.
            nonlocal expired
            expired = True
            self._apply_wake.set()

        timer = asyncio.get_running_loop().call_later(FOLLOWER_APPLY_DELAY_S, expire)
        try:
            while self._apply_may_wait() and not expired:
                self._apply_wake.clear()
                await self._apply_wake.wait()
        finally:
            timer.cancel()

    async def _applier(self) -> None:
        while True:
            if not self._apply_queue:
                if self._staged is None and await self._stage_sent():
                    continue
                self._apply_wake.clear()
                await self._apply_wake.wait()
                continue
            if self._staged is not None and await self._finish_staged():
                continue
            if self._apply_may_wait():
                await self._gather_applies()
            run: list[msg.Entry] = []
            size = 0
            while self._apply_queue and len(run) < MAX_APPLY_RUN and size < MAX_APPLY_RUN_BYTES:
                entry = self._apply_queue[0]
                if entry.index <= self.applied_index:
                    # In the database already (an installed snapshot holds it): nothing to apply.
                    self._apply_queue.popleft()
                    self._answer_applied(entry, None)
                    continue
                if run and entry.index != run[-1].index + 1:
                    break  # one run is one contiguous range of the log (a snapshot install ends one)
                run.append(self._apply_queue.popleft())
                size += len(entry.payload)
            self._apply_room.set()
            if not run:
                continue
            try:
                done = await self._apply_run(run, size)
                if done < len(run):
                    # A file load ends or starts the run: it applies alone; the rest waits its turn.
                    self._apply_queue.extendleft(reversed(run[done:]))
                await self._prune_staged_loads()
            except (errors.NodeError, OSError, codec.CodecError, ApplyFailed) as exc:
                # A local failure is never a result: keep the run, report, retry.
                self.stats["apply_failures"] += 1
                now, reason = asyncio.get_running_loop().time(), str(exc)
                last = self._apply_failure_logged
                if last is None or last[0] != reason or now - last[1] >= APPLY_FAILURE_LOG_S:
                    self._apply_failure_logged = (reason, now)  # one line per reason per interval
                    self.log.error(
                        "replication_apply_failed", first=run[0].index, last=run[-1].index, reason=reason,
                        code=getattr(exc, "code", None), retries_every_s=APPLY_RETRY_S,
                    )  # fmt: skip
                self._apply_queue.extendleft(reversed(run))
                await asyncio.sleep(APPLY_RETRY_S)

    def _stageable(self, first: int) -> list[tuple[int, bytes, statemachine.Command]]:
        """The entries a leader may stage from ``first`` (the one right after what will be applied by then):
        its own plain writes, as far as they are sent in an Append (those commit together; staging one not
        yet sent would hold the answers of the ones before it until it commits too). Stops at anything else
        (a load, a configuration entry, another node's entry), which is applied after its commit as usual."""
        s = self.state
        if (
            not STAGE_OWN_ENTRIES or s is None or s.role != machine.LEADER or not s.writable
            or first > self._sent_through or first == self._stage_refused_at
        ):  # fmt: skip
            return []
        picked: list[tuple[int, bytes, statemachine.Command]] = []
        size = 0
        index = first
        last = min(self._sent_through, first + MAX_APPLY_RUN - 1)
        while index <= last and size < MAX_APPLY_RUN_BYTES:
            held = self._by_index.get(index)
            if held is None:
                break
            waiter = held[1]
            command, payload = waiter.command, waiter.payload
            if waiter.kind is not msg.Kind.COMMAND or command is None or payload is None:
                break
            if command.load is not None:
                break
            picked.append((index, payload, command))
            size += len(payload)
            index += 1
        return picked

    async def _stage_sent(self) -> bool:
        """Leader, nothing committed waiting: run the entries ``_stageable`` picks in a transaction left open
        (see Database.stage_entries), so that their apply overlaps the followers' round trip and only the
        COMMIT waits for the log's commit. True if something was staged."""
        picked = self._stageable(self.applied_index + 1)
        if not picked:
            return False
        try:
            staged = await self.database.stage_entries(_staged_entries(picked))
        except (errors.NodeError, OSError, ApplyFailed):
            staged = None  # applied after the commit instead, where a failure is retried and reported
        return self._now_staged(picked, staged)

    def _now_staged(
        self, picked: list[tuple[int, bytes, statemachine.Command]], staged: tuple[object, list] | None
    ) -> bool:
        """Record what staging ``picked`` (never empty: both callers stage only something) gave."""
        if staged is None:
            self._stage_refused_at = picked[0][0]
            return False
        self.stats["staged"] += 1
        token, outcomes = staged
        self._staged = _Staged(token, picked[0][0], tuple(p for _, p, _ in picked), tuple(outcomes))
        return True

    async def _finish_staged(self) -> bool:
        """Committed entries wait and a group is staged: COMMIT it if they begin with exactly its entries
        (same indices, the very payloads it ran), answer them, and return True; otherwise forget it (the
        next apply rolls it back on the writer) and return False, and the entries are applied as usual."""
        staged = self._staged
        assert staged is not None
        self._staged = None
        queue = self._apply_queue
        count = len(staged.payloads)
        head = itertools.islice(queue, count)  # it may hold fewer: see below
        if staged.first != self.applied_index + 1 or any(
            e.index != staged.first + k or e.payload is not p
            for k, (e, p) in enumerate(zip(head, staged.payloads, strict=False))
        ):
            self.stats["staged_dropped"] += 1
            self._staged_wait_until = None
            return False
        if len(queue) < count:
            # Only its first entries are committed yet; the rest were sent with them and commit at the
            # next ack or fsync, unless this node stops leading: then, or after STAGED_WAIT_S, apply as usual.
            s, now = self.state, asyncio.get_running_loop().time()
            if self._staged_wait_until is None:
                self._staged_wait_until = now + STAGED_WAIT_S
            if s is None or s.role != machine.LEADER or not s.writable or now >= self._staged_wait_until:
                self.stats["staged_dropped"] += 1
                self._staged_wait_until = None
                return False
            self._staged = staged
            self._apply_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._staged_wait_until - now):
                    await self._apply_wake.wait()
            return True
        self._staged_wait_until = None
        run = [queue.popleft() for _ in range(count)]
        self._apply_room.set()
        self.snapshots.record_configs(run)
        # What was sent since is staged by a job queued right behind the COMMIT (see Database.commit_staged).
        after = self._stageable(run[-1].index + 1)
        staging: asyncio.Future | None = None
        try:
            committed, staging = await self.database.commit_staged(staged.token, _staged_entries(after))
        except (errors.NodeError, OSError, ApplyFailed):
            committed = False  # nothing applied: as usual, where a failure is retried and reported
        if not committed:
            self.stats["staged_dropped"] += 1
            queue.extendleft(reversed(run))
            return False
        self.stats["staged_committed"] += 1
        self.applied_index = max(self.applied_index, run[-1].index)
        for entry, outcome in zip(run, staged.outcomes, strict=True):
            self._answer_applied(entry, outcome[0])
        self._serve_confirmed()
        if staging is not None:
            try:
                then = await staging
            except (errors.NodeError, OSError, ApplyFailed):
                then = None
            self._now_staged(after, then)
        await self._prune_staged_loads()
        return True

    async def _apply_run(self, run: list[msg.Entry], size: int) -> int:
        """Apply the run (or its first part, up to a file load, or the file load alone); returns how many of
        its entries were applied: the caller queues the others again, in order."""
        # The commands this node submitted itself are known (see _own_command); only the others are decoded.
        decoded: list[statemachine.Command | None] = [self._own_command(e) for e in run]
        missing = [i for i, e in enumerate(run) if e.kind is msg.Kind.COMMAND and decoded[i] is None]
        if missing:

            def decode() -> list[statemachine.Command]:
                return [codec.decode_command(run[i].payload) for i in missing]

            missing_bytes = sum(len(run[i].payload) for i in missing)
            found = decode() if missing_bytes <= INLINE_DECODE_BYTES else await asyncio.to_thread(decode)
            for i, command in zip(missing, found, strict=True):
                decoded[i] = command
        # A file load is a barrier: it replaces the whole database, so it never shares a run.
        file_at = next(
            (i for i, c in enumerate(decoded) if c is not None and isinstance(c.load, statemachine.LoadFile)),
            None,
        )
        if file_at == 0:
            await self._apply_file(run[0], decoded[0])
            return 1
        if file_at is not None:
            run, decoded = run[:file_at], decoded[:file_at]
        # Before the apply: a snapshot copied right after it must find the configuration of its index.
        self.snapshots.record_configs(run)
        # One statemachine entry per log entry, at its own index (a configuration entry has no command): a
        # command's outcome and its stored request ID name the index of its own entry, on every replica
        # however it groups its runs, as a leader's staged group does (_stage_sent).
        # apply_entries raises (ApplyFailed) when the COMMIT fails: the run is retried, never answered as
        # rolled back while its entries are committed in the log (a restart would apply them after all).
        outcomes = await self.database.apply_entries(
            [statemachine.Entry(e.index, () if c is None else (c,)) for e, c in zip(run, decoded, strict=True)]
        )
        self.applied_index = max(self.applied_index, run[-1].index)
        for entry, command, outcome in zip(run, decoded, outcomes, strict=True):
            self._answer_applied(entry, outcome[0] if command is not None and outcome else None)
        self._serve_confirmed()
        return len(run)

    def _own_command(self, entry: msg.Entry) -> statemachine.Command | None:
        """The command of ``entry`` if this node submitted it and still waits for it (the waiter holds it,
        in the form decoding gives), else None. Bounded and cleared with the waiters: each is dropped when
        its client is answered or gives up, on step-down (_settle_lost_quorum), on a snapshot install, a
        resync or a dissolve. Used only when the entry holds the very payload object submitted: an entry
        of another leader at that index (a truncation replaced it), or one read back from the disk, is
        decoded."""
        if entry.kind is not msg.Kind.COMMAND:
            return None
        held = self._by_index.get(entry.index)
        if held is None:
            return None
        waiter = held[1]
        return waiter.command if waiter.payload is entry.payload else None

    async def _apply_file(self, entry: msg.Entry, command: statemachine.Command) -> None:
        """Apply a file load (``LoadFile``): see node.replication.file_loads. Any failure raises: the
        applier retries it (a local failure is never a result)."""
        outcome = await self.file_loads.apply(entry, command)
        self.applied_index = max(self.applied_index, entry.index)
        self._answer_applied(entry, outcome)
        self._serve_confirmed()

    async def stage_load(self, sender: Endpoint, sha256: str, size_bytes: int) -> None:
        """``POST /cluster/replication/stage``: see :meth:`FileLoads.stage`."""
        await self.file_loads.stage(sender, sha256, size_bytes)

    async def _prune_staged_loads(self) -> None:
        """Staged files whose entry the log no longer holds are not needed again (module doc of
        ``staged_loads``)."""
        if self._asynclog is None:
            return
        await self.file_loads.prune(self._asynclog.first_index, self.applied_index - self.options.keep_applied)

    def _serve_confirmed(self) -> None:
        if self._confirmed:
            ready = [(i, f) for i, f in self._confirmed if i <= self.applied_index]
            self._confirmed = [(i, f) for i, f in self._confirmed if i > self.applied_index]
            for _, future in ready:
                if not future.done():
                    future.set_result(self.applied_index)

    def _answer_applied(self, entry: msg.Entry, outcome: Applied | None) -> None:
        held = self._by_index.pop(entry.index, None)
        if held is None:
            return
        _, waiter = held
        if waiter.future.done():
            return
        if entry.epoch != waiter.epoch or entry.kind is not waiter.kind:
            waiter.future.set_exception(Discarded("the write was discarded by a leader change; retry it"))
        elif outcome is None and entry.kind is msg.Kind.COMMAND:
            waiter.future.set_exception(OutcomeUnknown("the entry was applied before this node restarted"))
        else:
            waiter.future.set_result((entry.epoch, entry.index, outcome))
