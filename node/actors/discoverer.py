"""Discoverer: resolves SERVICE_NAME every DISCOVERY_INTERVAL and feeds the answer to the HealthMonitor.

It also makes this node known: every address it sees for the first time gets a hello, so a node that starts
joins its peers' views within a round trip instead of at their next tick. A hello that fails is retried on
the next round; an address that leaves DNS and comes back is greeted again. While DNS names nobody but
this node, the next lookup comes after 1 s instead of the interval (30 times in a row at most, then the
interval again): orchestrators that list a replica only seconds after it runs would otherwise leave
replicas started together alone until the next full round. ``kick()`` runs a round at once (used at start and by tests).
"""

from __future__ import annotations

import asyncio
from typing import Any

from node.core import membership as m
from node.core.ids import Endpoint
from node.runtime.clock import Clock
from node.runtime.mailbox import Mailbox
from node.runtime.resolver import LookupFailed, Resolver
from node.runtime.transport import PeerTransport, PeerUnavailable

# While DNS names no peer, look again after this many seconds (not the full interval), for at most
# QUICK_RETRIES lookups in a row. Measured on a single-node swarm: tasks.<service> listed the replicas
# 8-15 s after they started, so quick retries must cover tens of seconds, not just the first few.
QUICK_RETRY_S = 1.0
QUICK_RETRIES = 30


class Discoverer:
    def __init__(
        self,
        *,
        service_name: str,
        interval_s: float,
        me: Endpoint,
        resolver: Resolver,
        transport: PeerTransport,
        inbox: Mailbox[m.Input],
        clock: Clock,
        log: Any,
    ) -> None:
        self._service_name = service_name
        self._interval_s = interval_s
        self._me = me
        self._resolver = resolver
        self._transport = transport
        self._inbox = inbox
        self._clock = clock
        self._log = log
        self._announced: set[Endpoint] = set()
        self._failing = 0  # consecutive failed lookups, to log the first loudly and the rest quietly
        self._kick = asyncio.Event()
        self.rounds = 0

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        quick_left = QUICK_RETRIES
        while True:
            found_peers = await self._round()
            if found_peers:
                quick_left = QUICK_RETRIES
                await self._pause(self._interval_s)
            elif quick_left > 0:
                # Nobody else in DNS (yet): Swarm and Kubernetes list a task or pod only some seconds after
                # it runs, so replicas started together first see nobody. Look again soon.
                quick_left -= 1
                await self._pause(min(QUICK_RETRY_S, self._interval_s))
            else:
                await self._pause(self._interval_s)

    async def _pause(self, seconds: float) -> None:
        """Until ``seconds`` have passed on the injected clock, or someone kicks."""
        async with asyncio.TaskGroup() as tg:
            sleeper = tg.create_task(self._clock.sleep(seconds), name="discoverer-sleep")
            kicked = tg.create_task(self._kick.wait(), name="discoverer-kick")
            await asyncio.wait((sleeper, kicked), return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            kicked.cancel()
        self._kick.clear()

    async def _round(self) -> bool:
        """One lookup; True if it named any address but ours."""
        self.rounds += 1
        try:
            hosts = await self._resolver.resolve_ipv4(self._service_name)
        except LookupFailed as exc:
            self._note_failure(str(exc))
            await self._inbox.put(m.DnsFailed(str(exc)))
            return False
        if not hosts:
            self._note_failure("no addresses for the name")
        elif self._failing:
            self._log.info("dns_lookup_recovered", service=self._service_name, after_failures=self._failing)
            self._failing = 0
        self._log.debug("dns_lookup", service=self._service_name, addresses=hosts)
        await self._inbox.put(m.DnsAnswered(frozenset(hosts)))
        # Forget addresses DNS no longer lists: the set stays as small as the cluster, and a peer that comes
        # back on the same address (a restarted container) hears from us again at once.
        self._announced &= {Endpoint(h, self._me.port) for h in hosts}
        new = [
            Endpoint(h, self._me.port)
            for h in hosts
            if h != self._me.host and Endpoint(h, self._me.port) not in self._announced
        ]
        if new:
            await self._announce(new)
        return any(h != self._me.host for h in hosts)

    def _note_failure(self, reason: str) -> None:
        self._failing += 1
        # Loud once per outage, then debug: a laptop with no SERVICE_NAME in DNS should not spam warnings.
        log = self._log.warning if self._failing == 1 else self._log.debug
        log("dns_lookup_failed", service=self._service_name, reason=reason, consecutive=self._failing)

    async def _announce(self, peers: list[Endpoint]) -> None:
        async def one(peer: Endpoint) -> None:
            try:
                await self._transport.announce(peer, self._me)
            except PeerUnavailable as exc:
                self._log.debug("announce_failed", peer=str(peer), reason=str(exc))
            else:
                self._announced.add(peer)

        async with asyncio.TaskGroup() as tg:
            for peer in peers:
                tg.create_task(one(peer), name=f"announce-{peer}")
