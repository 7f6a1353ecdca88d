"""Snapshot transfer figures: MB/s of one download over loopback, per rate limit, and the event loop's lag.

Not a test: it asserts nothing and prints figures. The sender is the node's own HTTP stack (``HttpApi`` with
``ReplicationRoutes``) and the receiver :func:`node.replication.snapshot_transfer.download`, both in this one
process and on one event loop (the worst case for heartbeats: the loop does both sides' work). A ticker
task wakes every 10 ms meanwhile and reports its largest lateness, which is what a heartbeat on that loop
would suffer.

    .venv/bin/python bench/snapshot_transfer.py [--mb 200] [--rates 268435456,0] [--dir /path/on/disk]

``--dir`` should be on the disk that will hold DATA_DIR (a tmpfs makes reads and writes free).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from node.core import peerauth  # noqa: E402
from node.http.replication import ReplicationRoutes  # noqa: E402
from node.http.server import HttpApi  # noqa: E402
from node.replication import snapshot_transfer as transfer  # noqa: E402
from node.storage.snapshots import SnapshotMeta, snapshot_stem  # noqa: E402

SECRET = "b" * 32


class QuietLog:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def make_file(directory: Path, size_bytes: int) -> tuple[Path, SnapshotMeta]:
    stem = snapshot_stem(1000, 1)
    path = directory / f"{stem}.db"
    digest = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    with open(path, "wb") as fh:
        left = size_bytes
        while left:
            piece = block[: min(len(block), left)]
            fh.write(piece)
            digest.update(piece)
            left -= len(piece)
    meta = SnapshotMeta("bench", 1, 1000, b"{}", digest.hexdigest(), size_bytes, "bench")
    return path, meta


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(10_000_000):
        if stop.is_set():
            return
        due = loop.time() + 0.01
        await asyncio.sleep(0.01)
        lags.append(loop.time() - due)


async def one(path: Path, meta: SnapshotMeta, rate_bytes_s: int, part: Path) -> None:
    # One bucket per node: here the sender and the receiver are two nodes in one process.
    send_limiter, receive_limiter = transfer.RateLimiter(rate_bytes_s), transfer.RateLimiter(rate_bytes_s)
    api = HttpApi(host="127.0.0.1", port=0, log=QuietLog())
    routes = ReplicationRoutes(
        replicator=None, secret=SECRET, log=QuietLog(), body_read_timeout_s=10,
        snapshot_resolve={meta.stem: (path, meta)}.get, snapshot_rate=send_limiter,
    )  # fmt: skip
    routes.add_to(api.app)
    runner = web.AppRunner(api.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    signer = peerauth.Signer(peerauth.derive_key(SECRET), "127.0.0.1:1", 1)
    await asyncio.to_thread(part.unlink, missing_ok=True)
    stop = asyncio.Event()
    lags: list[float] = []
    tick = asyncio.create_task(ticker(stop, lags))
    try:
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            await transfer.download(
                session, transfer.snapshot_url(f"http://127.0.0.1:{port}", meta.stem), meta, part,
                sign_headers=transfer.peer_headers(signer), log=QuietLog(), rate=receive_limiter,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await tick
        await runner.cleanup()
    assert (await asyncio.to_thread(part.stat)).st_size == meta.size_bytes
    mb = meta.size_bytes / 1e6
    lags.sort()
    p99 = lags[int(len(lags) * 0.99)] if lags else 0.0
    label = "unlimited" if rate_bytes_s == 0 else f"{rate_bytes_s / (1 << 20):g} MiB/s"
    print(
        f"rate limit {label:>12}: {mb:.0f} MB in {elapsed:.2f} s = {mb / elapsed:.0f} MB/s "
        f"({meta.size_bytes / elapsed / (1 << 20):.0f} MiB/s); 10 ms ticker lag p99 {p99 * 1000:.1f} ms, "
        f"max {max(lags, default=0) * 1000:.1f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rates", default=f"{transfer.DEFAULT_RATE_BYTES_S},0")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        path, meta = await asyncio.to_thread(make_file, directory, args.mb * 1_000_000)
        for rate in (int(r) for r in args.rates.split(",")):
            await one(path, meta, rate, directory / "incoming.part")


if __name__ == "__main__":
    asyncio.run(main())
