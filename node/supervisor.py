"""The supervisor: builds the actors, wires their mailboxes and cells, owns every task, orders start and stop.

Start order: HealthMonitor and Elector first (so the first decision exists before anyone can ask for it),
then the HTTP server (peers can reach us), then the database's open and integrity check in the background
(it may take seconds per GB; liveness must not wait), then the Discoverer (which announces us to peers, who
will probe us at once). Stop order is the reverse, with the goodbye in the middle:

0. with REPLICATION=on a leader hands over to an up-to-date successor (bounded, see
   wiring.handover_budget_s); then the database refuses its queued jobs and interrupts running ones (their
   handlers answer 503),
1. stop discovering and probing (so no probe of ours can race our goodbye),
2. tell every known peer we are leaving (bounded: a dead peer must not delay the exit),
3. stop the HTTP server,
4. close the database, then the log (every applied entry is already durable in it), cancel what is left.

All tasks belong to one ``asyncio.TaskGroup``. If any actor raises, the group cancels the rest and the
exception propagates out of :meth:`Node.run`, rather than leaving a node half alive. On that path too the
Node gives back everything it holds before ``run`` returns: HTTP stops listening, the database and then the
log are closed (their threads end), every task has ended (the TaskGroup waits for them), and the DATA_DIR
lock is released last. Then ``python -m node`` builds a fresh Node in the same process after a backoff, whose
start-up checks quarantine whatever is damaged (RESTART_ON_CRASH, node.runtime.restart); with
RESTART_ON_CRASH=off the process exits 1 instead, for a supervisor that restarts it (the documented
``docker run`` has no restart policy, so nothing else would).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from node.actors.discoverer import Discoverer
from node.actors.elector import Elector
from node.actors.health import HealthMonitor
from node.config import Config
from node.core import election
from node.core import membership as m
from node.core.ids import Endpoint
from node.http.cluster import ClusterRoutes
from node.http.db import DbRoutes, ExecuteFastRoute
from node.http.server import HttpApi, HttpLimits, view_hosts
from node.runtime.clock import Clock
from node.runtime.incarnation import next_incarnation
from node.runtime.mailbox import LatestCell, Mailbox, Overflow
from node.runtime.resolver import Resolver
from node.runtime.transport import PeerTransport, PeerUnavailable
from node.service import LogBackedDataService
from node.storage.dirlock import DataDirLock, lock_data_dir
from node.storage.sqlite import Database, Limits

# Membership inputs waiting to be applied. Producers that can wait (DNS rounds, probe results, ticks) block;
# HTTP handlers offer and answer 503 when it is full. A few peers produce a few events per probe interval,
# so 1024 is only reached if the HealthMonitor is stuck, and then backpressure is the right answer.
MEMBERSHIP_INBOX_SIZE = 1024


def database_from(config: Config, log: Any = None) -> Database:
    limits = Limits(
        statement_timeout_s=config.db_statement_timeout_s,
        max_result_rows=config.db_max_result_rows,
        max_result_bytes=config.db_max_result_bytes,
        write_step_budget=config.db_write_step_budget,
        readers=config.db_readers,
        readers_per_client=config.db_readers_per_client or None,
    )
    # With replication the Replicator quarantines a corrupt database with the rest of the replicated state
    # (one event, then a resync as a new member); without, the database moves its own file aside.
    return Database(
        config.data_dir, limits=limits, queue_size=config.db_queue_size, log=log,
        quarantine_corrupt=config.replication != "on",
    )  # fmt: skip


class Node:
    def __init__(
        self,
        config: Config,
        *,
        me: Endpoint,
        clock: Clock,
        resolver: Resolver,
        transport: PeerTransport,
        log: Any,
        serve_http: bool = True,
    ) -> None:
        self.config = config
        self.me = me
        self.log = log
        self._transport = transport
        self.inbox: Mailbox[m.Input] = Mailbox("membership", MEMBERSHIP_INBOX_SIZE, Overflow.BLOCK)
        self.views: LatestCell[m.View] = LatestCell()
        self.decisions: LatestCell[election.Leadership] = LatestCell()
        self.health = HealthMonitor(
            me=me,
            params=m.Params(config.failure_threshold, config.node_timeout_s),
            probe_interval_s=config.probe_interval_s,
            inbox=self.inbox,
            views=self.views,
            transport=transport,
            clock=clock,
            log=log,
            rediscover=lambda: self.discoverer.kick(),
        )
        self.elector = Elector(views=self.views, decisions=self.decisions, log=log)
        self.discoverer = Discoverer(
            service_name=config.service_name,
            interval_s=config.discovery_interval_s,
            me=me,
            resolver=resolver,
            transport=transport,
            inbox=self.inbox,
            clock=clock,
            log=log,
        )
        self.http: HttpApi | None = None
        self.cluster_routes: ClusterRoutes | None = None
        self.incarnation = 0
        self._dir_lock: DataDirLock | None = None  # DATA_DIR held while a serving node runs
        if serve_http:
            self.http = HttpApi(
                host=config.host,
                port=config.port,
                log=log,
                limits=HttpLimits.from_config(config),
                is_peer=view_hosts(self.views),
            )
            self.cluster_routes = ClusterRoutes(
                me=me,
                decisions=self.decisions,
                inbox=self.inbox,
                secret=config.jwt_secret,
                log=log,
                body_read_timeout_s=config.body_read_timeout_s,
            )
            self.cluster_routes.add_to(self.http.app)
        self.started = asyncio.Event()

        # The data API: this node's own database. DATA_DIR is checked before HTTP starts (a bad one fails the
        # start-up); the file is opened and integrity-checked in the background after (see run()).
        self.database: Database | None = None
        self.data_service: LogBackedDataService | None = None
        if self.http is not None:
            self.database = database_from(config, log)
            # This node's own database: opened and checked at start, closed at shutdown. With REPLICATION=off
            # it also serves the data calls, every write appended to DATA_DIR/log and fsynced there before it is
            # applied and acknowledged; with replication the Replicator keeps that log (own_log=False).
            self.data_service = LogBackedDataService(
                self.database,
                log_reserve_bytes=config.log_reserve_bytes,
                emit=log,
                own_log=config.replication != "on",
            )

        # --- REPLICATION=on (node/replication/wiring.py): data calls go through replication (the Replicator
        # opens and checks this node's database, the local service closes it), plus the peer endpoint,
        # forwarding and the status fields.
        self.replication = None
        served: Any = self.data_service
        if config.replication == "on" and self.http is not None and self.data_service is not None:
            from node.replication.wiring import ReplicatedNodeService, Replication

            self.replication = Replication(self)
            served = ReplicatedNodeService(self.data_service, self.replication)
            if self.cluster_routes is not None:
                self.cluster_routes.replication_status = self.replication.status_fields
                self.cluster_routes.remove_member = self.replication.remove_member
        if self.http is not None and served is not None:
            routes = DbRoutes(
                service=served,
                jwt_secret=config.jwt_secret,
                decisions=self.decisions,
                max_body_bytes=config.db_max_body_bytes,
                max_load_bytes=config.db_max_load_bytes,
                max_statements=config.db_max_statements,
                body_read_timeout_s=config.body_read_timeout_s,
                log_reserve_bytes=config.log_reserve_bytes,
            )
            routes.add_to(self.http.app)
            # Plain writes this node answers itself skip aiohttp's request machinery (node/http/fastpath.py);
            # with replication behind the forwarding layer's rule (a follower's writes take aiohttp's path).
            fast: Any = ExecuteFastRoute(routes)
            if self.replication is not None:
                fast = self.replication.forwarding.fast_route(fast)
            self.http.fast_path(fast)

    async def _begin_incarnation(self) -> None:
        """Allocate this start's peer-message incarnation before any peer message goes out or comes in.

        A serving node persists it in DATA_DIR (node.runtime.incarnation); the in-process simulation has no
        DATA_DIR and no signatures, so it uses 1.
        """
        if self.http is not None:
            # First, before anything in DATA_DIR is read or written: one process per DATA_DIR (a second node
            # on the same volume, or `recover` while this one runs, is refused; node.storage.dirlock). Held
            # until this run ends (run's finally; a restart in the same process takes it again); an OSError
            # here is a start-up failure (exit 2) that names the holder.
            self._dir_lock = await asyncio.to_thread(lock_data_dir, self.config.data_dir)
            now_ms = time.time_ns() // 1_000_000
            self.incarnation = await asyncio.to_thread(next_incarnation, self.config.data_dir, now_ms)
        else:
            self.incarnation = 1
        self._transport.begin(self.me, self.incarnation)
        if self.cluster_routes is not None:
            self.cluster_routes.begin(self.incarnation)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            if self._dir_lock is not None:
                self._dir_lock.release()  # only after every file in DATA_DIR is closed (the log last)

    async def _run(self, stop: asyncio.Event) -> None:
        await self._begin_incarnation()
        async with asyncio.TaskGroup() as tg:
            health = tg.create_task(self.health.run(), name="health-monitor")
            elector = tg.create_task(self.elector.run(), name="elector")
            await self.decisions.wait_newer(0)
            try:
                if self.database is not None:
                    await self.database.prepare()  # DATA_DIR usable, or exit 2 before serving anything
                if self.http is not None:
                    await self.http.start()
                if self.data_service is not None and self.replication is None:
                    # quick_check takes ~1 s/GB warm (~13 s/GB cold), and the log's replay runs after it:
                    # liveness (/cluster/health) must not wait for them. Data endpoints answer 503 "database
                    # is being checked" meanwhile. With replication the Replicator opens the database as
                    # the first step of its start-up (it decides about a quarantine of the whole replicated
                    # state before anything else opens those files).
                    tg.create_task(self.data_service.start(), name="database-start")
                discoverer = tg.create_task(self.discoverer.run(), name="discoverer")
                if self.replication is not None:  # REPLICATION=on
                    tg.create_task(self.replication.run(stop), name="replicator")
                self.log.info(
                    "node_started",
                    address=self.me.url,
                    service=self.config.service_name,
                    discovery_interval_s=self.config.discovery_interval_s,
                    node_timeout_s=self.config.node_timeout_s,
                    incarnation=self.incarnation,
                )
                self.started.set()
                await stop.wait()
                self.log.info("shutting_down", reason="signal")
                if self.replication is not None:
                    # A leader hands over to an up-to-date successor before anything else stops: the
                    # successor's acks reach it over HTTP, the peers must still see it healthy (the goodbye
                    # would have them drop it, and forwarded writes with it), and the database still applies
                    # what commits meanwhile, so the writes it accepted before the signal get their real
                    # answer. New writes are refused by the replication core from the signal on. Bounded.
                    await self.replication.handed_over()
                if self.data_service is not None:
                    # New writes are refused, queued database jobs fail and running ones are interrupted
                    # now, so their handlers answer 503 while HTTP still serves, and no backlog delays the
                    # exit.
                    self.data_service.begin_shutdown()
                for task in (discoverer, health):
                    task.cancel()
                await asyncio.wait([discoverer, health])
                await self._say_goodbye()
            finally:
                try:
                    if self.http is not None:
                        await self.http.stop()
                finally:
                    # After HTTP (requests in flight finish first); the database closes before the log. Even
                    # if HTTP's stop failed: the next Node of a restart opens these files again.
                    if self.data_service is not None:
                        await self.data_service.close()
            elector.cancel()
        self.log.info("node_stopped")

    async def _say_goodbye(self) -> None:
        peers = [p.endpoint for p in self.health.state.peers.values() if p.health is not m.Health.UNHEALTHY]
        if not peers:
            self.log.info("goodbye_sent", peers=0, acknowledged=0)
            return

        acknowledged: list[Endpoint] = []

        async def one(peer: Endpoint) -> None:
            try:
                await self._transport.depart(peer, self.me)
            except PeerUnavailable:
                return
            acknowledged.append(peer)

        # Bounded: a dead or partitioned peer must not hold up the exit (docker stop waits only 10 s, and we
        # promise 2 s). Peers that miss the notice detect our absence by probing.
        budget = min(0.5, self.config.shutdown_grace_s / 3)
        try:
            async with asyncio.timeout(budget), asyncio.TaskGroup() as tg:
                for peer in peers:
                    tg.create_task(one(peer), name=f"goodbye-{peer}")
        except TimeoutError:
            pass
        told = len(acknowledged)
        self.log.info("goodbye_sent", peers=len(peers), acknowledged=told)
