"""Cluster endpoints: /cluster/status (public, documented shape), /cluster/health, and the peer notices."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from node import errors
from node.core import membership as m
from node.core import peerauth
from node.core.election import Leadership, Role
from node.core.ids import Endpoint, InvalidAddress
from node.http.common import json_response, read_json
from node.runtime.mailbox import LatestCell, Mailbox

# A peer notice is {"address": "ip:port", "node_id": n}: a few dozen bytes.
NOTICE_MAX_BYTES = 4096


def status_body(decision: Leadership) -> dict[str, Any]:
    """The documented /cluster/status shape. Keys may be added, never renamed or dropped."""
    view = decision.view
    leader = decision.leader
    nodes = [
        {
            "id": member.node_id,
            "address": member.endpoint.url,
            "role": (Role.LEADER if member.endpoint == leader.endpoint else Role.FOLLOWER).value,
            "is_leader": member.endpoint == leader.endpoint,
            "healthy": member.healthy,
        }
        for member in view.members
    ]
    return {
        "current_node_id": view.self_id,
        "current_role": decision.role.value,
        "leader_id": leader.node_id,
        "leader_address": leader.endpoint.url,
        "total_nodes": len(nodes),
        "nodes": nodes,
        # Additions beyond the documented shape:
        "healthy_nodes": sum(1 for n in nodes if n["healthy"]),
        "epoch": decision.epoch,
        "view_version": view.version,
    }


class ClusterRoutes:
    def __init__(
        self,
        *,
        me: Endpoint,
        decisions: LatestCell[Leadership],
        inbox: Mailbox[m.Input],
        secret: str,
        log: Any,
        body_read_timeout_s: float = 10.0,
    ) -> None:
        self._me = me
        self._decisions = decisions
        self._inbox = inbox
        self._key = peerauth.derive_key(secret)
        self._log = log
        self._read_timeout_s = body_read_timeout_s
        self._rejected: set[str] = set()  # senders already logged, so a misconfigured peer logs once

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/cluster/status", self.status)
        app.router.add_get("/cluster/health", self.health)
        app.router.add_post("/cluster/hello", self.hello)
        app.router.add_post("/cluster/leave", self.leave)

    def _decision(self) -> Leadership:
        decision = self._decisions.get()
        if decision is None:
            raise errors.Unavailable("node is starting; no election round has run yet")
        return decision

    async def status(self, request: web.Request) -> web.Response:
        return json_response(status_body(self._decision()), pretty="pretty" in request.query)

    async def health(self, request: web.Request) -> web.Response:
        decision = self._decision()
        prober = request.query.get("from")
        if prober is not None:
            # A peer's probe: it names itself, and we learn of it if we did not know it (signed, see peerauth).
            sender = _parse_endpoint(prober, "from")
            self._authenticate(request, sender)
            self._submit(m.ProbedBy(sender))
        return json_response(
            {"status": "ok", "node_id": self._me.node_id, "role": decision.role.value, "epoch": decision.epoch}
        )

    async def hello(self, request: web.Request) -> web.Response:
        sender = await self._notice_endpoint(request)
        self._authenticate(request, sender)
        self._submit(m.PeerAnnounced(sender))
        return json_response({"accepted": True, "node_id": self._me.node_id}, status=202)

    async def leave(self, request: web.Request) -> web.Response:
        sender = await self._notice_endpoint(request)
        self._authenticate(request, sender)
        self._submit(m.PeerDeparted(sender))
        return json_response({"accepted": True, "node_id": self._me.node_id}, status=202)

    async def _notice_endpoint(self, request: web.Request) -> Endpoint:
        body = await read_json(request, limit=NOTICE_MAX_BYTES, timeout_s=self._read_timeout_s)
        if not isinstance(body, dict) or not isinstance(body.get("address"), str):
            raise errors.BadRequest('expected a JSON object {"address": "ip:port"}')
        return _parse_endpoint(body["address"], "address")

    def _authenticate(self, request: web.Request, sender: Endpoint) -> None:
        header = request.headers.get(peerauth.HEADER)
        if peerauth.verify(self._key, header, request.path, str(sender), time.time()):
            return
        if str(sender) not in self._rejected and len(self._rejected) < 1024:
            self._rejected.add(str(sender))
            self._log.warning(
                "peer_rejected",
                peer=str(sender),
                path=request.path,
                reason="missing signature" if not header else "bad or expired signature (different JWT_SECRET?)",
            )
        raise errors.Unauthorized(
            f"cluster message from {sender} is not signed with this cluster's secret "
            f"(header {peerauth.HEADER}); all nodes must share JWT_SECRET"
        )

    def _submit(self, event: m.Input) -> None:
        if not self._inbox.offer(event):
            raise errors.Busy("membership queue is full; retry shortly")


def _parse_endpoint(text: str, field: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except InvalidAddress as exc:
        raise errors.BadRequest(f"{field}: {exc}") from None
