"""Cluster endpoints: /cluster/status (public, documented shape), /cluster/health, and the peer notices.

Peer messages (a probe naming ``from``, hello, leave) are accepted only once each: the MAC must verify, the
message must be addressed to this incarnation (a leave must name it; see node.core.peerauth) and its
(incarnation, seq) must be new in the sender's anti-replay window. Anything else is 401 and changes nothing.

``DELETE /cluster/voters/<node>`` (admin token) removes a voter or learner through the replicated log:
``<node>`` is the numeric ID /cluster/status shows, or the node's persistent identity (for a member whose
address is no longer known). A follower forwards it to the leader (node.http.replication); the answer
comes once the change is committed and applied. With REPLICATION=off there are no voters: 404.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from node import auth, errors
from node.core import membership as m
from node.core import peerauth
from node.core.election import Leadership, Role
from node.core.ids import Endpoint, InvalidAddress
from node.http.common import json_response, read_json
from node.runtime.mailbox import LatestCell, Mailbox

# A peer notice is {"address": "ip:port", "node_id": n}: a few dozen bytes.
NOTICE_MAX_BYTES = 4096
VOTERS_PATH = "/cluster/voters/"
_NODE_ID = re.compile(r"[0-9]{1,9}")


def parse_member_ref(text: str) -> int | str:
    """``<node>`` of DELETE /cluster/voters/<node>: a numeric node ID, or an identity (a UUID, canonical
    lower-case form). Anything else is 400, so a typo is never taken for an unknown member."""
    if _NODE_ID.fullmatch(text):
        return int(text)
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != text:
        raise errors.BadRequest(
            f"{text[:80]!r} is not a node ID (a number as /cluster/status shows it) nor a node identity (a UUID)"
        )
    return text


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


def add_replication_fields(body: dict[str, Any], fields: dict[str, Any]) -> None:
    """REPLICATION=on: ``commit_index``, ``applied_index``, ``writable``, per node ``voter`` and ``lag``, and
    ``epoch`` becomes the cluster's persisted epoch. Every documented key stays."""
    per_node = fields.pop("_per_node", {})
    body.update(fields)
    for node in body["nodes"]:
        node.update(per_node.get(node["address"], {"voter": False, "lag": None}))


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
        incarnation: int = 0,
    ) -> None:
        self._me = me
        self._decisions = decisions
        self._inbox = inbox
        self._key = peerauth.derive_key(secret)
        self._log = log
        self._read_timeout_s = body_read_timeout_s
        self._incarnation = incarnation
        self._guard = peerauth.ReplayGuard()
        # (sender, reason) pairs already logged, so a misconfigured peer or a replay flood logs once.
        self._rejected: set[tuple[str, str]] = set()
        # REPLICATION=on: a callable giving the replication fields for a view (node.replication.wiring).
        self.replication_status: Callable[[m.View], dict[str, Any]] | None = None
        # REPLICATION=on: removes a member (node ID or identity) and answers the committed change.
        self.remove_member: Callable[[int | str], Awaitable[dict[str, Any]]] | None = None
        self._jwt_secret = secret

    def begin(self, incarnation: int) -> None:
        """This process's incarnation (known once DATA_DIR is read); until then every leave is refused."""
        self._incarnation = incarnation

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/cluster/status", self.status)
        app.router.add_get("/cluster/health", self.health)
        app.router.add_post("/cluster/hello", self.hello)
        app.router.add_post("/cluster/leave", self.leave)
        app.router.add_delete(VOTERS_PATH + "{node}", self.remove_voter)

    def _decision(self) -> Leadership:
        decision = self._decisions.get()
        if decision is None:
            raise errors.Unavailable("node is starting; no election round has run yet")
        return decision

    async def status(self, request: web.Request) -> web.Response:
        decision = self._decision()
        body = status_body(decision)
        if self.replication_status is not None:
            add_replication_fields(body, self.replication_status(decision.view))
        return json_response(body, pretty="pretty" in request.query)

    async def remove_voter(self, request: web.Request) -> web.Response:
        """Admin: remove a voter (or learner); 200 once the change is committed (see the module docstring)."""
        authorization = request.headers.get("Authorization")
        auth.authenticate(authorization, self._jwt_secret, now=time.time()).require(auth.Role.ADMIN)
        target = parse_member_ref(request.match_info["node"])
        if self.remove_member is None:
            raise errors.NotFound("this node runs with REPLICATION=off: there are no voters to remove")
        return json_response(await self.remove_member(target), pretty="pretty" in request.query)

    async def health(self, request: web.Request) -> web.Response:
        decision = self._decision()
        prober = request.query.get("from")
        if prober is not None:
            # A peer's probe: it names itself, and we learn of it if we did not know it (signed, see peerauth).
            sender = _parse_endpoint(prober, "from")
            self._authenticate(request, sender, state_changing=False)
            self._submit(m.ProbedBy(sender))
        return json_response(
            {
                "status": "ok",
                "node_id": self._me.node_id,
                "role": decision.role.value,
                "epoch": decision.epoch,
                # Peers sign their leave with it; a leave naming an earlier one is refused.
                "incarnation": self._incarnation,
            }
        )

    async def hello(self, request: web.Request) -> web.Response:
        sender = await self._notice_endpoint(request)
        self._authenticate(request, sender, state_changing=False)
        self._submit(m.PeerAnnounced(sender))
        return self._accepted()

    async def leave(self, request: web.Request) -> web.Response:
        sender = await self._notice_endpoint(request)
        self._authenticate(request, sender, state_changing=True)
        self._submit(m.PeerDeparted(sender))
        return self._accepted()

    def _accepted(self) -> web.Response:
        body = {"accepted": True, "node_id": self._me.node_id, "incarnation": self._incarnation}
        return json_response(body, status=202)

    async def _notice_endpoint(self, request: web.Request) -> Endpoint:
        body = await read_json(request, limit=NOTICE_MAX_BYTES, timeout_s=self._read_timeout_s)
        if not isinstance(body, dict) or not isinstance(body.get("address"), str):
            raise errors.BadRequest('expected a JSON object {"address": "ip:port"}')
        return _parse_endpoint(body["address"], "address")

    def _authenticate(self, request: web.Request, sender: Endpoint, *, state_changing: bool) -> None:
        """Accept a peer message once, or raise Unauthorized. Order matters: only a message with a valid MAC
        may touch the replay windows, and one not addressed to this incarnation does not consume its seq."""
        headers = request.headers.getall(peerauth.HEADER, [])
        header = headers[0] if len(headers) == 1 else None  # a repeated header is malformed, not a choice
        claims = peerauth.verify(self._key, header, request.path, str(sender))
        if claims is None:
            reason = "missing signature" if not headers else "bad signature (different JWT_SECRET?)"
            self._reject(request, sender, reason)
            raise errors.Unauthorized(
                f"cluster message from {sender} is not signed with this cluster's secret "
                f"(header {peerauth.HEADER}); all nodes must share JWT_SECRET"
            )
        if not peerauth.addressed_to(claims, self._incarnation, state_changing=state_changing):
            self._reject(request, sender, "addressed to another incarnation of this node")
            raise errors.Unauthorized(
                f"cluster message from {sender} names incarnation {claims.receiver_incarnation} of this node, "
                "which is not the current one (it restarted, or the message is a replay)"
            )
        verdict = self._guard.accept(str(sender), claims)
        if not verdict.accepted:
            self._reject(request, sender, f"replayed message ({verdict.value})")
            raise errors.Unauthorized(
                f"cluster message from {sender} was refused as a replay ({verdict.value}); "
                "every peer message is accepted once"
            )

    def _reject(self, request: web.Request, sender: Endpoint, reason: str) -> None:
        key = (str(sender), reason)
        if key not in self._rejected and len(self._rejected) < 1024:
            self._rejected.add(key)
            self._log.warning("peer_rejected", peer=str(sender), path=request.path, reason=reason)

    def _submit(self, event: m.Input) -> None:
        if not self._inbox.offer(event):
            raise errors.Busy("membership queue is full; retry shortly")


def _parse_endpoint(text: str, field: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except InvalidAddress as exc:
        raise errors.BadRequest(f"{field}: {exc}") from None
