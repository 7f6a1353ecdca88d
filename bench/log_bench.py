"""Durable log figures: appends/s and fsyncs/s with 1 and 32 concurrent writers (group commit ratio).

Not a test: it asserts nothing and prints figures. Each writer loops ``await log.append_and_sync([entry])``
through :class:`node.storage.asynclog.AsyncLog` (one entry per call, each call answered only once durable),
as client writes would; the log coalesces whatever is waiting into one pwrite and one fdatasync.

    .venv/bin/python bench/log_bench.py [--seconds 3] [--payload-bytes 200] [--dir /path/on/the/real/disk]

``--dir`` should be on the disk that will hold DATA_DIR (the default temporary directory may be a tmpfs,
where fsync costs nothing). The numbers depend on that disk's fsync latency more than on anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.storage.asynclog import AsyncLog  # noqa: E402
from node.storage.log import DurableLog, LogEntry  # noqa: E402


async def phase(directory: Path, writers: int, seconds: float, payload: bytes, max_appends: int) -> dict:
    async with AsyncLog(lambda: DurableLog.open(directory)) as log:
        next_index = log.last[1] + 1
        epoch = log.last[0] or 1
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        done = 0

        async def writer() -> None:
            nonlocal next_index, done
            while time.perf_counter() < deadline and done < max_appends:
                index = next_index  # numbered on the loop, in submission order, as the Replicator does
                next_index += 1
                started = time.perf_counter()
                await log.append_and_sync([LogEntry(epoch, index, 1, payload)])
                latencies.append(time.perf_counter() - started)
                done += 1

        batches_before = log.stats["batches"]
        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        elapsed = time.perf_counter() - started
        fsyncs = await log.run(lambda dl: dl.stats["syncs"])
        batches = log.stats["batches"] - batches_before
    latencies.sort()
    return {
        "writers": writers,
        "appends_per_s": done / elapsed,
        "fsyncs_per_s": fsyncs / elapsed,
        "entries_per_fsync": done / max(fsyncs, 1),
        "batches": batches,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--max-appends", type=int, default=1_000_000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to create the log (default: a temp dir)"
    )
    args = parser.parse_args()
    payload = b"x" * args.payload_bytes
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"log in {tmp}, {args.payload_bytes}-byte payloads, {args.seconds:g} s per phase")
        print(
            f"{'writers':>7} {'appends/s':>10} {'fsyncs/s':>9} {'entries/fsync':>13} {'p50 ms':>7} {'p99 ms':>7}"
        )
        for writers in (1, 32):
            r = await phase(Path(tmp) / f"log-{writers}", writers, args.seconds, payload, args.max_appends)
            print(
                f"{r['writers']:>7} {r['appends_per_s']:>10.0f} {r['fsyncs_per_s']:>9.0f} "
                f"{r['entries_per_fsync']:>13.1f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
