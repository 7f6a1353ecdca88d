"""HealthMonitor: owns the membership view. Folds every input into the pure core and publishes the view.

Inputs arrive on one bounded mailbox (BLOCK policy; HTTP handlers use ``offer`` and answer 503 when full):
DNS answers from the Discoverer, hello/leave notices from the HTTP API, and this actor's own probe results
and clock ticks. Each PROBE_INTERVAL it probes every peer that has no probe in flight; a newly discovered
peer is probed at once. Probe tasks belong to this actor's TaskGroup and report back through the mailbox.

A peer dropped for silence triggers an immediate discovery round (``rediscover``).

The view is published to a latest-value cell whenever it changes and after every DNS round (a round is an
election round even when nothing changed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from node.core import membership as m
from node.core.ids import Endpoint
from node.runtime.clock import Clock
from node.runtime.mailbox import LatestCell, Mailbox
from node.runtime.transport import PeerTransport, PeerUnavailable

_FACT_EVENTS: dict[type, tuple[str, str]] = {
    m.PeerDiscovered: ("info", "peer_discovered"),
    m.PeerHealthy: ("info", "peer_healthy"),
    m.PeerUnhealthy: ("warning", "peer_unhealthy"),
    m.PeerRecovered: ("info", "peer_recovered"),
    m.PeerRemoved: ("warning", "peer_removed"),
    m.ProbeRequested: ("debug", "probe_requested"),
    m.LookupFailedKeptView: ("debug", "view_kept"),
}


class HealthMonitor:
    def __init__(
        self,
        *,
        me: Endpoint,
        params: m.Params,
        probe_interval_s: float,
        inbox: Mailbox[m.Input],
        views: LatestCell[m.View],
        transport: PeerTransport,
        clock: Clock,
        log: Any,
        rediscover: Callable[[], None] = lambda: None,
    ) -> None:
        self._state = m.initial(me, params)
        self._rediscover = rediscover
        self._probe_interval_s = probe_interval_s
        self._inbox = inbox
        self._views = views
        self._transport = transport
        self._clock = clock
        self._log = log
        self._in_flight: set[Endpoint] = set()
        self._published_version = -1
        self._tg: asyncio.TaskGroup | None = None

    @property
    def state(self) -> m.Membership:
        return self._state

    def publish(self) -> None:
        self._views.publish(self._state.view())
        self._published_version = self._state.version

    async def run(self) -> None:
        self.publish()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._ticker(), name="health-ticker")
            while True:
                event = await self._inbox.get()
                self._apply(event)

    async def _ticker(self) -> None:
        while True:
            await self._clock.sleep(self._probe_interval_s)
            await self._inbox.put(m.Tick())

    def _apply(self, event: m.Input) -> None:
        self._state, facts = m.step(self._state, event, self._clock.now())
        for fact in facts:
            self._log_fact(fact)
            if isinstance(fact, m.PeerDiscovered | m.ProbeRequested):
                self._probe(fact.endpoint)
            elif isinstance(fact, m.PeerRemoved) and fact.reason == "timeout":
                # We may have been the one cut off (a paused container, a partition): ask DNS at once rather
                # than at the next tick, so the view heals as soon as the network does.
                self._rediscover()
        if isinstance(event, m.Tick):
            for endpoint in self._state.peers:
                self._probe(endpoint)
        round_done = isinstance(event, m.DnsAnswered | m.DnsFailed)
        if round_done or self._state.version != self._published_version:
            self.publish()

    def _probe(self, endpoint: Endpoint) -> None:
        if endpoint in self._in_flight or self._tg is None:
            return
        self._in_flight.add(endpoint)
        self._tg.create_task(self._probe_one(endpoint), name=f"probe-{endpoint}")

    async def _probe_one(self, endpoint: Endpoint) -> None:
        try:
            await self._transport.probe(endpoint, self._state.me)
        except PeerUnavailable as exc:
            result: m.Input = m.ProbeFailed(endpoint, str(exc))
        else:
            result = m.ProbeSucceeded(endpoint)
        finally:
            self._in_flight.discard(endpoint)
        await self._inbox.put(result)

    def _log_fact(self, fact: m.Fact) -> None:
        level, event = _FACT_EVENTS[type(fact)]
        fields = {k: getattr(fact, k) for k in fact.__slots__}
        if "endpoint" in fields:
            endpoint = fields.pop("endpoint")
            fields["peer"] = str(endpoint)
            fields["peer_id"] = fields.pop("node_id", endpoint.node_id)
        getattr(self._log, level)(event, **fields)
