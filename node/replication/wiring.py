"""How a Node gets replication when REPLICATION=on: the Replicator, its endpoint, forwarding and status.

Kept in one place so the supervisor needs only a few lines: ``attach(node)`` at the end of its
construction, and ``run(stop)`` as one more task of its TaskGroup.
"""

from __future__ import annotations

import asyncio
from typing import Any

from node.actors.replicator import Replicator
from node.core.replication import machine
from node.http.replication import ForwardingMiddleware, ReplicationRoutes
from node.replication.service import ReplicatedDataService


class Replication:
    def __init__(self, node: Any) -> None:
        config = node.config
        assert node.http is not None and node.database is not None
        self.replicator = Replicator(
            me=node.me,
            data_dir=config.data_dir,
            database=node.database,
            views=node.views,
            secret=config.jwt_secret,
            formation_window_s=config.formation_window_s,
            log=node.log,
            peer_timeout_s=max(1.0, config.probe_timeout_s * 2),
        )
        self.service = ReplicatedDataService(node.database, self.replicator)
        self.routes = ReplicationRoutes(
            replicator=self.replicator, secret=config.jwt_secret, log=node.log,
            body_read_timeout_s=config.body_read_timeout_s,
        )  # fmt: skip
        self.routes.add_to(node.http.app)
        self.forwarding = ForwardingMiddleware(
            replicator=self.replicator, me=node.me, jwt_secret=config.jwt_secret,
            max_body_bytes=config.db_max_body_bytes, body_read_timeout_s=config.body_read_timeout_s,
        )  # fmt: skip
        # Innermost middleware: inside the error middleware, so its NodeErrors render as JSON.
        node.http.app.middlewares.append(self.forwarding.middleware())
        self._node = node

    async def run(self, stop: asyncio.Event) -> None:
        self.replicator.begin(self._node.incarnation)
        try:
            await self.replicator.run(stop)
        finally:
            await self.forwarding.close()

    def readiness_problem(self, need_leader: bool) -> str | None:
        """Why /readyz must not say ready, or None. While the node forms or joins a cluster every data call
        answers 503; without a leader it can reach (``need_leader``: /readyz without ``noleader``), every
        call but a level=none read does."""
        if self.replicator.status() is None:
            return "starting: forming or joining a cluster"
        if need_leader and not self.replicator.is_leader() and self.replicator.leader_endpoint() is None:
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
            # Counters for operators: messages dropped by a full inbox or peer queue, failed peer batches,
            # sends to identities with no known address, apply attempts that failed and are being retried.
            "replication_stats": {
                **self.replicator.stats,
                **(self.replicator.transport.stats if self.replicator.transport is not None else {}),
            },
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
            }
        fields["_per_node"] = per_node
        return fields
