"""HTTP side of replication: the peer endpoint ``POST /cluster/replication`` and the forwarding middleware.

``POST /cluster/replication`` takes a batch of replication messages (``node.replication.codec``). It is
accepted once: the signature (``X-TalentNest-Peer``) must verify over the path, the sender address named in
the batch AND the body's SHA-256, and its (incarnation, seq) must be new in this endpoint's own replay
window; anything else is 401 and changes nothing. Malformed batches are 400. (After this node restarts its
windows are empty, so a batch captured earlier is accepted once more: it carries only old-epoch or already
applied messages, which the core ignores or answers as stale; duplicates are part of its fault model.) The answer names this node's
persistent identity and whether it belongs to a cluster, which is how peers map addresses to identities.

``POST /cluster/replication/stage`` asks this node to pull and durably keep the SQLite file of a replicated
/db/load before the leader proposes it (``node.replication.staged_loads``); signed over its body like a
batch, in its own replay window.

``GET /cluster/replication/stream`` (a WebSocket) carries the same batches as frames of one long-lived
connection (see ``node.replication.codec`` for the frame and hello formats, ``transport`` for why). The
opening request is authenticated as a batch is (the signature over the path, the hello's sender address and
the hello itself, replay-guarded in this route's own window), else 401/400 before the upgrade. Every frame
must then carry the next number and a MAC bound to that opening, and a batch naming the hello's sender;
the first frame that does not closes the stream (code 1008) and changes nothing. This side sends, as text
frames, what a POST answer says (identity, member, cluster facts): at the opening and whenever it changes
(looked at on a frame, at most every ``FACTS_CHECK_S``).

Forwarding (``ForwardingMiddleware``): a data request that needs the leader (every write; reads at every
level but ``none``) reaching a follower that knows a healthy leader is sent on, server-side, to that
leader with the client's Authorization, X-Request-Id, content type, query string and body, and the
leader's answer is returned as is, with ``X-TalentNest-Node`` naming the node that executed it. With
``redirect`` in the query the follower answers 301 with ``Location`` on the leader instead (rqlite's
behaviour). A forwarded request carries ``X-TalentNest-Forwarded`` and is never forwarded again (two nodes
that disagree about the leader answer 503 rather than bounce it). With no healthy leader known the request
runs locally and the core's answer stands (503 no_quorum / not_leader with its reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from node import auth, errors
from node.core import peerauth
from node.core.ids import Endpoint, InvalidAddress
from node.core.sqlreq import Level
from node.http import forwarder as forwarding
from node.http.common import (
    EXTRA_HEADERS,
    declared_too_large,
    json_response,
    query_flags,
    read_body,
    request_flags,
)
from node.http.db import checked_request_id
from node.http.fastpath import FastRequest, FastRoute
from node.http.forwarder import Forwarder
from node.replication import codec, snapshot_transfer, staged_loads
from node.replication.service import ANSWERED_EPOCH
from node.replication.transport import HELLO_HEADER, PATH, STREAM_PATH

# A batch holds up to 256 messages and at most 16 MiB of entry payloads (transport.MAX_BATCH_PAYLOAD_BYTES,
# base64 in JSON), or one larger message.
MAX_BATCH_BYTES = 64 << 20
INLINE_DECODE_BYTES = 64 << 10
# How often a stream's receiver looks whether its facts (identity, member, cluster) changed and sends them:
# at the opening, then on a frame at least this long after the last look (frames come with every heartbeat).
FACTS_CHECK_S = 0.01
NODE_HEADER = "X-TalentNest-Node"
EPOCH_HEADER = "X-TalentNest-Epoch"
FORWARDED_HEADER = "X-TalentNest-Forwarded"
_FORWARDED_KEY = FORWARDED_HEADER.lower()  # as node.http.fastpath keys headers
LEADER_HEADER = "X-TalentNest-Leader"
_FORWARDED_REQUEST_HEADERS = ("Authorization", "X-Request-Id", "Content-Type")
_RETURNED_HEADERS = ("Content-Type", "X-TalentNest-Index", EPOCH_HEADER, NODE_HEADER, "Retry-After")
# The same, as the fast path's forwarder reads and writes them (header names lower-cased in what it reads).
_FORWARDED_REQUEST_KEYS = tuple((name, name.lower()) for name in _FORWARDED_REQUEST_HEADERS)
_RETURNED_KEYS = tuple((name, name.lower()) for name in _RETURNED_HEADERS)
# A write body up to this size is forwarded by the fast path's forwarder (larger ones through aiohttp): what
# the forwarder holds in memory at once stays within MAX_BUSY times this.
FAST_FORWARD_MAX_BODY = 64 << 10
LEADER_WATCH_S = 0.05  # how often a forwarded request checks that its leader is still followed
_LEADER_PATHS = {
    "/db/execute": auth.Role.WRITE, "/db/request": auth.Role.WRITE, "/db/query": auth.Role.READ,
    "/db/load": auth.Role.ADMIN,
}  # fmt: skip
# /db/load is forwarded as a stream (its body may be hundreds of MiB): never buffered here.
_STREAMED_PATHS = frozenset({"/db/load"})
VOTERS_PREFIX = "/cluster/voters/"  # DELETE: an operator's membership change, carried out by the leader


class ForwardOutcomeUnknown(errors.NodeError):
    """The leader a request was forwarded to was lost before it answered (same code as the Replicator's)."""

    status = 503
    code = "outcome_unknown"


class ReplicationRoutes:
    def __init__(
        self,
        *,
        replicator: Any,
        secret: str,
        log: Any,
        body_read_timeout_s: float,
        snapshot_resolve: snapshot_transfer.Resolve | None = None,
        snapshot_rate: snapshot_transfer.RateLimiter | None = None,
        snapshot_max_sends: int = snapshot_transfer.DEFAULT_MAX_SENDS,
    ) -> None:
        self._replicator = replicator
        self._key = peerauth.derive_key(secret)
        self._guard = peerauth.ReplayGuard()
        self._log = log
        self._read_timeout_s = body_read_timeout_s
        self._rejected: set[tuple[str, str]] = set()
        self._stream_guard = peerauth.ReplayGuard()
        self._snapshot_guard = peerauth.ReplayGuard()
        self._stage_guard = peerauth.ReplayGuard()
        # GET /cluster/replication/snapshot/<stem>; ``snapshots.resolve`` may also be set later (None: 404).
        self.snapshots = snapshot_transfer.SnapshotSender(
            log=log,
            rate=snapshot_rate or snapshot_transfer.RateLimiter(snapshot_transfer.DEFAULT_RATE_BYTES_S),
            max_sends=snapshot_max_sends,
            resolve=snapshot_resolve,
        )

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.batch)
        app.router.add_get(STREAM_PATH, self.stream)
        app.router.add_get(snapshot_transfer.ROUTE, self.snapshot)
        app.router.add_post(staged_loads.STAGE_PATH, self.stage)

    def _answer(self) -> dict[str, Any]:
        return {
            "identity": self._replicator.identity,
            "member": self._replicator.is_member,
            "cluster": getattr(self._replicator, "cluster_facts", None),
        }

    def _verify_peer(
        self,
        request: web.Request,
        path: str,
        sender: Endpoint,
        signed: bytes,
        guard: Any,
        kind: str,
        what: str,
    ) -> Any:
        """The request's peer header must sign ``signed`` (a batch's body, a stream's hello) for ``path``
        with this cluster's key, and not be a replay (``guard``); else 401, logged as peer_rejected."""
        headers = request.headers.getall(peerauth.HEADER, [])
        header = headers[0] if len(headers) == 1 else None
        claims = peerauth.verify(self._key, header, path, str(sender), signed)
        if claims is None:
            self._reject(sender, f"bad {kind} signature")
            raise errors.Unauthorized(
                f"replication {kind} from {sender} is not signed over {what} with this cluster's secret"
            )
        verdict = guard.accept(str(sender), claims)
        if not verdict.accepted:
            self._reject(sender, f"{kind} replayed ({verdict.value})")
            raise errors.Unauthorized(
                f"replication {kind} from {sender} refused as a replay ({verdict.value})"
            )
        return claims

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        """A snapshot file for a peer (``node.replication.snapshot_transfer``): signed over the path, the
        sender and the Range header, replay-guarded in its own window; then the sender streams it."""
        sender = _claimed_sender(request, "snapshot")
        signed = snapshot_transfer.signed_content(request.headers.get("Range"))
        path = request.path
        self._verify_peer(
            request, path, sender, signed, self._snapshot_guard, "snapshot request", "its path and range"
        )
        return await self.snapshots.serve(request, request.match_info["stem"], str(sender))

    async def stage(self, request: web.Request) -> web.Response:
        """A leader staging an SQLite file for a replicated /db/load (``node.replication.staged_loads``):
        signed over the path, the sender and the body, replay-guarded in its own window. This node pulls
        the file from the sender and answers 200 only once it holds it durably."""
        limit = staged_loads.MAX_STAGE_BODY_BYTES
        raw = await read_body(request, limit=limit, timeout_s=self._read_timeout_s)
        sender = _claimed_sender(request, "stage")
        self._verify_peer(
            request, staged_loads.STAGE_PATH, sender, raw, self._stage_guard, "stage request", "its body"
        )
        try:
            sha256, size = staged_loads.decode_stage_request(raw)
        except ValueError as exc:
            raise errors.BadRequest(f"malformed stage request: {exc}") from None
        if self._replicator.identity is None:
            raise errors.Unavailable("replication has not started on this node yet")
        await self._replicator.stage_load(sender, sha256, size)
        return json_response({"staged": True, "sha256": sha256, "size": size})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        hello = request.headers.get(HELLO_HEADER, "").encode()
        try:
            identity, address = codec.decode_hello(hello)
            sender = Endpoint.parse(address)
        except (codec.CodecError, InvalidAddress) as exc:
            raise errors.BadRequest(f"malformed replication stream hello: {exc}") from None
        claims = self._verify_peer(
            request, STREAM_PATH, sender, hello, self._stream_guard, "stream", "its hello"
        )
        mac = codec.FrameMac(self._key, str(sender), claims.incarnation, claims.seq)
        ws = web.WebSocketResponse(max_msg_size=MAX_BATCH_BYTES, autoping=True, compress=False)
        await ws.prepare(request)
        told: dict[str, Any] | None = None
        expected = 1
        loop = asyncio.get_running_loop()
        check_at = 0.0
        replicator, binary = self._replicator, aiohttp.WSMsgType.BINARY
        try:
            while True:
                # The facts are looked at (a dict built from the replicator's state) at most every
                # FACTS_CHECK_S, not before every frame: under load frames come every millisecond or so.
                if replicator.identity is not None and loop.time() >= check_at:
                    check_at = loop.time() + FACTS_CHECK_S
                    answer = self._answer()
                    if answer != told:
                        told = answer
                        await ws.send_str(orjson.dumps(answer).decode())
                frame = await ws.receive()
                if frame.type is not binary:
                    break  # closed, closing, an error, or a text frame (never sent by a sender)
                try:
                    body = codec.decode_frame(mac, expected, frame.data)
                    if len(body) <= INLINE_DECODE_BYTES:
                        batch = codec.decode_batch(body)
                    else:
                        batch = await asyncio.to_thread(codec.decode_batch, body)
                    if batch.sender != identity or batch.address != address:
                        raise codec.CodecError("the batch names another sender than the stream's hello")
                except codec.CodecError as exc:
                    self._reject(sender, f"bad stream frame: {exc}"[:200])
                    await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"bad frame")
                    break
                expected += 1
                if replicator.identity is not None:
                    replicator.receive(identity, sender, batch.messages, batch.cluster)
        finally:
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
        return ws

    async def batch(self, request: web.Request) -> web.Response:
        raw = await read_body(request, limit=MAX_BATCH_BYTES, timeout_s=self._read_timeout_s)
        try:
            if len(raw) <= INLINE_DECODE_BYTES:
                identity, address, messages, cluster = codec.decode_batch(raw)
            else:
                identity, address, messages, cluster = await asyncio.to_thread(codec.decode_batch, raw)
            sender = Endpoint.parse(address)
        except (codec.CodecError, InvalidAddress) as exc:
            raise errors.BadRequest(f"malformed replication batch: {exc}") from None
        self._verify_peer(request, PATH, sender, raw, self._guard, "batch", "its body")
        ready = self._replicator.identity is not None
        if ready:
            self._replicator.receive(identity, sender, messages, cluster)
        return json_response({**self._answer(), "accepted": len(messages) if ready else 0})

    def _reject(self, sender: Endpoint, reason: str) -> None:
        key = (str(sender), reason)
        if key not in self._rejected and len(self._rejected) < 1024:
            self._rejected.add(key)
            self._log.warning("peer_rejected", peer=str(sender), path=PATH, reason=reason)


def _claimed_sender(request: web.Request, kind: str) -> Endpoint:
    """The sender a snapshot or stage request names (its signature is checked against it next)."""
    claimed = request.headers.get(snapshot_transfer.SENDER_HEADER)
    if claimed is None:
        raise errors.Unauthorized(
            f"{kind} requests must name their sender ({snapshot_transfer.SENDER_HEADER}) and be signed"
        )
    try:
        return Endpoint.parse(claimed)
    except InvalidAddress as exc:
        raise errors.BadRequest(f"malformed {snapshot_transfer.SENDER_HEADER}: {exc}") from None


# The errors of a forwarded request, the same from aiohttp's path (ForwardingMiddleware) and the fast one.
def _unreachable(leader: Endpoint, exc: BaseException) -> errors.Unavailable:
    return errors.Unavailable(
        f"the leader {leader} could not be reached to forward the request: {str(exc)[:200]}"
    )


def _no_answer(leader: Endpoint) -> errors.Unavailable:
    return errors.Unavailable(f"the leader {leader} did not answer the forwarded request in time")


def _leader_lost(leader: Endpoint) -> ForwardOutcomeUnknown:
    return ForwardOutcomeUnknown(
        f"the leader {leader} was lost while it handled the forwarded request; it may or may "
        "not have been applied (retry with the same X-Request-Id)"
    )


class LeaderFastRoute:
    """The write fast path's route (node.http.fastpath) with replication: what :meth:`ForwardingMiddleware.
    handle` does with a ``POST /db/execute``, with the same answers. One this node answers itself (it knows
    no other leader, or the request was forwarded to it) goes to ``inner``. One for the leader is sent on
    by ``forwarder`` (node.http.forwarder) when the body is at most FAST_FORWARD_MAX_BODY
    bytes and the forwarder has room; a redirect (``redirect`` anywhere in the query) and anything else is
    not claimed: aiohttp's path does it."""

    __slots__ = ("_inner", "_replicator", "_node_text", "_forwarder", "_secret", "_me_text", "_max_body")

    def __init__(
        self,
        inner: FastRoute,
        replicator: Any,
        node_text: str,
        forwarder: Forwarder,
        secret: str,
        me_text: str,
        max_body: int,
    ) -> None:
        self._inner = inner
        self._replicator = replicator
        self._node_text = node_text
        self._forwarder = forwarder
        self._secret = secret
        self._me_text = me_text
        self._max_body = max_body

    def claim(self, request: FastRequest) -> bool:
        if _FORWARDED_KEY in request.headers or self._replicator.leader_endpoint() is None:
            return True
        return (
            self._forwarder.has_room()
            and len(request.body) <= FAST_FORWARD_MAX_BODY
            and not _asks_redirect(request.query_string)
        )

    async def answer(self, request: FastRequest) -> tuple[int, dict[str, str] | None, bytes]:
        query_flags(request.query_string)  # as handle(): a bad flag is a 400 before the token is looked at
        leader = None if _FORWARDED_KEY in request.headers else self._replicator.leader_endpoint()
        if leader is not None:
            return await self._forward(request, leader)
        # This node answers (no leader known any more, or forwarded here; as handle() does).
        status, headers, body = await self._inner.answer(request)
        headers = dict(headers) if headers else {}
        headers[NODE_HEADER] = self._node_text
        epoch = ANSWERED_EPOCH.get()
        if epoch is not None:
            headers[EPOCH_HEADER] = str(epoch)
        return status, headers, body

    async def _forward(
        self, request: FastRequest, leader: Endpoint
    ) -> tuple[int, dict[str, str] | None, bytes]:
        """What ForwardingMiddleware._forward does, over the forwarder: the client's Authorization,
        X-Request-Id and content type, the query string and the body go to the leader; its status, body and
        returned headers come back."""
        # Authenticate here too: a follower must not relay requests for anyone who can reach it.
        auth.authenticate(request.headers.get("authorization"), self._secret, now=time.time()).require(
            auth.Role.WRITE
        )
        if len(request.body) > self._max_body:  # its Content-Length, as _forward's read_body checks it
            raise declared_too_large(len(request.body), self._max_body)
        query = request.query_string
        head = [f"POST /db/execute{'?' if query else ''}{query} HTTP/1.1\r\nHost: {leader}\r\n"]
        for name, key in _FORWARDED_REQUEST_KEYS:
            value = request.headers.get(key)
            if value is not None:
                head.append(f"{name}: {value}\r\n")
        head.append(f"{FORWARDED_HEADER}: {self._me_text}\r\nContent-Length: {len(request.body)}\r\n\r\n")
        raw = "".join(head).encode("latin-1") + request.body

        def still_leader() -> bool:
            return self._replicator.leader_endpoint() == leader

        try:
            status, answer_headers, body = await self._forwarder.exchange(leader, raw, still_leader)
        except forwarding.Unreachable as exc:
            raise _unreachable(leader, exc) from None
        except forwarding.NoAnswer:
            raise _no_answer(leader) from None
        except forwarding.LeaderLost:
            raise _leader_lost(leader) from None
        except forwarding.Broken as exc:
            raise ForwardOutcomeUnknown(
                f"the connection to the leader {leader} broke before its whole answer ({str(exc)[:200]}); the "
                "request may or may not have been applied (retry with the same X-Request-Id)"
            ) from None
        out = {name: answer_headers[key] for name, key in _RETURNED_KEYS if key in answer_headers}
        out.setdefault(NODE_HEADER, str(leader.node_id))
        return status, out, body


class ForwardingMiddleware:
    def __init__(
        self,
        *,
        replicator: Any,
        me: Endpoint,
        jwt_secret: str,
        max_body_bytes: int,
        body_read_timeout_s: float,
        forward_timeout_s: float = 15.0,
        load_forward_timeout_s: float = 600.0,
    ) -> None:
        self._replicator = replicator
        self._me = me
        self._me_text = str(me)
        self._node_text = str(me.node_id)  # X-TalentNest-Node of every answer this node gives: built once
        self._secret = jwt_secret
        self._max_body = max_body_bytes
        self._read_timeout_s = body_read_timeout_s
        self._timeout = aiohttp.ClientTimeout(total=forward_timeout_s)
        self._load_timeout = aiohttp.ClientTimeout(total=load_forward_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._forwarder: Forwarder | None = None

    async def close(self) -> None:
        if self._forwarder is not None:
            self._forwarder.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def fast_route(self, inner: FastRoute) -> LeaderFastRoute:
        """``inner`` (the local write route of the fast path) behind this layer's rule: see LeaderFastRoute."""
        if self._forwarder is None:
            self._forwarder = Forwarder(timeout_s=self._timeout.total or 0.0, watch_s=LEADER_WATCH_S)
        return LeaderFastRoute(
            inner,
            self._replicator,
            self._node_text,
            self._forwarder,
            self._secret,
            self._me_text,
            self._max_body,
        )

    def middleware(self) -> Any:
        """The aiohttp middleware (a plain decorated function: aiohttp takes nothing else as new-style)."""

        @web.middleware
        async def forwarding(request: web.Request, handler: Any) -> web.StreamResponse:
            return await self.handle(request, handler)

        return forwarding

    async def handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path == "/db/backup" and "leader" in request.query:
            return await self._backup_from_leader(request, handler)
        role = _LEADER_PATHS.get(path)
        method = request.method
        if method == "DELETE" and path.startswith(VOTERS_PREFIX):
            role = auth.Role.ADMIN
        elif role is None or method not in ("GET", "POST"):
            return await handler(request)
        flags = request_flags(request)
        needs_leader = path != "/db/query" or flags.level is not Level.NONE
        leader = self._replicator.leader_endpoint() if needs_leader else None
        if leader is None or FORWARDED_HEADER in request.headers:
            response = await handler(request)
            headers = response.headers
            headers[NODE_HEADER] = self._node_text
            epoch = ANSWERED_EPOCH.get()
            if epoch is not None:
                headers[EPOCH_HEADER] = str(epoch)
            return response
        # Authenticate here too: a follower must not relay requests for anyone who can reach it.
        auth.authenticate(request.headers.get("Authorization"), self._secret, now=time.time()).require(role)
        _check_relayed_headers(request)
        if flags.redirect:
            location = f"{leader.url}{request.raw_path}"  # the target as the client sent it (see _exchange)
            return json_response(
                {"leader": leader.url},
                status=301,
                headers={"Location": location, NODE_HEADER: str(leader.node_id)},
            )
        return await self._forward(request, leader)

    async def _backup_from_leader(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """``/db/backup?leader``: the leader's copy. A follower answers 307 to the leader (a database is
        never relayed through this node's memory); the leader, or a node that knows no leader, answers
        itself and says which node it is (``X-TalentNest-Node``) and whether it leads
        (``X-TalentNest-Leader``), so a client that needs the leader's copy can tell it did not get one."""
        leader = self._replicator.leader_endpoint()
        if leader is not None and FORWARDED_HEADER not in request.headers:
            auth.authenticate(request.headers.get("Authorization"), self._secret, now=time.time()).require(
                auth.Role.ADMIN
            )
            return json_response(
                {"leader": leader.url},
                status=307,
                headers={
                    "Location": f"{leader.url}{request.path_qs}",
                    NODE_HEADER: str(leader.node_id),
                },
            )
        # The backup streams (its headers are sent before the handler returns): it adds these itself.
        request[EXTRA_HEADERS] = {
            NODE_HEADER: self._node_text,
            LEADER_HEADER: "true" if self._replicator.is_leader() else "false",
        }
        return await handler(request)

    async def _forward(self, request: web.Request, leader: Endpoint) -> web.Response:
        streamed = request.path in _STREAMED_PATHS
        timeout = self._load_timeout if streamed else self._timeout
        # A load's body goes on as it arrives (the leader applies its own limits: size, read time, disk).
        body: Any = (
            request.content if streamed
            else await read_body(request, limit=self._max_body, timeout_s=self._read_timeout_s)
        )  # fmt: skip
        headers = {h: request.headers[h] for h in _FORWARDED_REQUEST_HEADERS if h in request.headers}
        headers[FORWARDED_HEADER] = self._me_text
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, use_dns_cache=False)
            )
        exchange = asyncio.ensure_future(self._exchange(request, leader, body, headers, timeout))
        try:
            # A leader that dies mid-request (SIGKILL, a cut cable) sends no RST: without this watch the
            # client would wait the whole forward timeout. Once this node's view no longer names that leader
            # the answer is "outcome unknown" (the write may have committed), at failure-detection speed.
            for _ in range(int((timeout.total or 0) / LEADER_WATCH_S) + 2):  # bounded by the forward timeout
                done, _ = await asyncio.wait({exchange}, timeout=LEADER_WATCH_S)
                if done:
                    return exchange.result()
                if self._replicator.leader_endpoint() != leader:
                    raise _leader_lost(leader)
            raise _no_answer(leader)
        finally:
            if exchange.done():
                # Its outcome was returned or raised above; marked retrieved in case this coroutine was
                # cancelled just as it finished. (A gather here would cost the answer a loop iteration.)
                if not exchange.cancelled():
                    exchange.exception()
            else:
                exchange.cancel()
                await asyncio.gather(exchange, return_exceptions=True)

    async def _exchange(
        self,
        request: web.Request,
        leader: Endpoint,
        body: Any,
        headers: dict[str, str],
        client_timeout: aiohttp.ClientTimeout,
    ) -> web.Response:
        assert self._session is not None
        try:
            # The request target exactly as the client sent it (``raw_path``: path and query, still
            # percent-encoded), not one rebuilt from the decoded parts: yarl would resolve "x/.." segments and
            # re-encode the query, so the leader could act on another resource, or split a value holding an
            # encoded "&", than the one this node matched and a leader asked directly would refuse.
            async with self._session.request(
                request.method, URL(f"{leader.url}{request.raw_path}", encoded=True), data=body, headers=headers,
                timeout=client_timeout, allow_redirects=False,
            ) as resp:  # fmt: skip
                content = await resp.read()
                out = {h: resp.headers[h] for h in _RETURNED_HEADERS if h in resp.headers}
                out.setdefault(NODE_HEADER, str(leader.node_id))
                return web.Response(status=resp.status, body=content, headers=out)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _unreachable(leader, exc) from None


# A header value a follower may relay: printable ASCII, space and tab (RFC 9110 field-vchar without obs-text).
_RELAYABLE = re.compile(r"[\t\x20-\x7e]*\Z")


def _check_relayed_headers(request: web.Request) -> None:
    """400 for a header this node would relay altered: aiohttp's client re-encodes a value and drops what is
    not ASCII, so the leader would act on another value than the client sent (a request ID ``caf\xe9-1``
    arrived as ``caf-1``: a valid, different ID). A request ID gets the leader's own message. What can be
    relayed unchanged is, and the leader judges it."""
    for name in _FORWARDED_REQUEST_HEADERS:
        value = request.headers.get(name)
        if value is not None and not _RELAYABLE.match(value):
            if name == "X-Request-Id":
                checked_request_id(value)  # not ASCII: raises the leader's 400
            raise errors.BadRequest(f"the {name} header must be printable ASCII")


def _asks_redirect(query_string: str) -> bool:
    """Whether the query asks for a 301 (``redirect``), decoded as the flags are (``%72edirect`` too). A
    query whose flags do not parse is not a redirect here: answering it gives the flags' 400."""
    if "redirect" not in query_string and "%" not in query_string:
        return False  # the common case: no flag can spell it
    try:
        return query_flags(query_string).redirect
    except errors.NodeError:
        return False
