"""CPU per replicated write on the wire alone: a leader's ReplicationTransport sends Appends over its streams
to two followers' stream endpoints (``ReplicationRoutes``), all in this one process and event loop, and the
process's CPU time (``time.process_time``) is divided by the Appends delivered.

Not a test: it asserts nothing. ``replication_profile.py`` measures whole nodes, where the wire is a small
part and a shared machine's noise hides it; this isolates it: encode (per peer), frame and MAC, the
websocket write and read, verify and decode. The followers' replicator is a stand-in that only counts.

    .venv/bin/python bench/wire_bench.py
    .venv/bin/python bench/wire_bench.py --writes 3000 --rounds 5

Modes: ``1 in flight`` sends the next Append once both followers received the last (one client);
``32 in flight`` keeps 32 Appends of 1 entry each queued (many clients, the transport batches them);
``32 entries`` sends Appends of 32 entries one at a time. Every figure is the lowest of ``--rounds``.
Runs the code of the checkout it is started from (its ``node`` package, by the current directory).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from aiohttp import web  # noqa: E402

from bench.codec_bench import command_payload  # noqa: E402
from node.core.ids import Endpoint  # noqa: E402
from node.core.replication import messages as msg  # noqa: E402
from node.http.replication import ReplicationRoutes  # noqa: E402
from node.replication.transport import ReplicationTransport  # noqa: E402
from node.runtime import logging as nodelog  # noqa: E402

SECRET = "b" * 32


class Follower:
    """The replicator behind a stream endpoint, reduced to counting what arrives."""

    is_member = True
    cluster_facts = None

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.appends = 0
        self.arrived = asyncio.Event()

    def receive(self, sender: str, address: Endpoint, messages: list, cluster: str = "") -> None:
        self.appends += sum(1 for m in messages if isinstance(m, msg.Append))
        self.arrived.set()


async def start_follower(ip: str, identity: str) -> tuple[web.AppRunner, Follower, Endpoint]:
    follower = Follower(identity)
    app = web.Application()
    ReplicationRoutes(
        replicator=follower, secret=SECRET, log=nodelog.get_logger(), body_read_timeout_s=5
    ).add_to(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, ip, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, follower, Endpoint.parse(f"{ip}:{port}")


async def until(followers: list[Follower], count: int) -> None:
    for _ in range(1_000_000):  # bounded: each pass waits for a delivery
        if all(f.appends >= count for f in followers):
            return
        slow = min(followers, key=lambda f: f.appends)
        slow.arrived.clear()
        await asyncio.wait_for(slow.arrived.wait(), 10)
    raise RuntimeError("deliveries never completed")


async def measure(mode: str, writes: int, rounds: int) -> float:
    followers_up = [await start_follower("127.0.0.1", f"follower-{i}") for i in range(2)]
    followers = [f for _, f, _ in followers_up]
    peers = [e for _, _, e in followers_up]
    transport = ReplicationTransport(
        secret=SECRET, me=Endpoint.parse("127.0.0.1:1"), identity="leader", timeout_s=5.0,
        learn=lambda *a: None, log=nodelog.get_logger(),
    )  # fmt: skip
    transport.begin(1)
    runner = asyncio.ensure_future(transport.run())
    index = 0
    per_entry = 32 if mode == "32 entries" else 1
    payloads = [command_payload(n) for n in range(64)]  # made beforehand: only the wire is measured
    in_flight = 32 if mode == "32 in flight" else 1

    async def send(n: int) -> None:
        nonlocal index
        for _ in range(n):
            entries = tuple(
                msg.Entry(1, index + i + 1, msg.Kind.COMMAND, payloads[(index + i) % 64])
                for i in range(per_entry)
            )
            for peer in peers:
                transport.send(peer, msg.Append(1, msg.LogId(1, index), entries, index, index), "bench")
            index += per_entry

    async def run(count: int) -> None:
        base = followers[0].appends
        done = 0
        while done < count:
            await send(min(in_flight, count - done))
            done += min(in_flight, count - done)
            await until(followers, base + done if in_flight == 1 else base + done - in_flight + 1)
        await until(followers, base + count)

    try:
        await run(200)  # streams open, warm
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            await run(writes)
            best = min(best, (time.process_time() - start) / writes * 1e6)
        return best
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        for r, _, _ in followers_up:
            await r.cleanup()


async def amain(args: argparse.Namespace) -> None:
    print(
        f"{Path.cwd()}: us of CPU per Append delivered to 2 followers (sender + receivers, lowest of rounds)"
    )
    for mode in ("1 in flight", "32 in flight", "32 entries"):
        writes = args.writes if mode != "32 entries" else max(50, args.writes // 16)
        print(f"  {mode:<14} {await measure(mode, writes, args.rounds):8.1f} us", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
