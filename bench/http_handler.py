"""CPU of the node's own HTTP code per write, without sockets: a mocked request through the application's
middleware, forwarding layer and /db/execute handler, with a data service that answers at once.

Not a test: it asserts only that the answer is a 200, and prints the best of several rounds of thread CPU
time per write. ``bench/http_layer.py`` measures a whole server process over TCP, where aiohttp's own
protocol work and the machine's noise dominate; this isolates the part the node's code decides, so a
change to it can be compared on a busy machine (run the two checkouts alternately).

    .venv/bin/python bench/http_handler.py [--rounds 4] [--writes 1000]

It drives ``Application._handle`` (aiohttp's internal entry point for a routed request) directly.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aiohttp import streams  # noqa: E402
from aiohttp.test_utils import make_mocked_request  # noqa: E402

from node import auth  # noqa: E402
from node.core.ids import Endpoint  # noqa: E402
from node.http.db import DbRoutes  # noqa: E402
from node.http.replication import ForwardingMiddleware  # noqa: E402
from node.http.server import HttpApi  # noqa: E402
from node.replication.service import ANSWERED_EPOCH  # noqa: E402
from node.runtime import logging as nodelog  # noqa: E402
from node.runtime.mailbox import LatestCell  # noqa: E402
from node.service import WriteOutcome  # noqa: E402
from node.storage.results import StatementResult  # noqa: E402

SECRET = "b" * 32
# cluster_bench's write: one INSERT of a ~100-byte row.
BODY = b'[["INSERT INTO bench(client, n, payload) VALUES(?, ?, ?)", 3, 17, "' + b"x" * 100 + b'"]]'


class Service:
    database = None

    async def submit(self, write, client):  # noqa: ANN001, ANN202 - the DataService protocol
        ANSWERED_EPOCH.set(3)
        return WriteOutcome((StatementResult(rows_affected=1, last_insert_id=7),), 3, 42)


class Replicator:
    def leader_endpoint(self) -> Endpoint | None:
        return None  # this node leads: the forwarding layer lets the write through


class Protocol:
    """What a request and its body stream ask of the connection: nothing that costs (a Mock would)."""

    _reading_paused = False
    transport = None
    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 4001)

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass

    def pause_reading(self) -> None:
        pass


async def measure(rounds: int, writes: int) -> float:
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    DbRoutes(
        service=Service(), jwt_secret=SECRET, decisions=LatestCell(), max_body_bytes=1 << 20,
        max_load_bytes=1 << 30, max_statements=1000, body_read_timeout_s=10,
    ).add_to(api.app)  # fmt: skip
    forwarding = ForwardingMiddleware(
        replicator=Replicator(), me=Endpoint("127.0.0.1", 4001), jwt_secret=SECRET, max_body_bytes=1 << 20,
        body_read_timeout_s=10,
    )  # fmt: skip
    api.route_through(forwarding.handle)  # as node.replication.wiring does
    api.app.freeze()
    token = auth.mint_jwt(SECRET, auth.Role.WRITE, now=time.time(), ttl_s=3600)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Content-Length": str(len(BODY)),
    }
    protocol = Protocol()
    loop = asyncio.get_running_loop()

    def request():  # noqa: ANN202
        payload = streams.StreamReader(protocol, 1 << 16, loop=loop)
        payload.feed_data(BODY)
        payload.feed_eof()
        return make_mocked_request(
            "POST", "/db/execute", headers=headers, app=api.app, payload=payload, protocol=protocol
        )

    best = float("inf")
    for _ in range(rounds):  # bounded
        requests = [request() for _ in range(writes)]  # built outside the timed part
        started = time.thread_time()
        for req in requests:
            response = await api.app._handle(req)
        elapsed = time.thread_time() - started
        if response.status != 200:
            raise SystemExit(f"unexpected answer {response.status}: {response.text}")
        best = min(best, elapsed / writes * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--writes", type=int, default=1000)
    args = parser.parse_args()
    best = asyncio.run(measure(args.rounds, args.writes))
    print(f"node HTTP code: {best:.1f} us CPU per write (best of {args.rounds} rounds of {args.writes})")


if __name__ == "__main__":
    main()
