"""Replication core: one cluster-wide log, majority commit, epochs, safe leader change. Pure.

``step(state, input, now) -> (state, Ready)`` (``machine.py``) in the style of etcd-io/raft: no I/O, no
clock reads, no randomness; ``now`` (seconds) arrives with every input. ``Ready`` (``messages.py``) lists
what the shell must do, in order: persist hard state, truncate/append the log (fsync), THEN send messages,
read old entries back from disk, apply committed entries, answer clients.

Protocol rules (what the README's design section quotes):

* **Leader choice keeps the documented rule.** The candidate is the highest-ID healthy *voter* in this
  node's membership view (``ViewChanged``: persistent identity -> current numeric ID; IDs follow addresses,
  identities never change, and the log, promises and configuration speak only of identities). Learners never
  campaign. A candidate does not depose a leader it still hears from: that leader hands over instead.
  Members may disagree on who is a voter while a CONFIG entry is not yet everywhere, so deference ends: a
  voter that has deferred to a higher one for a lease plus one election timeout per node ranked above it
  in its view, hearing no leader, campaigns itself (and then hands over to the highest voter, planned);
  a node that promised an epoch to a healthy candidate lets that campaign run for an election timeout.
* **Epochs.** Taking epoch e needs promises from a majority of voters (the candidate's own promise counts
  only if it has not promised e to anyone else). A promise is durable (Ready.hard_state) before it is sent,
  and the new leader's epoch is durable before any message of that epoch is sent. Messages from lower epochs
  change nothing (requests are answered with ``Stale``). A voter promises a new epoch only if it has not
  heard from a current leader within the lease (a leader only if it has lost majority contact), so a node
  that merely cannot hear the leader (a one-way cut) cannot move the epoch; the exception is an explicit
  handover (``Prepare.handover``) started by the current leader's ``TakeOver``.
* **View change before serving.** Every promise carries the voter's (last epoch, last index). The new leader
  takes every entry it lacks from the most advanced promiser (``Fetch``/``FetchReply``), truncating its own
  divergent uncommitted suffix, then appends an ``EPOCH_START`` entry in its own epoch. Only entries of the
  leader's own epoch are committed by counting replicas, so committing EPOCH_START commits everything
  before it; only then is the leader *writable*. Any committed entry is on a majority, which meets the
  promising majority, and the most advanced log (higher last epoch, then longer) holds all of them (Raft
  §5.4): a stale highest-ID node therefore leads only after it has every committed entry, and can never roll
  back a committed write.
* **Commit.** An entry is committed when a majority of voters have it durably (followers acknowledge only
  after their append is persisted: Ready order). Followers learn the commit index from the leader, capped at
  what they verified to match the leader's log; entries are applied in log order. Followers truncate a
  divergent suffix above their commit index and never a committed entry (``truncate`` refuses).
* **Old leaders step down.** A leader without majority contact within the lease stops accepting writes and
  confirming linearizable reads (writable = false, "no quorum: k of n voters reachable"). A higher epoch
  seen anywhere makes it a follower; its uncommitted entries are then overwritten by the new leader's.
* **Linearizable reads (ReadIndex).** A read takes the commit index when it arrives, then a heartbeat round
  numbered after it; once a majority of voters answered that round (or a later one), the read is confirmed
  at that index and served when applied. Only a writable leader accepts reads.
* **Membership.** Voters and learners live in the log (``CONFIG`` entries), take effect when appended, and
  change one at a time: a new change only after the previous one is committed. A voter promises to a
  candidate outside its own configuration when the candidate's log is at least as up to date as its own
  (the candidate may hold a promotion the voter lacks); the candidate counts only its own voters. The leader adds a healthy
  unknown node as a learner, promotes a learner that has every committed entry and answers, and removes a
  voter (or learner) silent for ``reap_timeout_s``. A fresh cluster starts from ``bootstrap`` (the same
  committed entry 1 on every first member); a later node starts as ``joiner`` and waits to be added.
* **Planned handover.** A leader that sees a higher-ID voter healthy and answering (or that is stopping:
  ``Stop``) stops accepting writes and config changes, keeps replicating until that voter has its whole log,
  then sends ``TakeOver``; the successor campaigns at once with a handover prepare. A handover not done within
  ``handover_timeout_s`` is abandoned and the leader writes again.
* **Lost majority (operator only).** No rule above lets a minority write again. ``recovery.plan`` computes
  what ``python -m node recover`` writes on one stopped survivor: a CONFIG entry naming it the only voter,
  in a new epoch, and a hard state with a fresh cluster name, so no node holding the old history is ever
  heard again; it then leads alone and commits its whole log. Unsafe by nature (see ``recovery``).
* **Group commit.** ``Submit`` carries many commands: one Ready, one append, one fsync. Appends are
  pipelined: up to ``max_inflight`` unacknowledged full batches per follower, while the log's open tail (a
  batch reaching its end) waits for the Append in flight to be answered, so that writes arriving meanwhile
  travel together; lost ones are resent after ``resend_s`` from the last matching index.
* **Catch-up and memory.** A follower that rejects an Append returns a hint (its last index, or the last
  index whose epoch is not newer than the leader's); the leader backs off to it and probes one batch at a
  time. Only ``keep_applied`` applied entries (plus all unapplied ones) stay in memory; older ones are read
  back from the durable log by the shell (``ReadLog`` action -> ``LogRead`` input), so memory does not grow
  with the log. Unapplied entries are bounded on the leader by ``max_uncommitted`` (Submit -> busy).

Wiring (what the shell, the Replicator actor, does; ``tests/support/repsim.py`` is a working example):

* Start: a first cluster member calls ``bootstrap(identity, voters)``, a later node ``joiner(identity)``; a
  restart calls ``restore(identity, hard_state, base, entries_above_base, applied_index)`` with what the
  durable log and the state machine hold (base = the applied entry's LogId).
* Feed one input at a time, each with the loop clock's ``now``: ``Tick`` when a timer is due
  (``machine.next_deadline(state, now_of_its_step)``: a Tick before it changes nothing; or simply every few
  milliseconds), ``ViewChanged`` whenever the membership view changes, ``Receive`` for every
  authenticated peer message, ``Submit``/``Read`` batched from clients, ``LogRead`` answering ``ReadLog``,
  ``Stop`` on SIGTERM. Carry out each Ready in its order (see ``messages.Ready``); several Readys may be
  combined into one fsync if all their writes complete before any of their sends, applies and replies.
  A pipelined shell (``Options.pipelined``) sends Appends while its own log write runs and steps
  ``Persisted`` when it ends; the leader counts its own copy toward the majority only then (the orders
  that still hold: ``messages.Ready``).
* Clients: keep each SubmitAccepted (request, epoch, index); answer it when ``index`` is applied, with the
  state machine's result if the applied entry has that epoch, else as discarded (leader change). Serve a
  ReadConfirmed once applied >= its index. Rejections map to errors: not-leader -> forward to ``leader``
  (or 301), no-quorum and not-writable -> 503 with the reason, busy -> 503.
"""

from node.core.replication.machine import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    Options,
    State,
    Status,
    bootstrap,
    joiner,
    restore,
    status,
    step,
)
from node.core.replication.messages import (
    Config,
    Entry,
    HardState,
    Input,
    Kind,
    LogId,
    LogRead,
    Message,
    Persisted,
    Read,
    ReadConfirmed,
    ReadLog,
    ReadRejected,
    Ready,
    Receive,
    Send,
    Stop,
    Submit,
    SubmitAccepted,
    SubmitRejected,
    Tick,
    ViewChanged,
)

__all__ = [
    "CANDIDATE",
    "FOLLOWER",
    "LEADER",
    "Config",
    "Entry",
    "HardState",
    "Input",
    "Kind",
    "LogId",
    "LogRead",
    "Message",
    "Options",
    "Persisted",
    "Read",
    "ReadConfirmed",
    "ReadLog",
    "ReadRejected",
    "Ready",
    "Receive",
    "Send",
    "State",
    "Status",
    "Stop",
    "Submit",
    "SubmitAccepted",
    "SubmitRejected",
    "Tick",
    "ViewChanged",
    "bootstrap",
    "joiner",
    "restore",
    "status",
    "step",
]
