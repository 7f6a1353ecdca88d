"""CPU the HTTP layer alone spends per write: the node's HttpApi, DbRoutes and forwarding middleware in front
of a data service that answers at once, on a leader and on a follower that forwards to it.

Not a test: it asserts nothing and prints figures. The cluster benchmarks measure the whole write (commit,
fsync, replication); this isolates the part the HTTP code decides, so that a change to it can be measured
on a busy machine (CPU time of the server process per request, not wall-clock throughput). ``--bare``
adds a plain aiohttp handler on the same load: the floor no node code can go below.

    .venv/bin/python bench/http_layer.py [--seconds 4] [--clients 32] [--bare]

Every process started is killed at the end; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node import auth  # noqa: E402

SECRET = "b" * 32
BODY = b'[["INSERT INTO t(v) VALUES(?)", "hello world"]]'
START_WAIT_S = 20.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve(port: int, leader_port: int | None, bare: bool, fast: bool) -> None:
    """The server process: what a node's HTTP layer does for a write, with the data service faked."""
    from aiohttp import web

    from node.core.ids import Endpoint
    from node.http.db import DbRoutes, ExecuteFastRoute
    from node.http.replication import ForwardingMiddleware
    from node.http.server import HttpApi
    from node.replication.service import ANSWERED_EPOCH
    from node.runtime import logging as nodelog
    from node.runtime.mailbox import LatestCell
    from node.service import WriteOutcome
    from node.storage.results import StatementResult

    if bare:

        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=b'{"results":[{"rows_affected":1}]}', content_type="application/json")

        app = web.Application()
        app.router.add_post("/db/execute", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    class Service:
        database = None

        async def submit(self, write, client):  # noqa: ANN001, ANN202 - the DataService protocol
            await asyncio.sleep(0)
            ANSWERED_EPOCH.set(3)
            return WriteOutcome((StatementResult(rows_affected=1, last_insert_id=7),), 3, 42)

    class Replicator:
        def leader_endpoint(self) -> Endpoint | None:
            return None if leader_port is None else Endpoint("127.0.0.1", leader_port)

    api = HttpApi(host="127.0.0.1", port=port, log=nodelog.get_logger())
    routes = DbRoutes(
        service=Service(), jwt_secret=SECRET, decisions=LatestCell(), max_body_bytes=1 << 20,
        max_load_bytes=1 << 30, max_statements=1000, body_read_timeout_s=10,
    )  # fmt: skip
    routes.add_to(api.app)
    forwarding = ForwardingMiddleware(
        replicator=Replicator(), me=Endpoint("127.0.0.1", port), jwt_secret=SECRET, max_body_bytes=1 << 20,
        body_read_timeout_s=10,
    )  # fmt: skip
    api.route_through(forwarding.handle)  # as node.replication.wiring does
    if fast:
        api.fast_path(forwarding.fast_route(ExecuteFastRoute(routes)))  # as node.supervisor does
    await api.start()
    await asyncio.Event().wait()


async def load(port: int, pid: int, seconds: float, clients: int) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) for closed-loop writers on ``port``."""
    token = auth.mint_jwt(SECRET, auth.Role.WRITE, now=time.time(), ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/db/execute"
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        deadline = time.monotonic() + START_WAIT_S
        while True:  # bounded by START_WAIT_S
            try:
                async with session.post(url, data=BODY, headers=headers) as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server on port {port} did not answer within {START_WAIT_S:g} s")
            await asyncio.sleep(0.1)

        async def writer(until: float) -> None:
            nonlocal done
            while time.monotonic() < until:
                async with session.post(url, data=BODY, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"unexpected status {resp.status}")
                done += 1

        await asyncio.gather(*(writer(time.monotonic() + 1.0) for _ in range(clients)))  # warm-up
        done = 0
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(writer(t0 + seconds) for _ in range(clients)))
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
    return done / elapsed, cpu / max(1, done) * 1e6


def spawn(
    port: int, leader_port: int | None = None, bare: bool = False, fast: bool = True
) -> subprocess.Popen:
    args = [sys.executable, __file__, "--serve", str(port)]
    if leader_port is not None:
        args += ["--leader-port", str(leader_port)]
    if bare:
        args.append("--bare")
    if not fast:
        args.append("--no-fast")
    env = {**os.environ, "LOG_LEVEL": "warning"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--port", type=int, default=18470)
    parser.add_argument("--bare", action="store_true", help="also measure a plain aiohttp handler")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-fast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--leader-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.leader_port, args.bare, not args.no_fast))
        return
    leader_port, follower_port, slow_port, bare_port = (args.port + i for i in range(4))
    procs = [spawn(leader_port), spawn(follower_port, leader_port), spawn(slow_port, fast=False)]
    if args.bare:
        procs.append(spawn(bare_port, bare=True))
    try:
        phases = [
            ("leader", leader_port, procs[0]),
            ("follower (forwards)", follower_port, procs[1]),
            ("leader, no fast path", slow_port, procs[2]),
        ]
        if args.bare:
            phases.append(("bare aiohttp", bare_port, procs[3]))
        for name, port, proc in phases:
            rate, us = asyncio.run(load(port, proc.pid, args.seconds, args.clients))
            print(f"{name:20s} {args.clients:3d} clients: {rate:7.0f} req/s  server CPU {us:6.0f} us/request")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
