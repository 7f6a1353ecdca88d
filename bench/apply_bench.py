"""CPU per applied log entry on the writer thread: the state machine's cost of one replicated write.

Not a test: it asserts nothing and prints figures. Every node (leader and followers) applies every committed
entry, so this cost is paid three times per write in a 3-node cluster.

    /tmp/benchenv/bin/python bench/apply_bench.py [--batches 40] [--entries 32] [--rounds 5]
    /tmp/benchenv/bin/python bench/apply_bench.py --trees /work/main .     # alternate two checkouts

It opens a Database in a temporary directory (as tests/storage do), then applies ``--batches`` batches of
``--entries`` entries through ``Database.apply_entries`` (the Replicator's path), each entry holding one
command. Variants: ``insert1`` (one INSERT), ``insert3`` (three INSERTs in one command), ``reqid`` (one
INSERT with a request ID). The figure is the writer thread's CPU time (``time.thread_time``) around
``_apply_entries`` divided by the entries applied, so the event loop's share is not in it. With ``--trees``
each round runs every tree in a child process of its own (PYTHONPATH set to the tree), alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("insert1", "insert3", "reqid")


def _child(batches: int, entries: int, variant: str) -> float:
    from node.core import sqlreq as q
    from node.storage import statemachine as sm
    from node.storage.sqlite import Database, Limits

    version_holder: list[str] = []

    def command(n: int) -> sm.Command:
        count = 3 if variant == "insert3" else 1
        statements = tuple(
            q.Statement(
                "INSERT INTO bench(client, n, payload) VALUES(?, ?, ?)", (n % 32, n * 3 + k, "x" * 100)
            )
            for k in range(count)
        )
        write = q.stamp_write(
            q.DbRequest(statements, q.Flags()), time_ns=1_700_000_000_000_000_000 + n, seed=n
        )
        rid = f"r{n}" if variant == "reqid" else None
        return sm.Command(write, client="c" if rid else "", request_id=rid, sqlite_version=version_holder[0])

    async def main() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            database = Database(Path(tmp), limits=Limits(), queue_size=64)
            await database.open()
            version_holder.append(database.sqlite_version)
            try:
                schema = q.stamp_write(
                    q.DbRequest(
                        (q.Statement("CREATE TABLE bench (id INTEGER PRIMARY KEY, client, n, payload)"),),
                        q.Flags(),
                    ),
                    time_ns=1,
                    seed=1,
                )
                await database.apply_entries([sm.Entry(1, (sm.Command(schema),))])
                index = 1
                spent = 0.0

                def timed(job, batch):
                    started = time.thread_time()
                    database._apply_entries(job, batch)
                    return time.thread_time() - started

                warm = 5
                for b in range(batches + warm):
                    batch = []
                    for _ in range(entries):
                        index += 1
                        batch.append(sm.Entry(index, (command(index),)))
                    took = await database._write(timed, tuple(batch))
                    if b >= warm:
                        spent += took
                return spent / (batches * entries) * 1e6
            finally:
                await database.close()

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--entries", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--trees", nargs="*", default=[])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.child is not None:
        print(json.dumps(_child(args.batches, args.entries, args.child)))
        return
    trees = [str(Path(t).resolve()) for t in args.trees] or [str(Path(__file__).resolve().parents[1])]
    figures: dict[tuple[str, str], list[float]] = {(t, v): [] for t in trees for v in variants}
    for round_no in range(args.rounds):
        for variant in variants:
            for tree in trees if round_no % 2 == 0 else list(reversed(trees)):
                env = dict(os.environ, PYTHONPATH=tree)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--batches", str(args.batches),
                     "--entries", str(args.entries)],
                    env=env, cwd=tree, check=True, capture_output=True, text=True,
                )  # fmt: skip
                figures[(tree, variant)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"writer CPU us per entry ({args.batches} batches x {args.entries} entries, {args.rounds} rounds)")
    for variant in variants:
        for tree in trees:
            values = figures[(tree, variant)]
            print(
                f"  {variant:8} {tree:30} median {statistics.median(values):7.1f}  min {min(values):7.1f}  "
                f"all {' '.join(f'{v:.1f}' for v in values)}"
            )


if __name__ == "__main__":
    main()
