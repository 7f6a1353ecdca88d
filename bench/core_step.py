"""CPU cost of one replication-core step on a 3-voter leader, without any shell around it.

Not a test: it asserts nothing. The replicator's loop steps the pure core once or more per write (Submit,
Persisted, one AppendAck per follower, heartbeat acks, Ticks); this times exactly that sequence so a change to
``node/core/replication/machine.py`` can be compared before and after on the same machine, without the
noise of HTTP, threads and sockets (``replication_profile.py`` measures the whole path).

    .venv/bin/python bench/core_step.py --writes 20000 --rounds 5

Each write is: Submit (one command, or ``--batch`` of them), Persisted (the pipelined leader's own log write ended), AppendAck from
each follower, and next_deadline after every step (the loop asks it once per idle round); every 50 ms of
simulated time a heartbeat round is answered (HeartbeatAck) and a Tick is stepped. Time is thread CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.core.replication import machine  # noqa: E402
from node.core.replication.messages import (  # noqa: E402
    AppendAck,
    HeartbeatAck,
    LogId,
    Persisted,
    Promise,
    Receive,
    Submit,
    Tick,
    ViewChanged,
)

ME, PEERS = "node-3", ("node-1", "node-2")
VIEW = {"node-1": 1, "node-2": 2, "node-3": 3}


def leader(options: machine.Options) -> tuple[machine.State, float]:
    """A writable 3-voter leader (the highest ID, so no handover), built through the core's own inputs."""
    state, _ = machine.bootstrap(ME, frozenset(VIEW), options)
    now = 0.0
    state, _ = machine.step(state, ViewChanged(VIEW), now)  # highest healthy voter: campaigns at once
    assert state.campaign is not None
    epoch = state.campaign.epoch
    for peer in PEERS:
        state, _ = machine.step(state, Receive(peer, Promise(epoch, LogId(0, 1)), state.hard.cluster), now)
    start = state.epoch_start
    state, _ = machine.step(state, Persisted(LogId(epoch, start)), now)
    for peer in PEERS:
        state, _ = machine.step(state, Receive(peer, AppendAck(epoch, start, 0), state.hard.cluster), now)
    assert state.writable, "the bench leader must be writable"
    return state, now


def run(writes: int, options: machine.Options, step_s: float, batch: int = 1) -> tuple[int, float]:
    """Steps ``writes`` Submits of ``batch`` commands each (many clients: the replicator batches their
    writes into one Submit); returns (steps, thread CPU seconds spent in step + next_deadline)."""
    state, now = leader(options)
    epoch, cluster = state.hard.epoch, state.hard.cluster
    step, deadline = machine.step, machine.next_deadline
    steps = 0
    payload = b"x" * 200
    next_heartbeat_s = now + options.heartbeat_s
    started = time.thread_time()
    for i in range(writes):
        now += step_s
        inputs: list[object] = [Submit(tuple((f"r{i}.{j}", payload) for j in range(batch)))]
        index = state.last.index + batch
        inputs.append(Persisted(LogId(epoch, index)))
        inputs.extend(Receive(peer, AppendAck(epoch, index, state.seq), cluster) for peer in PEERS)
        if now >= next_heartbeat_s:
            next_heartbeat_s = now + options.heartbeat_s
            inputs.append(Tick())
            inputs.extend(Receive(peer, HeartbeatAck(epoch, state.seq + 1), cluster) for peer in PEERS)
        for inp in inputs:
            state, ready = step(state, inp, now)
            deadline(state, now)
            steps += 1
    elapsed = time.thread_time() - started
    return steps, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=0.3, help="simulated time between writes")
    parser.add_argument("--batch", type=int, default=1, help="commands per Submit (32 clients: about 20-40)")
    args = parser.parse_args()
    options = machine.Options(pipelined=True)
    run(min(2000, args.writes), options, args.step_ms / 1000, args.batch)  # warm-up
    per_step_us = []
    for _ in range(args.rounds):
        steps, elapsed = run(args.writes, options, args.step_ms / 1000, args.batch)
        per_step_us.append(elapsed / steps * 1e6)
        print(
            f"{steps} steps in {elapsed:.3f} s: {steps / elapsed:,.0f} steps/s, {per_step_us[-1]:.2f} us/step"
        )
    best, median = min(per_step_us), statistics.median(per_step_us)
    print(f"best {best:.2f} us/step, median {median:.2f} us/step ({1e6 / median:,.0f} steps/s)")


if __name__ == "__main__":
    main()
