"""What another client's ``SELECT 1`` waits while a runaway read and a runaway write run; and the node's peak
RSS while it loads a large SQL dump through /db/load.

Not a test: it asserts nothing and prints figures. It starts its own node (a cluster of one on 127.0.0.78,
DATA_DIR in a temporary directory, default settings).

    .venv/bin/python bench/db_starvation.py [--dump-mib 250] [--probes 20]

Phases:

1. client A sends one /db/query of twelve ``WITH RECURSIVE ... SELECT count(*)`` statements (never ends by
   itself; the read time limit, DB_STATEMENT_TIMEOUT, stops it) four times at once; meanwhile client B
   sends ``SELECT 1`` repeatedly and its latencies are printed;
2. client A sends a write that inserts from an endless recursive CTE (stopped by DB_WRITE_STEP_BUDGET);
   meanwhile client B's ``SELECT 1`` and a one-row ``INSERT`` from client C are timed;
3. an SQL dump of ``--dump-mib`` MiB is generated on disk and POSTed to /db/load from the file (streamed);
   the node's peak RSS (VmHWM from /proc) before and after is printed.
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

SECRET = "bench-secret-bench-secret-bench-secret-0123"
RUNAWAY = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r"
RUNAWAY_WRITE = "INSERT INTO t(v) SELECT n FROM (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT n FROM r)"


def headers(role: auth.Role, subject: str) -> dict[str, str]:
    return {
        "Authorization": "Bearer " + auth.mint_jwt(SECRET, role, now=time.time(), ttl_s=3600, subject=subject)
    }


def start_node(data_dir: str) -> tuple[subprocess.Popen, str]:
    host = "127.0.0.78"
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "HOST": host,
        "ADVERTISE_ADDRESS": host,
        "PORT": str(port),
        "JWT_SECRET": SECRET,
        "DATA_DIR": data_dir,
        "SERVICE_NAME": "bench.invalid",
        "DNS_SERVERS": "127.0.0.1:9",
        "LOG_LEVEL": "error",
    }
    process = subprocess.Popen([sys.executable, "-m", "node"], env=env, stdout=subprocess.DEVNULL)
    return process, f"http://{host}:{port}"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_ready(session, url: str) -> None:
    for _ in range(400):
        try:
            async with session.get(f"{url}/readyz?noleader") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("node not ready within 20 s")


async def probe(session, url: str, hdrs, count: int, stop: asyncio.Event) -> list[float]:
    waits = []
    for _ in range(count):
        if stop.is_set():
            break
        started = time.perf_counter()
        async with session.get(f"{url}/db/query", params={"q": "SELECT 1"}, headers=hdrs) as resp:
            await resp.read()
        waits.append(time.perf_counter() - started)
        await asyncio.sleep(0.1)
    return waits


def show(label: str, waits: list[float]) -> None:
    if not waits:
        print(f"{label}: no samples")
        return
    print(
        f"{label}: n={len(waits)} median {1000 * statistics.median(waits):.1f} ms, "
        f"max {1000 * max(waits):.1f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-mib", type=int, default=250)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="db-starve-")
    process, url = start_node(os.path.join(tmp.name, "data"))
    a, b, c = headers(auth.Role.ADMIN, "a"), headers(auth.Role.READ, "b"), headers(auth.Role.WRITE, "c")
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_ready(session, url)
            async with session.post(f"{url}/db/execute", json=["CREATE TABLE t (v)"], headers=a) as resp:
                resp.raise_for_status()
            quiet = await probe(session, url, b, args.probes, asyncio.Event())
            show("SELECT 1 from client B, idle node", quiet)

            stop = asyncio.Event()

            async def runaway_read() -> None:
                async with session.post(f"{url}/db/query", json=[RUNAWAY] * 12, headers=a) as resp:
                    await resp.read()

            started = time.perf_counter()
            readers = [asyncio.create_task(runaway_read()) for _ in range(4)]
            waits = await probe(session, url, b, args.probes, stop)
            await asyncio.gather(*readers)
            print(
                f"4 runaway read requests (12 recursive CTEs each) from A took {time.perf_counter() - started:.1f} s"
            )
            show("SELECT 1 from client B during them", waits)

            async def runaway_write() -> float:
                began = time.perf_counter()
                async with session.post(f"{url}/db/execute", json=[RUNAWAY_WRITE], headers=a) as resp:
                    body = await resp.json()
                print(f"runaway write answered: {body['results'][0]}")
                return time.perf_counter() - began

            writer = asyncio.create_task(runaway_write())
            await asyncio.sleep(0.2)
            waits = await probe(session, url, b, 5, stop)
            began = time.perf_counter()
            async with session.post(
                f"{url}/db/execute", json=["INSERT INTO t VALUES (1)"], headers=c
            ) as resp:
                await resp.read()
            insert_wait = time.perf_counter() - began
            took = await writer
            print(f"runaway write (stopped by the step budget) took {took:.2f} s")
            show("SELECT 1 from client B during it", waits)
            print(f"a one-row INSERT from client C queued behind it waited {insert_wait * 1000:.0f} ms")

            dump = Path(tmp.name) / "dump.sql"
            row = "INSERT INTO big VALUES({i}, '" + "x" * 200 + "');\n"
            with open(dump, "w") as f:  # noqa: ASYNC230 - a bench, nothing else runs on its loop
                f.write(
                    "PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\nCREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT);\n"
                )
                i = 0
                while f.tell() < args.dump_mib << 20:
                    f.write(row.format(i=i))
                    i += 1
                f.write("COMMIT;\n")
            size_mib = dump.stat().st_size / (1 << 20)
            before = peak_rss_mib(process.pid)
            began = time.perf_counter()
            with open(dump, "rb") as body:  # noqa: ASYNC230 - aiohttp streams the file
                async with session.post(f"{url}/db/load", data=body, headers=a) as resp:
                    answer = await resp.text()
            took = time.perf_counter() - began
            print(
                f"/db/load of a {size_mib:.0f} MiB dump ({i} rows): {resp.status} {answer[:120]} in {took:.1f} s"
            )
            print(
                f"node peak RSS: {before:.0f} MiB before the load, {peak_rss_mib(process.pid):.0f} MiB after"
            )
    finally:
        process.terminate()
        process.wait(timeout=10)
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
