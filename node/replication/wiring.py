"""How a Node gets replication when REPLICATION=on: the Replicator, its endpoint, forwarding and status.

Kept in one place so the supervisor needs only a few lines: ``attach(node)`` at the end of its
construction, and ``run(stop)`` as one more task of its TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from node import errors
from node.actors.replicator import MembershipConflict, Replicator, UnknownMember
from node.core.replication import gather, machine
from node.http.replication import ForwardingMiddleware, ReplicationRoutes
from node.replication import snapshot_transfer
from node.replication.service import ReplicatedDataService, load_answer_within_s

# Seconds DELETE /cluster/voters/<node> waits for its change to commit before it answers 503 outcome_unknown.
REMOVE_WAIT_S = 10.0


def handover_budget_s(shutdown_grace_s: float) -> float:
    """How long a stopping leader may spend handing over before it says goodbye and stops serving: a third
    of the shutdown grace (the goodbye and the HTTP stop share the rest), at most 0.5 s. A handover takes
    tens of milliseconds; beyond the budget the successor takes the lead after the lease instead."""
    return min(0.5, shutdown_grace_s / 3)


class ReplicatedNodeService:
    """What the data routes (node.http.db.DbRoutes) call with REPLICATION=on: writes, reads and loads go
    through replication; what is this node's own — whether its apply pipeline is stalled — comes from the
    local service, which also closes the database at shutdown (the Replicator opens and checks it at start,
    see node.replication.startup)."""

    def __init__(self, local: Any, replication: Replication) -> None:
        self._local = local
        self._replicated = replication.service
        self.database = local.database  # backups, upload files and readiness read this node's own copy
        self.submit = self._replicated.submit
        self.read = self._replicated.read
        self.load_dump_file = self._replicated.load_dump_file
        self.load_sqlite_file = self._replicated.load_sqlite_file
        self.require_local_copy = self._replicated.require_local_copy  # backups: see the data routes
        self.replication_problem = replication.readiness_problem  # read by /readyz

    @property
    def stalled(self) -> str | None:
        return self._local.stalled


class Replication:
    def __init__(self, node: Any) -> None:
        config = node.config
        assert node.http is not None and node.database is not None
        # One bucket for every snapshot transfer of this node: what it sends and what it downloads.
        self.snapshot_rate = snapshot_transfer.RateLimiter(config.snapshot_rate_bytes_s)
        self.replicator = Replicator(
            me=node.me,
            data_dir=config.data_dir,
            database=node.database,
            views=node.views,
            secret=config.jwt_secret,
            formation_window_s=config.formation_window_s,
            log=node.log,
            peer_timeout_s=max(1.0, config.probe_timeout_s * 2),
            handover_budget_s=handover_budget_s(config.shutdown_grace_s),
            snapshot_rate=self.snapshot_rate,
            options=machine.Options(
                pipelined=True, snapshot_entries=config.snapshot_entries, snapshot_bytes=config.snapshot_bytes,
                snapshot_trailing=config.snapshot_trailing,
            ),
            log_segment_bytes=config.log_segment_bytes,
            gathering=gather.Gather(delay_s=config.write_gather_s),
        )
        self.service = ReplicatedDataService(
            node.database, self.replicator, log_reserve_bytes=config.log_reserve_bytes
        )
        self.routes = ReplicationRoutes(
            replicator=self.replicator, secret=config.jwt_secret, log=node.log,
            body_read_timeout_s=config.body_read_timeout_s, snapshot_rate=self.snapshot_rate,
            snapshot_max_sends=config.snapshot_max_sends, snapshot_resolve=self.replicator.snapshots.resolve,
        )  # fmt: skip
        self.routes.add_to(node.http.app)
        self.forwarding = ForwardingMiddleware(
            replicator=self.replicator, me=node.me, jwt_secret=config.jwt_secret,
            max_body_bytes=config.db_max_body_bytes, body_read_timeout_s=config.body_read_timeout_s,
            load_forward_timeout_s=load_answer_within_s(config.body_read_timeout_s, config.db_max_load_bytes),
        )  # fmt: skip
        # Inside the error handling, so its NodeErrors render as JSON; in the same coroutine (no middleware
        # of its own).
        node.http.route_through(self.forwarding.handle)
        self._node = node

    async def run(self, stop: asyncio.Event) -> None:
        self.replicator.begin(self._node.incarnation)
        try:
            await self.replicator.run(stop)
        finally:
            await self.forwarding.close()

    async def remove_member(self, target: int | str) -> dict[str, Any]:
        """DELETE /cluster/voters/<node>: resolve a node ID to the member's identity, remove it through the
        log (node.core.replication RemoveMember) and answer the committed configuration."""
        r = self.replicator
        if r.state is None:
            raise errors.Unavailable("replication is starting (forming or joining a cluster)")
        if isinstance(target, int):
            found = r.identity_of_node_id(target)
            if not found:
                raise UnknownMember(f"no voter or learner of this cluster has node ID {target}")
            if len(found) > 1:
                raise MembershipConflict(
                    f"node ID {target} names {len(found)} members ({', '.join(found)}): remove one by identity"
                )
            identity = found[0]
        else:
            identity = target
        epoch, index = await r.remove_member(identity, REMOVE_WAIT_S)
        status = r.status()
        assert status is not None
        return {
            "removed": identity,
            "epoch": epoch,
            "index": index,
            "voters": sorted(status.voters),
            "learners": sorted(status.learners),
        }

    async def handed_over(self) -> None:
        """Wait (bounded by the handover budget, plus slack for the round in progress) until the replicator
        is done: a stopping leader handed over, or there was nothing to hand over."""
        budget = self.replicator._handover_budget_s()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget + 0.25):
                await self.replicator.done.wait()

    def readiness_problem(self, need_leader: bool) -> str | None:
        """Why /readyz must not say ready, or None. While the node forms or joins a cluster every data call
        answers 503; without a leader it can reach (``need_leader``: /readyz without ``noleader``), every
        call but a level=none read does."""
        rejoin = self.replicator.awaiting_rejoin()
        if rejoin is not None:
            return rejoin
        status = self.replicator.status()
        if status is None:
            return "starting: forming or joining a cluster"
        if not need_leader:
            return None  # level=none reads need no log writes
        problem = getattr(self.replicator, "log_write_problem", None)
        if problem is not None:
            return problem  # writes (and this node's acks) need its log: not ready until it takes writes
        if self.replicator.is_leader():
            if not status.writable:
                # Leading, but its epoch's first entry is not committed yet (a few ms after an election),
                # or it lost its majority, or it is handing over: a write now would get 503.
                return "leads but does not take writes yet (no majority has its epoch)"
            return None
        if self.replicator.leader_endpoint() is None:
            return "has no healthy leader"
        return None

    def status_fields(self, view: Any) -> dict[str, Any]:
        """What /cluster/status adds (and replaces: ``epoch``) with REPLICATION=on."""
        status = self.replicator.status()
        if status is None:
            return {"replication": "starting", "commit_index": 0, "applied_index": 0, "writable": False}
        fields: dict[str, Any] = {
            "replication": status.role,
            "epoch": status.epoch,
            "commit_index": status.commit_index,
            "applied_index": self.replicator.applied_index,
            "last_index": status.last_index,
            "writable": status.writable,
            "leader_identity": status.leader if status.role != machine.LEADER else self.replicator.identity,
            "identity": self.replicator.identity,
            # The cluster's name, drawn when it was bootstrapped; the same on every member ("" while a
            # joiner has heard no leader yet).
            "cluster_name": self.replicator.state.hard.cluster if self.replicator.state is not None else "",
            # Identities removed by DELETE /cluster/voters and not re-added while they stay in the view.
            "removed_identities": sorted(status.removed),
            # Counters for operators: messages dropped by a full inbox or peer queue, failed peer batches,
            # sends to identities with no known address, apply attempts that failed and are being retried,
            # groups a leader staged (applied before their commit, see Replicator._stage_sent), committed
            # and dropped.
            "replication_stats": {
                **self.replicator.stats,
                **(self.replicator.transport.stats if self.replicator.transport is not None else {}),
                **{f"snapshots_{k}": v for k, v in self.replicator.snapshots.stats.items()},
            },
            # The newest snapshot in this node's store, where its log starts, a transfer this node runs or
            # ran last (bytes done, rate, ETA), and the staged /db/load files it keeps (count, bytes).
            **self.replicator.snapshots.status(),
        }
        conflict = self.replicator.conflict
        if conflict is not None:
            # Another cluster with client data is in sight: neither is merged (see formation's rules).
            fields["replication"] = "conflict"
            fields["conflict"] = {
                "role": status.role,
                "other_leader_identity": conflict.other_leader,
                "other_leader_id": conflict.other_leader_id,
                "reason": conflict.reason,
            }
        per_node = {}
        for member in view.members:
            identity = (
                self.replicator.identity
                if member.is_self
                else self.replicator.identities.get(member.endpoint)
            )
            lag = status.lag.get(identity) if identity is not None else None
            if member.is_self and status.role == machine.LEADER:
                lag = 0
            per_node[member.endpoint.url] = {
                "voter": identity is not None and identity in status.voters,
                "lag": lag,
                # Leader only: this member is behind the log's first entry and is being sent a snapshot.
                "catching_up_by_snapshot": identity is not None and identity in status.snapshotting,
            }
        fields["_per_node"] = per_node
        return fields
