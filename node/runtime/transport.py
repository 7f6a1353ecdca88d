"""How a node talks to its peers: health probes and membership notices, over HTTP.

The actors depend on the :class:`PeerTransport` protocol only; production uses :class:`HttpTransport`
(one aiohttp session, owned by the node and closed at shutdown), the simulation tests an in-memory network.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import aiohttp
import orjson

from node.core import peerauth
from node.core.ids import Endpoint


class PeerUnavailable(Exception):
    """The peer did not answer as expected; the message says how."""


class PeerTransport(Protocol):
    async def probe(self, peer: Endpoint, me: Endpoint) -> None:
        """Return if the peer is alive and healthy; raise PeerUnavailable otherwise."""
        ...

    async def announce(self, peer: Endpoint, me: Endpoint) -> None:
        """Tell the peer that ``me`` is up. Raise PeerUnavailable if it did not take the notice."""
        ...

    async def depart(self, peer: Endpoint, me: Endpoint) -> None:
        """Tell the peer that ``me`` is leaving. Raise PeerUnavailable if it did not take the notice."""
        ...


class HttpTransport:
    def __init__(self, *, secret: str, probe_timeout_s: float, notice_timeout_s: float = 1.0) -> None:
        self._key = peerauth.derive_key(secret)
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)
        self._notice_timeout = aiohttp.ClientTimeout(total=notice_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _signed(self, path: str, me: Endpoint) -> dict[str, str]:
        return {peerauth.HEADER: peerauth.sign(self._key, path, str(me), time.time())}

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
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailable(_describe(exc)) from None

    async def announce(self, peer: Endpoint, me: Endpoint) -> None:
        await self._notice(peer, "/cluster/hello", me)

    async def depart(self, peer: Endpoint, me: Endpoint) -> None:
        await self._notice(peer, "/cluster/leave", me)

    async def _notice(self, peer: Endpoint, path: str, me: Endpoint) -> None:
        try:
            async with self.session.post(
                f"{peer.url}{path}",
                data=orjson.dumps({"address": str(me), "node_id": me.node_id}),
                headers={"Content-Type": "application/json", **self._signed(path, me)},
                timeout=self._notice_timeout,
            ) as resp:
                await resp.read()
                if resp.status >= 300:
                    raise PeerUnavailable(f"{path} answered HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnavailable(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:200]
