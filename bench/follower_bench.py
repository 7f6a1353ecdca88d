"""What a follower's CPU costs per replicated entry, from a received frame to the decoded command.

Not a test: it asserts nothing and prints figures. One received stream frame carrying an Append of
``--entries`` COMMAND entries (each a single-row INSERT, as ``codec_bench`` builds them) goes through what
a follower does with it, in process:

* ``frame+batch``: verify the frame MAC, read the batch (``decode_frame`` + ``decode_batch``);
* ``log``: the entries as log entries (``to_log_entry``), appended to a DurableLog and synced (in a
  directory under ``--dir``, /dev/shm by default: a tmpfs, so the figure is CPU, not the disk);
* ``command``: each entry's command decoded for apply (``decode_command``);
* ``asynclog``: the same appends through an AsyncLog (its thread hand-off and settling included), with
  ``--writers`` appends in flight, in process CPU time (both threads) per entry.

Figures are microseconds of CPU per entry, the lowest of ``--rounds`` rounds. To compare two checkouts,
run it alternately from each (``PYTHONPATH=<checkout> python bench/follower_bench.py``): the script imports
``node`` from the first checkout on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))

from bench.codec_bench import ADDRESS, CLUSTER, SENDER, command_payload  # noqa: E402 - the same traffic
from node.core.replication import messages as msg  # noqa: E402
from node.replication import codec  # noqa: E402
from node.storage.asynclog import AsyncLog  # noqa: E402
from node.storage.log import DurableLog  # noqa: E402


class Frames:
    """Consecutive frames of one stream, each an Append of ``entries`` entries following the previous."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.mac = codec.FrameMac(b"k" * 32, ADDRESS, 1, 1)
        self.payloads = [command_payload(n) for n in range(64)]
        self.seq = 0
        self.index = 0

    def next(self) -> tuple[int, bytes]:
        first = self.index + 1
        batch = tuple(
            msg.Entry(7, first + i, msg.Kind.COMMAND, self.payloads[(first + i) % 64])
            for i in range(self.entries)
        )
        self.index += self.entries
        self.seq += 1
        body = codec.encode_batch(
            SENDER, ADDRESS, [msg.Append(7, msg.LogId(7, first - 1), batch, 0, 42)], CLUSTER
        )
        return self.seq, codec.encode_frame(self.mac, self.seq, body)


def log_entries(entries: tuple[msg.Entry, ...]) -> list:
    """As the Replicator converts what it appends (``to_log_entries`` where the checkout has it)."""
    convert = getattr(codec, "to_log_entries", None)
    return convert(entries) if convert is not None else [codec.to_log_entry(e) for e in entries]


def receive(mac: codec.FrameMac, seq: int, frame: bytes) -> tuple[msg.Entry, ...]:
    (append,) = codec.decode_batch(codec.decode_frame(mac, seq, frame)).messages
    assert isinstance(append, msg.Append)
    return append.entries


def timed(fn: Callable[[], None], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def sync_round(directory: Path, frames: int, entries: int) -> dict[str, float]:
    source = Frames(entries)
    made = [source.next() for _ in range(frames)]
    clock = time.thread_time
    log = DurableLog.open(directory)
    try:
        received: list[tuple[msg.Entry, ...]] = []
        logged: list[list] = []

        def read() -> None:
            for seq, frame in made:
                received.append(receive(source.mac, seq, frame))

        def append() -> None:
            for got in received:
                entries_ = log_entries(got)
                log.append_groups([entries_])
                log.sync()
                logged.append(entries_)

        def command() -> None:
            for got in received:
                for e in got:
                    codec.decode_command(e.payload)

        n = frames * entries
        return {
            "frame+batch": timed(read, clock) / n * 1e6,
            "log": timed(append, clock) / n * 1e6,
            "command": timed(command, clock) / n * 1e6,
        }
    finally:
        log.close()


async def async_round(directory: Path, frames: int, entries: int, writers: int) -> float:
    source = Frames(entries)
    groups = []
    for _ in range(frames):
        seq, frame = source.next()
        groups.append(log_entries(receive(source.mac, seq, frame)))
    async with AsyncLog(lambda: DurableLog.open(directory)) as alog:
        queue = iter(groups)
        start = time.process_time()

        async def writer() -> None:
            for group in queue:
                await alog.append_and_sync_future(group)

        await asyncio.gather(*(writer() for _ in range(writers)))
        return (time.process_time() - start) / (frames * entries) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--entries", type=int, default=8)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        directory = Path(tempfile.mkdtemp(prefix="follower-bench-", dir=args.dir))
        try:
            figures = sync_round(directory / "a", args.frames, args.entries)
            figures["asynclog"] = asyncio.run(
                async_round(directory / "b", args.frames, args.entries, args.writers)
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        figures["total"] = figures["frame+batch"] + figures["log"] + figures["command"]
        for k, v in figures.items():
            best[k] = min(best.get(k, v), v)
    print(" ".join(f"{k}={v:.2f}" for k, v in best.items()), "us CPU per entry")


if __name__ == "__main__":
    main()
