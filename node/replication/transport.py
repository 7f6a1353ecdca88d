"""Replication messages between peers: batched, pipelined, signed over the body, on kept-alive connections.

Why not one HTTP request per message: a leader sends heartbeats to every member every few tens of
milliseconds and Appends for every client batch; a request each would cost a round trip each. Instead each
peer has one bounded queue and ``WORKERS_PER_PEER`` workers; a worker takes everything queued (up to
``MAX_BATCH_MESSAGES``) and POSTs it as one batch to ``/cluster/replication``, so batches are pipelined (a
second batch goes out while the first is in flight) and their size follows the load. All peers share one
aiohttp session, so connections stay open between batches.

Overflow policy of a peer queue (``MAX_QUEUED_MESSAGES``): the oldest heartbeat (or heartbeat ack) is
dropped first, else the oldest message. Loss is what the core tolerates anyway: unacknowledged Appends and
Prepares are resent after ``resend_s``, a new heartbeat round follows every ``heartbeat_s``. A peer that
does not answer loses its batch (counted); the core resends.

Signing (``node.core.peerauth``): one :class:`~node.core.peerauth.Signer` for this process's replication
batches (the node's incarnation, its own sequence counter), over the path, the sender address and the
SHA-256 of the body. The receiver keeps its own ReplayGuard for this path, so a replayed batch is refused
and changes nothing.

Identities: the core speaks of persistent identities, HTTP of addresses. Every batch names its sender's
identity and address; every answer names the receiver's identity, whether it belongs to a cluster and
(``cluster``) the leader it follows, that leader's ID and whether it holds client data, which the
formation rules (``node.core.replication.formation``) need to tell clusters apart. An
empty batch (``ping``) is how a node learns the identity behind an address it found in its view.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from node.core import peerauth
from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.replication import codec

PATH = "/cluster/replication"
MAX_QUEUED_MESSAGES = 4096
MAX_BATCH_MESSAGES = 256
WORKERS_PER_PEER = 2
ANSWER_MAX_BYTES = 4096
FAILURE_BACKOFF_S = 0.05


class _Peer:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.queue: collections.deque[msg.Message] = collections.deque()
        self.ping = False
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def put(self, message: msg.Message, stats: dict[str, int]) -> None:
        if len(self.queue) >= MAX_QUEUED_MESSAGES:
            for i, queued in enumerate(self.queue):
                if isinstance(queued, msg.Heartbeat | msg.HeartbeatAck):
                    del self.queue[i]
                    break
            else:
                self.queue.popleft()
            stats["dropped"] += 1
        self.queue.append(message)
        self.wake.set()


class ReplicationTransport:
    def __init__(
        self,
        *,
        secret: str,
        me: Endpoint,
        identity: str,
        timeout_s: float,
        learn: Callable[[Endpoint, str, bool, tuple[str | None, int, bool] | None], None],
        log: Any,
    ) -> None:
        self._key = peerauth.derive_key(secret)
        self._me = me
        self._identity = identity
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._learn = learn
        self._log = log
        self._signer: peerauth.Signer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._peers: dict[Endpoint, _Peer] = {}
        self._group: asyncio.TaskGroup | None = None
        self.stats = {"batches": 0, "messages": 0, "failed": 0, "dropped": 0}
        self._failing: set[Endpoint] = set()

    def begin(self, incarnation: int) -> None:
        self._signer = peerauth.Signer(self._key, str(self._me), incarnation)

    async def run(self) -> None:
        """Own the session and every peer worker until cancelled."""
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=WORKERS_PER_PEER + 2, use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            self._session, self._group = session, tg
            for peer in self._peers.values():
                self._start(peer)
            try:
                await asyncio.Event().wait()
            finally:
                self._group = None
                for peer in self._peers.values():
                    for task in peer.tasks:
                        task.cancel()

    def _start(self, peer: _Peer) -> None:
        if self._group is not None and not peer.tasks:
            peer.tasks = [
                self._group.create_task(self._worker(peer), name=f"replication-to-{peer.endpoint}")
                for _ in range(WORKERS_PER_PEER)
            ]

    def _peer(self, endpoint: Endpoint) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = self._peers[endpoint] = _Peer(endpoint)
            self._start(peer)
        return peer

    def send(self, endpoint: Endpoint, message: msg.Message) -> None:
        """Queue a message (never blocks; see the overflow policy)."""
        self._peer(endpoint).put(message, self.stats)

    def ping(self, endpoint: Endpoint) -> None:
        """Send an empty batch soon, to learn the peer's identity from its answer."""
        peer = self._peer(endpoint)
        peer.ping = True
        peer.wake.set()

    async def _worker(self, peer: _Peer) -> None:
        while True:
            if not peer.queue and not peer.ping:
                peer.wake.clear()
                await peer.wake.wait()
                continue
            batch = [peer.queue.popleft() for _ in range(min(len(peer.queue), MAX_BATCH_MESSAGES))]
            peer.ping = False
            if not await self._post(peer.endpoint, batch):
                await asyncio.sleep(FAILURE_BACKOFF_S)  # a dead peer refuses at once: do not spin on it

    async def _post(self, endpoint: Endpoint, batch: list[msg.Message]) -> bool:
        assert self._session is not None and self._signer is not None
        body = codec.encode_batch(self._identity, str(self._me), batch)
        headers = {
            "Content-Type": "application/json",
            peerauth.HEADER: self._signer.next_header(PATH, 0, body),
        }
        try:
            async with self._session.post(
                f"{endpoint.url}{PATH}", data=body, headers=headers, timeout=self._timeout
            ) as resp:
                raw = await resp.content.read(ANSWER_MAX_BYTES + 1)
                if resp.status != 200:
                    raise aiohttp.ClientError(f"HTTP {resp.status}: {raw[:200]!r}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats["failed"] += 1
            if endpoint not in self._failing:
                self._failing.add(endpoint)
                self._log.info("replication_peer_unreachable", peer=str(endpoint), reason=str(exc)[:200])
            return False
        if endpoint in self._failing:
            self._failing.discard(endpoint)
            self._log.info("replication_peer_reachable", peer=str(endpoint))
        self.stats["batches"] += 1
        self.stats["messages"] += len(batch)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return True
        if isinstance(answer, dict) and isinstance(answer.get("identity"), str):
            identity = answer["identity"]
            if 0 < len(identity) <= codec.MAX_IDENTITY_CHARS:
                self._learn(
                    endpoint, identity, answer.get("member") is True, _cluster_of(answer.get("cluster"))
                )
        return True


def _cluster_of(raw: object) -> tuple[str | None, int, bool] | None:
    """The answer's ``cluster`` facts, validated (anything malformed is ignored, never trusted)."""
    if not isinstance(raw, dict):
        return None
    leader, leader_id = raw.get("leader"), raw.get("leader_id")
    if leader is not None and not (isinstance(leader, str) and 0 < len(leader) <= codec.MAX_IDENTITY_CHARS):
        return None
    if not isinstance(leader_id, int) or isinstance(leader_id, bool) or not 0 <= leader_id < 1 << 63:
        return None
    return leader, leader_id, raw.get("data") is True
