"""Single-node data API figures: writes/s and reads/s with 1 and 32 concurrent clients, p50/p99 latency.

Not a test: it asserts nothing and prints figures. By default it starts its own node (a cluster of one on
127.0.0.77, DATA_DIR in a temporary directory); ``--url`` points it at a running node instead (then set
JWT_SECRET to that node's secret).

    .venv/bin/python bench/db_bench.py [--seconds 3] [--url http://127.0.0.1:3000]

Each phase runs for ``--seconds`` or ``--max-requests`` requests, whichever ends first. A write is one
``INSERT`` via ``POST /db/execute`` (committed and fsynced before the answer); a read is one primary-key
``SELECT`` via ``GET /db/query``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node import auth  # noqa: E402

BENCH_SECRET = "bench-secret-bench-secret-bench-secret-0123"


async def phase(session, url, headers, kind: str, clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    issued = 0

    async def client(n: int) -> None:
        nonlocal issued, errors
        i = 0
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            i += 1
            started = time.perf_counter()
            if kind == "write":
                body = [["INSERT INTO bench(client, n, payload) VALUES(?, ?, ?)", n, i, "x" * 100]]
                request = session.post(f"{url}/db/execute", json=body, headers=headers)
            else:
                params = {"q": f"SELECT * FROM bench WHERE id = {1 + (n * 7919 + i) % 1000}"}
                request = session.get(f"{url}/db/query", params=params, headers=headers)
            async with request as resp:
                payload = await resp.json()
                if resp.status != 200 or "error" in payload["results"][0]:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "kind": kind,
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def start_node(data_dir: str) -> tuple[subprocess.Popen, str]:
    host = "127.0.0.77"
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "HOST": host,
        "ADVERTISE_ADDRESS": host,
        "PORT": str(port),
        "JWT_SECRET": BENCH_SECRET,
        "DATA_DIR": data_dir,
        "SERVICE_NAME": "bench.invalid",
        "DNS_SERVERS": "127.0.0.1:9",
        "LOG_LEVEL": "error",
    }
    process = subprocess.Popen([sys.executable, "-m", "node"], env=env, stdout=subprocess.DEVNULL)
    return process, f"http://{host}:{port}"


async def wait_ready(session, url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("node not ready within 20 s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running node (default: start one)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase")
    parser.add_argument("--max-requests", type=int, default=200_000, help="cap on requests per phase")
    args = parser.parse_args()
    process = None
    tmp = tempfile.TemporaryDirectory(prefix="db-bench-")
    secret = os.environ.get("JWT_SECRET", BENCH_SECRET) if args.url else BENCH_SECRET
    url = args.url
    if url is None:
        process, url = start_node(tmp.name)
    token = auth.mint_jwt(secret, auth.Role.WRITE, now=time.time(), ttl_s=3600, subject="bench")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, url)
            setup = [
                "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, client INTEGER, n INTEGER, payload TEXT)"
            ]
            async with session.post(f"{url}/db/execute", json=setup, headers=headers) as resp:
                resp.raise_for_status()
            rows = [
                ["INSERT INTO bench(client, n, payload) VALUES(?, ?, ?)", -1, i, "seed"] for i in range(1000)
            ]
            async with session.post(f"{url}/db/execute?transaction", json=rows, headers=headers) as resp:
                resp.raise_for_status()
            print(f"data API benchmark against {url}, {args.seconds:g} s per phase")
            print(
                f"{'operation':<8} {'clients':>7} {'requests':>9} {'errors':>6} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8}"
            )
            figures = {}
            for kind in ("write", "read"):
                for clients in (1, 32):
                    r = await phase(session, url, headers, kind, clients, args.seconds, args.max_requests)
                    figures[(kind, clients)] = r
                    print(
                        f"{kind:<8} {clients:>7} {r['requests']:>9} {r['errors']:>6} {r['per_s']:>9.0f} "
                        f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
                    )
            for kind in ("write", "read"):
                ratio = figures[(kind, 32)]["per_s"] / figures[(kind, 1)]["per_s"]
                print(f"{kind}s/s with 32 clients / with 1 client: {ratio:.2f}")
            ratio = figures[("read", 1)]["per_s"] / figures[("write", 1)]["per_s"]
            print(f"reads/s / writes/s with 1 client: {ratio:.2f}")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
