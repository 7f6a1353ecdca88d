"""Several nodes in one process: fake clock, dict resolver, in-memory network with cuttable links.

``SimCluster`` runs real ``Node`` supervisors (actors, mailboxes, cells) without sockets: probes and notices
go straight into the target node's membership mailbox, as the HTTP handlers would put them. Time moves only
through ``await cluster.advance(dt)``, so "kill the leader, advance one second" runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from node.config import Config
from node.core import membership as m
from node.core.election import Leadership
from node.core.ids import Endpoint
from node.runtime import logging as nodelog
from node.runtime.transport import PeerUnavailable
from node.supervisor import Node
from tests.support.fakes import FakeClock, StaticResolver, settle

SERVICE = "backend-service"
PORT = 3000


@dataclass
class SimNetwork:
    nodes: dict[Endpoint, Node] = field(default_factory=dict)
    up: set[Endpoint] = field(default_factory=set)
    cut: set[frozenset[Endpoint]] = field(default_factory=set)

    def reachable(self, a: Endpoint, b: Endpoint) -> bool:
        return b in self.up and a in self.up and frozenset((a, b)) not in self.cut

    def deliver(self, src: Endpoint, dst: Endpoint, event: m.Input) -> None:
        if not self.reachable(src, dst):
            raise PeerUnavailable("unreachable")
        if not self.nodes[dst].inbox.offer(event):
            raise PeerUnavailable("busy")


class SimTransport:
    """Delivers straight into the target's mailbox, so there is nothing to sign: the HTTP handlers' checks
    (signature, replay window) are tested over real HTTP in tests/http."""

    def __init__(self, net: SimNetwork) -> None:
        self.net = net
        self.incarnation = 0

    def begin(self, me: Endpoint, incarnation: int) -> None:
        self.incarnation = incarnation

    async def probe(self, peer: Endpoint, me: Endpoint) -> None:
        await asyncio.sleep(0)
        self.net.deliver(me, peer, m.ProbedBy(me))

    async def announce(self, peer: Endpoint, me: Endpoint) -> None:
        await asyncio.sleep(0)
        self.net.deliver(me, peer, m.PeerAnnounced(me))

    async def depart(self, peer: Endpoint, me: Endpoint) -> None:
        await asyncio.sleep(0)
        self.net.deliver(me, peer, m.PeerDeparted(me))


class SimCluster:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config(jwt_secret="s" * 32)
        self.clock = FakeClock()
        self.resolver = StaticResolver({SERVICE: []})
        self.net = SimNetwork()
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._stops: dict[Endpoint, asyncio.Event] = {}

    def endpoint(self, host: str) -> Endpoint:
        return Endpoint(host, PORT)

    async def start(self, host: str, *, in_dns: bool = True) -> Node:
        me = self.endpoint(host)
        node = Node(
            self.config,
            me=me,
            clock=self.clock,
            resolver=self.resolver,
            transport=SimTransport(self.net),
            log=nodelog.get_logger(node_id=me.node_id),
            serve_http=False,
        )
        self.net.nodes[me] = node
        self.net.up.add(me)
        if in_dns and host not in self.resolver.names[SERVICE]:
            self.resolver.names[SERVICE] = [*self.resolver.names[SERVICE], host]
        stop = asyncio.Event()
        self._stops[me] = stop
        self._tasks[me] = asyncio.create_task(node.run(stop), name=f"node-{host}")
        await settle()
        return node

    async def kill(self, host: str, *, remove_from_dns: bool = True) -> None:
        """kill -9: the node vanishes without a word."""
        me = self.endpoint(host)
        self.net.up.discard(me)
        task = self._tasks.pop(me)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if remove_from_dns:
            self._undns(host)
        await settle()

    async def terminate(self, host: str) -> None:
        """SIGTERM: the node says goodbye, then stops."""
        me = self.endpoint(host)
        self._stops[me].set()
        await self._tasks.pop(me)
        self.net.up.discard(me)
        self._undns(host)
        await settle()

    def _undns(self, host: str) -> None:
        self.resolver.names[SERVICE] = [h for h in self.resolver.names[SERVICE] if h != host]

    def partition(self, left: list[str], right: list[str]) -> None:
        for a in left:
            for b in right:
                self.net.cut.add(frozenset((self.endpoint(a), self.endpoint(b))))

    def heal(self) -> None:
        self.net.cut.clear()

    async def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move time in small steps so probe rounds interleave as they would in real time."""
        remaining = seconds
        while remaining > 1e-9:
            dt = min(step, remaining)
            await self.clock.advance(dt)
            remaining -= dt

    def decision(self, host: str) -> Leadership:
        decision = self.net.nodes[self.endpoint(host)].decisions.get()
        assert decision is not None
        return decision

    def leaders(self, hosts: list[str]) -> dict[str, int]:
        return {h: self.decision(h).leader.node_id for h in hosts}

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
