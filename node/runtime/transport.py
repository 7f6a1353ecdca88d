"""How a node talks to its peers: health probes and membership notices, over HTTP.

The actors depend on the :class:`PeerTransport` protocol only; production uses :class:`HttpTransport`
(one aiohttp session, owned by the node and closed at shutdown), the simulation tests an in-memory network.

Every message is signed (node.core.peerauth): this process's incarnation and a fresh sequence number. The
transport remembers each peer's incarnation from its health and hello answers, because a ``leave`` must
name the receiver's current incarnation to be accepted.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Protocol

import aiohttp
import orjson

from node.core import peerauth
from node.core.ids import Endpoint


class PeerUnavailable(Exception):
    """The peer did not answer as expected; the message says how."""


class PeerTransport(Protocol):
    def begin(self, me: Endpoint, incarnation: int) -> None:
        """Start signing as ``me`` in this incarnation; called once, before the first message."""
        ...

    async def probe(self, peer: Endpoint, me: Endpoint) -> None:
        """Return if the peer is alive and healthy; raise PeerUnavailable otherwise."""
        ...

    async def announce(self, peer: Endpoint, me: Endpoint) -> None:
        """Tell the peer that ``me`` is up. Raise PeerUnavailable if it did not take the notice."""
        ...

    async def depart(self, peer: Endpoint, me: Endpoint) -> None:
        """Tell the peer that ``me`` is leaving. Raise PeerUnavailable if it did not take the notice."""
        ...


# Peer incarnations remembered (LRU beyond this; a forgotten peer just cannot be told we leave, and
# notices it by probing). A cluster has a handful of peers.
MAX_KNOWN_PEERS = 4096
# Answers to probes and notices are a few dozen bytes of JSON; never read more than this from a peer.
ANSWER_MAX_BYTES = 4096


class HttpTransport:
    def __init__(self, *, secret: str, probe_timeout_s: float, notice_timeout_s: float = 1.0) -> None:
        self._key = peerauth.derive_key(secret)
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)
        self._notice_timeout = aiohttp.ClientTimeout(total=notice_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._signer: peerauth.Signer | None = None
        self._incarnations: OrderedDict[Endpoint, int] = OrderedDict()

    def begin(self, me: Endpoint, incarnation: int) -> None:
        self._signer = peerauth.Signer(self._key, str(me), incarnation)

    def known_incarnation(self, peer: Endpoint) -> int:
        """The peer's incarnation from its last answer; 0 if it never answered."""
        return self._incarnations.get(peer, 0)

    def _signed(self, path: str, me: Endpoint, receiver_incarnation: int = 0) -> dict[str, str]:
        if self._signer is None or self._signer.sender != str(me):
            raise RuntimeError("HttpTransport.begin(me, incarnation) must come before the first message")
        return {peerauth.HEADER: self._signer.next_header(path, receiver_incarnation)}

    def _learn(self, peer: Endpoint, raw: bytes) -> None:
        """Remember the incarnation a peer reported (ignored if the answer does not carry a sane one)."""
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        incarnation = body.get("incarnation") if isinstance(body, dict) else None
        if type(incarnation) is not int or not 1 <= incarnation <= peerauth.MAX_NUMBER:
            return
        self._incarnations[peer] = incarnation
        self._incarnations.move_to_end(peer)
        while len(self._incarnations) > MAX_KNOWN_PEERS:
            self._incarnations.popitem(last=False)

    async def __aenter__(self) -> HttpTransport:
        # Small pool: a handful of peers, each probed a few times a second over kept-alive connections.
        connector = aiohttp.TCPConnector(limit=64, limit_per_host=4, ttl_dns_cache=None, use_dns_cache=False)
        self._session = aiohttp.ClientSession(
            connector=connector, json_serialize=lambda o: orjson.dumps(o).decode()
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpTransport used outside 'async with'")
        return self._session

    async def probe(self, peer: Endpoint, me: Endpoint) -> None:
        path = "/cluster/health"
        try:
            async with self.session.get(
                f"{peer.url}{path}",
                params={"from": str(me)},
                timeout=self._probe_timeout,
                headers=self._signed(path, me),
            ) as resp:
                if resp.status != 200:
                    raise PeerUnavailable(f"health answered HTTP {resp.status}")
                self._learn(peer, await _read_bounded(resp))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailable(_describe(exc)) from None

    async def announce(self, peer: Endpoint, me: Endpoint) -> None:
        await self._notice(peer, "/cluster/hello", me)

    async def depart(self, peer: Endpoint, me: Endpoint) -> None:
        # A leave is only accepted if it names the receiver's current incarnation (see peerauth): without
        # one there is nothing worth sending, and the peer notices our absence by probing.
        incarnation = self.known_incarnation(peer)
        if not incarnation:
            raise PeerUnavailable("its incarnation is unknown (it never answered a probe)")
        await self._notice(peer, "/cluster/leave", me, incarnation)

    async def _notice(self, peer: Endpoint, path: str, me: Endpoint, receiver_incarnation: int = 0) -> None:
        try:
            async with self.session.post(
                f"{peer.url}{path}",
                data=orjson.dumps({"address": str(me), "node_id": me.node_id}),
                headers={"Content-Type": "application/json", **self._signed(path, me, receiver_incarnation)},
                timeout=self._notice_timeout,
            ) as resp:
                raw = await _read_bounded(resp)
                if resp.status >= 300:
                    raise PeerUnavailable(f"{path} answered HTTP {resp.status}")
                self._learn(peer, raw)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailable(_describe(exc)) from None


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    """The answer's body, or b"" if it is longer than any answer of ours (a misbehaving peer)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1024):
        size += len(chunk)
        if size > ANSWER_MAX_BYTES:
            return b""
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:200]
