"""What the replication wire costs in CPU per operation: encode and decode of typical batches, and the frame
MAC, in microseconds of this thread's CPU time (``time.thread_time``).

Not a test: it asserts nothing. It exists to compare the codec of two checkouts on the same machine (run it
from each with its own virtualenv); the figures of ``replication_profile.py`` say what a whole node costs
per write, these say which part of it is the wire format.

    .venv/bin/python bench/codec_bench.py
    .venv/bin/python bench/codec_bench.py --base /work/main/node/replication/codec.py --rounds 9

Batches, as a leader sends them under load: one Append carrying 1 or 32 COMMAND entries (each an INSERT of
a 100-byte row, as ``cluster_bench`` writes), sent to two followers ("x2 peers": the same entries encoded
for each, as the transport does); and what a follower answers: 1 or 32 AppendAcks. Every figure is the
lowest of ``--rounds`` rounds of ``--seconds`` each (other processes on a shared machine only ever add to a
round). ``--base`` loads another checkout's ``codec.py`` into the same process and runs its rounds in turn
with this one's, so both see the same machine; the table then shows both and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.core import peerauth  # noqa: E402
from node.core.replication import messages as msg  # noqa: E402
from node.core.sqlreq import Statement, WriteCommand  # noqa: E402
from node.replication import codec  # noqa: E402
from node.storage.statemachine import Command  # noqa: E402

SENDER, ADDRESS, CLUSTER = "4f1c2a9e-identity-of-the-leader", "127.0.9.2:4001", "log1-" + "c" * 32


def command_payload(n: int) -> bytes:
    write = WriteCommand(
        (Statement("INSERT INTO bench (client, n, payload) VALUES (?, ?, ?)", (n % 32, n, "x" * 100)),),
        False, 1_764_000_000_000_000_000 + n, 0x5EED + n,
    )  # fmt: skip
    return codec.encode_command(Command(write, client="bench", request_id=f"req-{n}"))


def append(entries: int, first: int = 1000) -> msg.Append:
    batch = tuple(
        msg.Entry(7, first + i, msg.Kind.COMMAND, command_payload(first + i)) for i in range(entries)
    )
    return msg.Append(7, msg.LogId(7, first - 1), batch, first - 1, 42)


def acks(count: int) -> list[msg.Message]:
    return [msg.AppendAck(7, 1000 + i, 42 + i) for i in range(count)]


def encoder(codec: Any) -> Callable[[list[msg.Message]], bytes]:
    """encode_batch as the transport calls it: with its entry cache when that codec has one."""
    if "cache" in inspect.signature(codec.encode_batch).parameters:
        cache = codec.EntryCache()
        return lambda m: codec.encode_batch(SENDER, ADDRESS, m, CLUSTER, cache=cache)
    return lambda m: codec.encode_batch(SENDER, ADDRESS, m, CLUSTER)


def one_round_us(fn: Callable[[], object], seconds: float) -> float:
    ops, start = 0, time.thread_time()
    deadline = start + seconds
    while True:
        for _ in range(16):
            fn()
        ops += 16
        now = time.thread_time()
        if now >= deadline or ops >= 10_000_000:
            return (now - start) / ops * 1e6


def load_codec(path: Path) -> Any:
    """Another checkout's codec.py as a module of its own (it imports this checkout's node.core and
    node.storage, which its codec only reads)."""
    spec = importlib.util.spec_from_file_location("base_codec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_codec"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def cases(codec: Any) -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    mac = codec.FrameMac(peerauth.derive_key("s" * 32), ADDRESS, 1, 1)
    for n in (1, 32):
        # A fresh encoder per case: each case starts with an empty cache, as a new entry would.
        encode = encoder(codec)
        messages: list[msg.Message] = [append(n)]
        body = encode(messages)
        out[f"encode Append {n:>2} entries, x2 peers"] = lambda e=encode, m=messages: (e(m), e(m))
        # New entries every time, made beforehand (a cache can only help from the second peer on): more
        # entries than any cache holds, used in turn.
        pool = [[append(n, first=1000 + 64 * i)] for i in range(max(64, 16384 // n))]
        turn = itertools.cycle(pool)

        def fresh(e: Callable = encode, turn: Iterator = turn) -> tuple[bytes, bytes]:
            m = next(turn)
            return e(m), e(m)

        out[f"encode Append {n:>2} new entries, x2 peers"] = fresh
        out[f"decode Append {n:>2} entries"] = lambda b=body: codec.decode_batch(b)
        frame = codec.encode_frame(mac, 5, body)
        out[f"frame+MAC Append {n:>2} entries"] = lambda b=body: codec.encode_frame(mac, 5, b)
        out[f"verify frame Append {n:>2} entries"] = lambda f=frame: codec.decode_frame(mac, 5, f)
        ack_messages = acks(n)
        ack_body = encoder(codec)(ack_messages)
        encode_acks = encoder(codec)
        out[f"encode {n:>2} AppendAck"] = lambda e=encode_acks, m=ack_messages: e(m)
        out[f"decode {n:>2} AppendAck"] = lambda b=ack_body: codec.decode_batch(b)
    payload = command_payload(1)
    out["decode_command (one INSERT)"] = lambda: codec.decode_command(payload)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.2, help="CPU seconds per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--base", type=Path, help="another checkout's node/replication/codec.py to compare")
    args = parser.parse_args()
    mine = cases(codec)
    base = cases(load_codec(args.base)) if args.base else {}
    print(
        f"{'us/op (lowest of rounds)':<40} {'this':>9}" + (f" {'base':>9} {'this/base':>9}" if base else "")
    )
    for name, fn in mine.items():
        if args.only not in name:
            continue
        figures: dict[str, list[float]] = {"this": [], "base": []}
        for _ in range(args.rounds):
            figures["this"].append(one_round_us(fn, args.seconds))
            if base:
                figures["base"].append(one_round_us(base[name], args.seconds))
        this = min(figures["this"])
        line = f"{name:<40} {this:9.2f}"
        if base:
            line += f" {min(figures['base']):9.2f} {this / min(figures['base']):9.2f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
