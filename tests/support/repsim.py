"""Deterministic simulation of the replication core: N nodes, a fake clock, a lossy network, crashes.

Every node is only its pure ``State`` plus what its Readys asked to persist (``Durable``: hard state, log,
and the state machine's applied entries, which are durable with their index as SQLite will keep them). A
crash throws the State away; a restart rebuilds it with ``restore`` from Durable alone. The shell here
follows the Ready order exactly: persist, then send, then apply, then replies; a ReadLog is answered last,
as a new input.

Snapshots (``Ready.take_snapshot``) copy a node's applied entries and compact its log: entries below its
``first_index`` stay in the list (so the invariants can index it) but cannot be read. A core asking for one
it knows compacted is a violation; a read that a compaction overtook (pipelined: the read waits for the
Ready's writes, the snapshot does not) is answered short, as the Replicator answers it. A
``fetch_snapshot`` copies the source's snapshot after a random transfer time if the source runs and both
links work (else nothing: the leader offers again); ``install`` replaces the log and the applied history
by the snapshot's, as the real shell replaces the SQLite file and resets the log.

A torn crash (``tear``) loses power between the hard-state write and the log write of one Ready.

``pipelined=True`` runs the core with ``Options.pipelined`` and a shell that does what the real one does:
a Ready's hard state is written (durable) at once, its log writes are queued and become durable, in order,
after a random 0-3 ticks; messages that ``early()`` allows go out at once, the rest of the Ready (its other
messages, applies, ReadLog answers) waits for its writes, and ``Persisted`` is stepped when they are done.
A crash loses the queued writes and everything waiting for them: a leader that sent its Appends and died
before its own fsync.

The network delivers each message after a random delay (so it reorders), may drop or duplicate it, and
honours directed cuts (``cut(a, b)`` stops a -> b only; ``cut(a, b, both=True)``, ``isolate``). Views are
computed from the links unless a test sets them: a node sees a peer healthy when both directions work and
the peer runs (a probe is a round trip). All randomness comes from one ``random.Random(seed)``.

``Invariants`` checks the safety properties after every Ready; each check is a small method so a test can
show that it fails on a violating history.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field, replace

from node.core.replication import machine
from node.core.replication.messages import (
    AppendAck,
    Config,
    Entry,
    HardState,
    Kind,
    LogId,
    LogRead,
    Persisted,
    Prepare,
    Read,
    ReadConfirmed,
    ReadRejected,
    Ready,
    Receive,
    Refuse,
    Reply,
    SnapshotFetched,
    SnapshotTaken,
    Stop,
    Submit,
    SubmitAccepted,
    SubmitRejected,
    Tick,
    ViewChanged,
    early,
)


class InvariantViolated(AssertionError):
    pass


@dataclass
class Durable:
    hard: HardState | None = None
    log: list[Entry] = field(default_factory=list)  # entry i at log[i - 1]
    applied: list[Entry] = field(default_factory=list)  # the state machine's history, durable
    first_index: int = 1  # the log was compacted below this index (the entries stay listed, unreadable)
    snapshots: dict[int, tuple[LogId, Config, tuple[Entry, ...]]] = field(default_factory=dict)

    def newest_snapshot(self) -> LogId:
        return self.snapshots[max(self.snapshots)][0] if self.snapshots else LogId(0, 0)


@dataclass
class SimNode:
    identity: str
    durable: Durable
    state: machine.State | None
    replies: list[Reply] = field(default_factory=list)
    facts: list[tuple[float, str, dict]] = field(default_factory=list)
    view: dict[str, int] | None = None  # last view given
    pending: list[Ready] = field(default_factory=list)  # group commit: Readys not yet carried out
    unsynced: list[tuple[float, Ready]] = field(default_factory=list)  # pipelined: (due, Ready) in order
    carrying: Ready | None = None  # pipelined: the Ready with hard state whose earlier writes are completing
    # (the State a step made, machine.next_deadline of it): a Tick before that time must change nothing
    deadline: tuple[object, float] = (None, float("-inf"))
    # Pipelined: the last LogId of Readys carried out while the node was not leading. The Replicator feeds
    # no Persisted for those (it could never count): feeding it here must change nothing.
    appended_not_leading: set[LogId] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return self.state is not None


class Invariants:
    """Safety, checked against what nodes persisted and reported:

    * at most one leader commits per epoch;
    * a committed entry is never lost or changed (the first node to commit an index fixes its entry);
    * every log agrees with the committed entries up to its own commit index;
    * a node whose log lacks a committed entry never becomes writable;
    * the applied sequence of every node equals the committed prefix.
    """

    def __init__(self) -> None:
        self.committed: dict[int, Entry] = {}
        self.leaders_committing: dict[int, set[str]] = {}
        self.checked_commit: dict[str, int] = {}

    def record_commit(self, node: str, log: list[Entry], commit: int, leader_epoch: int | None) -> None:
        start = self.checked_commit.get(node, 0)
        if commit > start and leader_epoch is not None:
            who = self.leaders_committing.setdefault(leader_epoch, set())
            who.add(node)
            if len(who) > 1:
                raise InvariantViolated(f"two leaders committed in epoch {leader_epoch}: {sorted(who)}")
        for i in range(start + 1, commit + 1):
            if i > len(log):
                raise InvariantViolated(f"{node} commits {i} beyond its log ({len(log)})")
            known = self.committed.setdefault(i, log[i - 1])
            if known != log[i - 1]:
                raise InvariantViolated(f"committed entry {i} changed on {node}: {known} vs {log[i - 1]}")
        self.checked_commit[node] = max(start, commit)

    def forget_commit(self, node: str, commit: int) -> None:
        """After a restart the node's commit index starts again at its applied index."""
        self.checked_commit[node] = min(self.checked_commit.get(node, 0), commit)

    def check_truncate(self, node: str, truncate_from: int) -> None:
        if truncate_from <= self.checked_commit.get(node, 0):
            raise InvariantViolated(f"{node} truncates from {truncate_from}, below its commit")

    def check_sends(self, node: str, hard: HardState | None, log: list[Entry], messages) -> None:
        """Persist before send: no message of an epoch leaves before that epoch is durable (a Prepare asks
        for an epoch and a Refuse answers one, so they are exempt), and an AppendAck never claims entries
        that are not on disk."""
        durable_epoch = hard.epoch if hard is not None else 0
        for send in messages:
            m = send.message
            if not isinstance(m, Prepare | Refuse) and m.epoch > durable_epoch:
                raise InvariantViolated(
                    f"{node} sent {type(m).__name__} of epoch {m.epoch}, durable {durable_epoch}"
                )
            if isinstance(m, AppendAck) and m.match > len(log):
                raise InvariantViolated(f"{node} acknowledged {m.match} with {len(log)} entries on disk")

    def check_writable(self, node: str, log: list[Entry]) -> None:
        for i, entry in self.committed.items():
            if i > len(log) or log[i - 1] != entry:
                raise InvariantViolated(f"{node} became writable without committed entry {i}")

    def check_applied(self, node: str, applied: list[Entry], first_new: int) -> None:
        for pos in range(first_new, len(applied)):
            entry = applied[pos]
            if entry.index != pos + 1:
                raise InvariantViolated(f"{node} applied index {entry.index} at position {pos + 1}")
            if self.committed.get(entry.index) != entry:
                raise InvariantViolated(f"{node} applied {entry} which is not the committed entry")


class RepSim:
    def __init__(
        self,
        voters: int = 3,
        joiners: int = 0,
        seed: int = 0,
        options: machine.Options | None = None,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay_s: tuple[float, float] = (0.001, 0.004),
        tick_s: float = 0.005,
        view_lag_s: float = 0.0,
        group_commit: bool = False,
        pipelined: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.options = options or machine.Options()
        self.pipelined = pipelined
        if pipelined:
            self.options = replace(self.options, pipelined=True)
        self.lost_unsynced = 0  # pipelined: queued writes lost in crashes (the harness really tests that)
        self.persisted_checks = 0  # Persisted inputs of non-leaders' appends checked to be no-ops
        self.commit_checked: dict[str, LogId] = {}  # pipelined: the last commit checked durable, per leader
        self.write_delay_s: dict[str, float] = {}  # pipelined: a slow disk (extra seconds per log write)
        self.now = 0.0
        self.tick_s = tick_s
        self.drop, self.duplicate, self.delay_s = drop, duplicate, delay_s
        self.cuts: set[tuple[str, str]] = set()
        self.queue: list[tuple[float, int, str, str, object]] = []
        self.counter = 0
        self.steps = 0
        self.delivered = 0
        self.auto_view = True
        # 0: views follow links and crashes at once. Else each node refreshes its view every ~view_lag_s
        # (random phase), like failure detection does: a partitioned leader keeps accepting for a while.
        self.view_lag_s = view_lag_s
        # False: each Ready is carried out as its step returns. True: a node's Readys of one tick are
        # carried out together at its end (one "fsync" for all their writes, then their sends).
        self.group_commit = group_commit
        self.next_view_s: dict[str, float] = {}
        self.inv = Invariants()
        self.nodes: dict[str, SimNode] = {}
        self.ids: dict[str, int] = {}
        self.accepted: dict[str, SubmitAccepted] = {}
        self.repairs: list[tuple[float, str, str, str]] = []  # (due, "restart" | "crash" | "heal", a, b)
        self.tear: set[str] = set()  # nodes whose next Ready with hard state and log writes is torn
        self.torn = 0
        self.transfers: list[tuple[float, str, str, LogId]] = []  # (due, receiver, source, snapshot)
        self.installs = 0
        self.snapshots_taken = 0
        # ReadLogs answered short: compacted between the core's request and the shell's read (as in the
        # Replicator, whose snapshot taker compacts while its completer still holds the read).
        self.short_reads = 0
        names = [f"node-{i}" for i in range(1, voters + 1)]
        for i, name in enumerate(names, start=1):
            state, ready = machine.bootstrap(name, frozenset(names), self.options)
            self.nodes[name] = SimNode(name, Durable(), state)
            self.ids[name] = i
            # The shell finishes a bootstrap's writes before it runs (also when pipelined).
            self._carry_out(name, [ready])
        for j in range(voters + 1, voters + joiners + 1):
            self.add_joiner(f"node-{j}", j)
        self.update_views()

    # ---- nodes

    def add_joiner(self, name: str, node_id: int) -> None:
        self.nodes[name] = SimNode(name, Durable(), machine.joiner(name, self.options))
        self.ids[name] = node_id

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.state = None
        node.view = None
        node.pending = []  # never written: lost with the process
        self.lost_unsynced += sum(1 for _, r in node.unsynced if r.append)
        node.unsynced = []  # queued writes not yet durable: lost, with every send/apply waiting for them
        self.transfers = [t for t in self.transfers if t[1] != name]  # a partial download is not a snapshot
        self.update_views()  # failure detection is instant here; its real delay is the membership layer's

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        assert node.state is None
        d = node.durable
        applied = len(d.applied)
        assert d.log[:applied] == d.applied, "the state machine ran ahead of the log"
        base = LogId(d.applied[-1].epoch, applied) if applied else LogId(0, 0)
        node.state = machine.restore(
            name, d.hard or HardState(), base, tuple(d.log[applied:]), applied, self.options,
            snapshot=d.newest_snapshot(), first_index=d.first_index,
        )  # fmt: skip
        self.inv.forget_commit(name, applied)
        node.view = None
        self.update_views()

    def alive(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.alive]

    def state(self, name: str) -> machine.State:
        state = self.nodes[name].state
        assert state is not None, f"{name} is down"
        return state

    # ---- network

    def cut(self, a: str, b: str, both: bool = False) -> None:
        self.cuts.add((a, b))
        if both:
            self.cuts.add((b, a))
        self.update_views()

    def isolate(self, name: str) -> None:
        for other in self.nodes:
            if other != name:
                self.cut(name, other, both=True)

    def heal(self) -> None:
        self.cuts.clear()
        self.update_views()

    def link_up(self, a: str, b: str) -> bool:
        return (a, b) not in self.cuts

    def _send(self, src: str, dst: str, message: object) -> None:
        if self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            at = self.now + self.rng.uniform(*self.delay_s)
            self.counter += 1
            heapq.heappush(self.queue, (at, self.counter, src, dst, message))

    # ---- views

    def computed_view(self, name: str) -> dict[str, int]:
        return {
            other: self.ids[other]
            for other, node in self.nodes.items()
            if node.alive and (other == name or (self.link_up(name, other) and self.link_up(other, name)))
        }

    def set_view(self, name: str, healthy: dict[str, int]) -> None:
        """Fix a node's view (turns automatic views off for every node)."""
        self.auto_view = False
        self._give_view(name, healthy)

    def _give_view(self, name: str, healthy: dict[str, int]) -> None:
        node = self.nodes[name]
        if node.alive and node.view != healthy:
            node.view = dict(healthy)
            self.input(name, ViewChanged(dict(healthy)))

    def update_views(self, periodic: bool = False) -> None:
        if not self.auto_view or (self.view_lag_s and not periodic):
            return
        for name in list(self.nodes):
            if self.view_lag_s:
                if self.now < self.next_view_s.get(name, 0.0):
                    continue
                self.next_view_s[name] = self.now + self.rng.uniform(0.5, 1.5) * self.view_lag_s
            self._give_view(name, self.computed_view(name))

    def change_id(self, name: str, node_id: int) -> None:
        """The node came back on another address: same identity, new numeric ID."""
        self.ids[name] = node_id
        self.update_views()

    # ---- stepping

    def input(self, name: str, inp: object) -> Ready | None:
        node = self.nodes[name]
        if node.state is None:
            return None
        before = node.state
        node.state, ready = machine.step(before, inp, self.now)
        self.steps += 1
        self.check_read_log(name, ready)
        self.check_deadline(name, before, inp, ready)
        self.check_persisted(name, before, inp, ready)
        node.deadline = (node.state, machine.next_deadline(node.state, self.now))
        self._process(name, ready)
        return ready

    def check_read_log(self, name: str, ready: Ready) -> None:
        """A core never asks for an entry it already knows compacted (below its own ``first_index``, which
        every SnapshotTaken and install moves): the shell would have to answer with nothing. A compaction
        the core has not heard of yet may still overtake the read (see ``_read_log``)."""
        state = self.nodes[name].state
        for request in ready.read_log:
            if state is not None and request.first < state.first_index:
                raise InvariantViolated(
                    f"{name} asks for entry {request.first}, compacted (its log starts at {state.first_index})"
                )

    def check_deadline(self, name: str, before: machine.State, inp: object, ready: Ready) -> None:
        """A shell ticks only at ``next_deadline``: every Tick before it must be a no-op, or skipping it
        would lose (or delay) what it did. Checked on every Tick of every simulation."""
        made, deadline = self.nodes[name].deadline
        if not isinstance(inp, Tick) or made is not before or self.now >= deadline:
            return
        if not ready.empty or self.nodes[name].state != before:
            raise InvariantViolated(
                f"{name}: a Tick at {self.now} before next_deadline {deadline} changed something: {ready} {before}"
            )

    def check_persisted(self, name: str, before: machine.State, inp: object, ready: Ready) -> None:
        """The Replicator skips Persisted for appends carried out while not leading: it must be a no-op."""
        node = self.nodes[name]
        if not isinstance(inp, Persisted) or inp.last not in node.appended_not_leading:
            return
        node.appended_not_leading.discard(inp.last)
        self.persisted_checks += 1
        if not ready.empty or node.state != before:
            raise InvariantViolated(f"{name}: Persisted({inp.last}) of a non-leader's append changed something")

    def _process(self, name: str, ready: Ready) -> None:
        if self.pipelined:
            self._carry_out_pipelined(name, ready)
        elif self.group_commit:
            self.nodes[name].pending.append(ready)
        else:
            self._carry_out(name, [ready])

    def flush(self) -> None:
        """Group commit: carry out every node's Readys buffered since the last flush, writes first."""
        for _ in range(100):
            busy = [n for n, node in self.nodes.items() if node.pending]
            if not busy:
                return
            for name in busy:
                readys, self.nodes[name].pending = self.nodes[name].pending, []
                self._carry_out(name, readys)
        raise AssertionError("ReadLog answers kept producing Readys")  # pragma: no cover

    def _carry_out(self, name: str, readys: list[Ready]) -> None:
        """Ready order for one Ready or a group: all writes (1-2), then for each in turn sends, applies,
        replies (3-5), then ReadLog answers as new inputs (6)."""
        node = self.nodes[name]
        d = node.durable
        before_applied = len(d.applied)
        for ready in readys:
            if ready.hard_state is not None:
                d.hard = ready.hard_state
                if name in self.tear and (ready.append or ready.truncate_from):
                    # Power lost between the two writes: the hard state is on disk, the log write is not.
                    self.tear.discard(name)
                    self.torn += 1
                    self.crash(name)
                    self.repairs.append((self.now + self.rng.uniform(0.1, 1.0), "restart", name, name))
                    return
            self._write_log(name, ready)
        state = node.state
        assert state is not None
        leader_epoch = state.hard.epoch if state.role == machine.LEADER else None
        self.inv.record_commit(name, d.log, state.commit, leader_epoch)
        for ready in readys:
            self.inv.check_sends(name, d.hard, d.log, ready.messages)
            for send in ready.messages:
                self._send(name, send.to, send.message)
            for entry in ready.apply:
                if entry.index != len(d.applied) + 1:
                    raise InvariantViolated(f"{name} applies {entry.index} after {len(d.applied)}")
                d.applied.append(entry)
            for reply in ready.replies:
                node.replies.append(reply)
                if isinstance(reply, SubmitAccepted):
                    self.accepted[reply.request_id] = reply
            for fact in ready.facts:
                node.facts.append((self.now, fact.event, dict(fact.fields)))
        self.inv.check_applied(name, d.applied, before_applied)
        if state.writable and any(f.event == "writable_changed" for r in readys for f in r.facts):
            self.inv.check_writable(name, d.log)
        for ready in readys:
            for request in ready.read_log:
                self.input(name, LogRead(request, self._read_log(name, request.first, request.last)))
            self._background(name, ready)

    def _carry_out_pipelined(self, name: str, ready: Ready) -> None:
        """See the module docstring: hard state now, early sends now, the rest once the writes are durable."""
        node = self.nodes[name]
        d = node.durable
        persisted: list[LogId] = []
        if ready.hard_state is not None:
            # The hard state is written on the log's thread after the queued writes: they are durable first.
            # What they report (Persisted) reaches the core only after this Ready is carried out, as in the
            # Replicator, whose loop takes one input at a time: fed now, it would make the core's next Ready
            # overtake this one (an apply queued ahead of an earlier apply).
            # This Ready's own install or truncation is not queued yet, but the state already reflects it:
            # while the earlier writes complete, the disk's suffix it replaces is not valid (see _record).
            node.carrying = ready
            try:
                persisted = self._complete(name, everything=True, feed=False)
            finally:
                node.carrying = None
            if node.state is None:
                return
            d.hard = ready.hard_state
            if name in self.tear and (ready.append or ready.truncate_from):
                self.tear.discard(name)
                self.torn += 1
                self.crash(name)
                self.repairs.append((self.now + self.rng.uniform(0.1, 1.0), "restart", name, name))
                return
        if ready.append and node.state is not None and node.state.role != machine.LEADER:
            node.appended_not_leading.add(ready.append[-1].id)
        early_sends = [] if ready.hard_state is not None else [s for s in ready.messages if early(s.message)]
        self.inv.check_sends(name, d.hard, d.log, early_sends)
        for send in early_sends:
            self._send(name, send.to, send.message)
        for reply in ready.replies:
            node.replies.append(reply)
            if isinstance(reply, SubmitAccepted):
                self.accepted[reply.request_id] = reply
        for fact in ready.facts:
            node.facts.append((self.now, fact.event, dict(fact.fields)))
        if (
            ready.truncate_from is not None
            or ready.install is not None
            or ready.append
            or ready.apply
            or ready.read_log
            or (len(early_sends) < len(ready.messages))
        ):
            due = (
                self.now
                + self.rng.choice((0.0, 1.0, 2.0, 3.0)) * self.tick_s
                + self.write_delay_s.get(name, 0)
            )
            node.unsynced.append((max(due, node.unsynced[-1][0] if node.unsynced else due), ready))
        else:
            self._background(name, ready)
        self._record(name)
        for last in persisted:
            if node.state is None:
                break
            self.input(name, Persisted(last))
        state = node.state
        if state is not None and state.writable and any(f.event == "writable_changed" for f in ready.facts):
            self.inv.check_writable(name, self._log_once_written(name))

    def _log_once_written(self, name: str) -> list[Entry]:
        """Pipelined: the log as it will be once the queued writes (installs, truncations, appends) are
        durable, in order. A leader may become writable while its own copies are still being written (on a
        slow disk, even a snapshot install): what it commits is on a majority of disks without it, and it
        serves, applies and acks only what is durable. What it must hold is every committed entry in the
        log it leads from, which is this one."""
        d = self.nodes[name].durable
        log = list(d.log)
        for _, queued in self.nodes[name].unsynced:
            if queued.install is not None:
                sid = queued.install.snapshot
                held = d.snapshots.get(sid.index)
                if held is not None and held[0] == sid:
                    log = list(held[2]) + log[sid.index :] if queued.install.keep_log else list(held[2])
            if queued.truncate_from is not None:
                del log[queued.truncate_from - 1 :]
            log.extend(queued.append)
        return log

    def _record(self, name: str) -> None:
        """Pipelined: an entry a leader commits is on the disks of a majority of voters (its own copy counts
        only once written: the point of ``Persisted``). Any node may know a commit index above its own
        durable log (a follower learns it from the leader, a leader may commit with followers' copies alone;
        each applies only what is durable), so only the part on its disk is recorded."""
        node = self.nodes[name]
        state = node.state
        if state is None:
            return
        durable = len(node.durable.log)
        waiting = [queued for _, queued in node.unsynced] + ([node.carrying] if node.carrying else [])
        for queued in waiting:  # a queued truncation will replace the disk's suffix: not yet valid
            if queued.truncate_from is not None:
                durable = min(durable, queued.truncate_from - 1)
            if queued.install is not None:  # a queued install replaces the disk's log: nothing new is valid
                durable = min(durable, self.inv.checked_commit.get(name, 0))
        leader_epoch = state.hard.epoch if state.role == machine.LEADER else None
        if leader_epoch is not None and state.commit >= state.epoch_start:
            entry = (
                state.log[state.commit - state.base.index - 1] if state.commit > state.base.index else None
            )
            # Checked once per committed entry, under the configuration it was committed in: a membership
            # change made later (one voter less, effective at once) may leave an entry that a majority of
            # the old voters held on fewer of the new ones; every majority of the new voters still meets
            # every majority of the old ones (one change at a time), so that is no loss.
            if entry is not None and entry.epoch == leader_epoch and self.commit_checked.get(name) != entry.id:
                self.commit_checked[name] = entry.id
                holders = [
                    v for v in state.config.voters
                    if len(self.nodes[v].durable.log) >= entry.index
                    and self.nodes[v].durable.log[entry.index - 1] == entry
                ]  # fmt: skip
                if len(holders) < state.config.quorum:
                    raise InvariantViolated(
                        f"{name} committed {entry.index} durable on only {sorted(holders)}"
                    )
        self.inv.record_commit(name, node.durable.log, min(state.commit, durable), leader_epoch)

    def _complete(self, name: str, everything: bool = False, feed: bool = True) -> list[LogId]:
        """Pipelined: the queued writes that are due become durable, in order, each followed by what waited
        for it (late sends, applies, ReadLog answers) and a Persisted input — fed at once, or with
        ``feed=False`` returned for the caller to feed once it is done."""
        node = self.nodes[name]
        unfed: list[LogId] = []
        for _ in range(10_000):
            if node.state is None or not node.unsynced or (not everything and node.unsynced[0][0] > self.now):
                return unfed
            _, ready = node.unsynced.pop(0)
            d = node.durable
            self._write_log(name, ready)
            before_applied = len(d.applied)
            self._record(name)
            late = [s for s in ready.messages if ready.hard_state is not None or not early(s.message)]
            self.inv.check_sends(name, d.hard, d.log, late)
            for send in late:
                self._send(name, send.to, send.message)
            for entry in ready.apply:
                if entry.index != len(d.applied) + 1:
                    raise InvariantViolated(f"{name} applies {entry.index} after {len(d.applied)}")
                if entry.index > len(d.log) or d.log[entry.index - 1] != entry:
                    raise InvariantViolated(f"{name} applies {entry.index} before it is durable in its log")
                d.applied.append(entry)
            self.inv.check_applied(name, d.applied, before_applied)
            for request in ready.read_log:
                self.input(name, LogRead(request, self._read_log(name, request.first, request.last)))
            self._background(name, ready)
            if ready.append:
                if feed:
                    self.input(name, Persisted(ready.append[-1].id))
                else:
                    unfed.append(ready.append[-1].id)
        raise AssertionError("pipelined writes kept producing writes")  # pragma: no cover

    # ---- log writes, reads and snapshots

    def _write_log(self, name: str, ready: Ready) -> None:
        """Step 2 of a Ready: install a snapshot (replaces log and applied history), truncate, append."""
        d = self.nodes[name].durable
        if ready.install is not None:
            sid = ready.install.snapshot
            held = d.snapshots.get(sid.index)
            if held is None or held[0] != sid:
                raise InvariantViolated(f"{name} installs {sid}, which it never fetched")
            entries = list(held[2])
            self.inv.check_applied(name, entries, 0)  # a snapshot holds only committed entries
            # keep_log: the log already holds these very entries up to the snapshot's (log matching)
            d.log = entries + d.log[sid.index :] if ready.install.keep_log else list(entries)
            d.applied = list(entries)
            if not ready.install.keep_log:
                d.first_index = sid.index + 1
            self.inv.forget_commit(name, sid.index)
            self.installs += 1
        if ready.truncate_from is not None:
            self.inv.check_truncate(name, ready.truncate_from)
            del d.log[ready.truncate_from - 1 :]
        for entry in ready.append:
            if entry.index != len(d.log) + 1:
                raise InvariantViolated(f"{name} appends {entry.index} after {len(d.log)}")
            d.log.append(entry)

    def _read_log(self, name: str, first: int, last: int) -> tuple[Entry, ...]:
        """The Replicator's ``_read_range``: a read that starts below the log's first index (a snapshot was
        taken and the log compacted after the core asked, before the read ran: the pipelined shell reads
        once the Ready's writes are durable, the taker compacts meanwhile) stops at ``LogCompacted`` and
        answers with nothing; the core learns the new first index from SnapshotTaken."""
        d = self.nodes[name].durable
        if first < d.first_index:
            self.short_reads += 1
            return ()
        return tuple(d.log[first - 1 : last])

    def _background(self, name: str, ready: Ready) -> None:
        """Step 7: a snapshot of what is applied now (then compaction), and transfers (they finish later)."""
        node = self.nodes[name]
        if node.state is None:
            return
        d = node.durable
        for fetch in ready.fetch_snapshot:
            if not any(t[1] == name and t[3] == fetch.snapshot for t in self.transfers):
                due = self.now + self.rng.uniform(0.02, 0.3)
                self.transfers.append((due, name, fetch.source, fetch.snapshot))
        if ready.take_snapshot:
            if not d.applied:
                self.input(name, SnapshotTaken(None, d.first_index))
                return
            applied = tuple(d.applied)
            config = next(Config.decode(e.payload) for e in reversed(applied) if e.kind is Kind.CONFIG)
            sid = applied[-1].id
            d.snapshots[sid.index] = (sid, config, applied)
            for old in sorted(d.snapshots)[:-2]:  # keep the newest two, as the store does
                del d.snapshots[old]
            upto = machine.compaction_point(sid.index, self.options)
            d.first_index = max(d.first_index, min(upto + 1, len(d.log) + 1))
            self.snapshots_taken += 1
            self.input(name, SnapshotTaken(sid, d.first_index))

    def finish_transfers(self) -> None:
        for transfer in [t for t in self.transfers if t[0] <= self.now]:
            self.transfers.remove(transfer)
            _, name, source, sid = transfer
            src, dst = self.nodes[source], self.nodes[name]
            held = src.durable.snapshots.get(sid.index)
            if (
                not src.alive or not dst.alive or held is None or held[0] != sid
                or not (self.link_up(source, name) and self.link_up(name, source))
            ):  # fmt: skip
                continue  # failed: the offer is repeated, a new fetch starts
            dst.durable.snapshots[sid.index] = held
            self.input(name, SnapshotFetched(source, sid, held[1]))

    def deliver_due(self) -> None:
        while self.queue and self.queue[0][0] <= self.now:
            _, _, src, dst, message = heapq.heappop(self.queue)
            node = self.nodes.get(dst)
            if node is None or not node.alive or not self.link_up(src, dst):
                continue
            self.delivered += 1
            self.input(dst, Receive(src, message))

    def tick(self) -> None:
        self.now = round(self.now + self.tick_s, 9)
        self.deliver_due()
        self.finish_transfers()
        self.update_views(periodic=True)
        for name in list(self.nodes):
            self.input(name, Tick())
        self.flush()
        if self.pipelined:
            for name in list(self.nodes):
                self._complete(name)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / self.tick_s)):
            self.tick()

    def run_until(self, predicate, timeout_s: float = 10.0) -> bool:
        for _ in range(round(timeout_s / self.tick_s)):
            if predicate():
                return True
            self.tick()
        return predicate()

    # ---- observations and client actions

    def writable(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.alive and node.state.writable]

    def leader(self, timeout_s: float = 5.0) -> str:
        assert self.run_until(lambda: len(self.writable()) == 1, timeout_s), self.describe()
        return self.writable()[0]

    def submit(self, name: str, payload: bytes, request_id: str | None = None) -> Reply:
        rid = request_id or f"r{self.counter}-{self.rng.random()}"
        self.counter += 1
        ready = self.input(name, Submit(((rid, payload),)))
        assert ready is not None, f"{name} is down"
        return next(r for r in ready.replies if getattr(r, "request_id", None) == rid)

    def read(self, name: str, read_id: str) -> Ready | None:
        return self.input(name, Read((read_id,)))

    def stop(self, name: str) -> None:
        self.input(name, Stop())

    def read_result(self, name: str, read_id: str) -> ReadConfirmed | ReadRejected | None:
        for reply in self.nodes[name].replies:
            if isinstance(reply, ReadConfirmed | ReadRejected) and reply.read_id == read_id:
                return reply
        return None

    def write_committed(self, reply: Reply) -> bool:
        """An accepted write took effect when the committed entry at its index has its epoch."""
        if not isinstance(reply, SubmitAccepted):
            return False
        entry = self.inv.committed.get(reply.index)
        return entry is not None and entry.epoch == reply.epoch

    def applied_commands(self, name: str) -> list[bytes]:
        return [e.payload for e in self.nodes[name].durable.applied if e.kind is Kind.COMMAND]

    def epochs_taken(self) -> list[tuple[float, str, int]]:
        return [
            (at, name, fields["epoch"])
            for name, node in self.nodes.items()
            for at, event, fields in node.facts
            if event == "became_leader"
        ]

    def describe(self) -> str:
        rows = []
        for name, node in self.nodes.items():
            s = node.state
            if s is None:
                rows.append(f"{name}: down log={len(node.durable.log)}")
            else:
                rows.append(
                    f"{name}: {s.role} epoch={s.hard.epoch} writable={s.writable} last={s.last.index} "
                    f"commit={s.commit} voters={sorted(s.config.voters)} learners={sorted(s.config.learners)}"
                )
        return f"t={self.now:.3f} " + "; ".join(rows)

    # ---- random fault schedules

    def random_fault(self, p_fault: float = 0.02, max_fault_s: float = 2.0) -> None:
        """One tick of a random schedule. With probability ``p_fault`` a fault starts (crash, two-way or
        one-way cut, isolation, an ID change, a stop); each fault is repaired after a random 0.1 s to
        ``max_fault_s`` (restart, heal that link), so faults overlap and sometimes a majority is down.
        A fifth of the ticks carry a batch of writes to a random live node, some a linearizable read."""
        rng = self.rng
        names = sorted(self.nodes)
        for due in [r for r in self.repairs if r[0] <= self.now]:
            self.repairs.remove(due)
            _, kind, a, b = due
            if kind == "restart" and not self.nodes[a].alive:
                self.restart(a)
            elif kind == "crash" and self.nodes[a].alive:
                self.crash(a)
            elif kind == "heal":
                self.cuts.discard((a, b))
                self.update_views()
        if rng.random() < p_fault:
            action = rng.choice(["crash", "crash", "tear", "cut", "cut1", "cut1", "isolate", "id", "stop"])
            a, b = rng.sample(names, 2)
            until = self.now + rng.uniform(0.1, max_fault_s)
            if action in ("crash", "stop") and self.nodes[a].alive:
                if action == "stop":  # a stopping node exits a little later, as the real one does
                    self.stop(a)
                    self.repairs.append((self.now + 0.3, "crash", a, a))
                    until += 0.3
                else:
                    self.crash(a)
                self.repairs.append((until, "restart", a, a))
            elif action == "tear" and self.nodes[a].alive:
                self.tear.add(a)
            elif action == "cut":
                self.cut(a, b, both=True)
                self.repairs += [(until, "heal", a, b), (until, "heal", b, a)]
            elif action == "cut1":
                self.cut(a, b)
                self.repairs.append((until, "heal", a, b))
            elif action == "isolate":
                self.isolate(a)
                self.repairs += [(until, "heal", a, o) for o in names if o != a]
                self.repairs += [(until, "heal", o, a) for o in names if o != a]
            elif action == "id":
                self.change_id(a, rng.randint(1, 2 * len(names)))
        if rng.random() < 0.2:
            alive = self.alive()
            if alive:
                target = rng.choice(alive)
                count = rng.randint(1, 3)
                batch = tuple((f"w{self.counter}-{k}", f"v{self.counter}-{k}".encode()) for k in range(count))
                self.counter += 1
                self.input(target, Submit(batch))
        if rng.random() < 0.05:
            alive = self.alive()
            if alive:
                self.counter += 1
                self.input(rng.choice(alive), Read((f"q{self.counter}",)))
        self.tick()

    def repair(self) -> None:
        """End of a schedule: every node up, every link healed, no stopping flags (restart stopped nodes)."""
        self.repairs.clear()
        self.tear.clear()
        self.view_lag_s = 0.0
        self.heal()
        for name, node in self.nodes.items():
            if node.alive and node.state.stopping:
                self.crash(name)
        for name in sorted(self.nodes):
            if not self.nodes[name].alive:
                self.restart(name)
        self.drop = self.duplicate = 0.0


def rejected_codes(replies: list[Reply]) -> list[str]:
    return [r.code for r in replies if isinstance(r, SubmitRejected)]
