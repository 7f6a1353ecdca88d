"""Two clusters that formed apart and one node without a cluster that hears both leaders.

Epochs and log indices are unique only within one cluster: both clusters below have an entry (epoch 1,
index 3), with different contents. Before clusters were named, a joiner that both leaders added as a learner
took entries from each in turn (the (epoch, index) of one matched the other's), so its log mixed two
histories and it then refused both for ever ("foreign history"). The rule now: a node without a cluster joins
the one of the first leader it hears, durably, and reads nothing from any other cluster afterwards.

Each trial interleaves the two leaders' messages at random (seeded): the joiner must end with one
cluster's log, a prefix of that leader's, and must never have answered the other leader.
"""

from __future__ import annotations

import heapq
import random

import pytest

from node.core.replication import machine
from node.core.replication.messages import (
    AppendAck,
    AppendReject,
    HeartbeatAck,
    Kind,
    Receive,
    Submit,
    Tick,
    ViewChanged,
)

TRIALS = 300
IDS = {"a": 1, "j": 2, "b": 3}


class TwoClusters:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, str, str, object, str]] = []
        self.counter = 0
        self.answered: dict[str, int] = {"a": 0, "b": 0}  # the joiner's answers to each leader
        self.states: dict[str, machine.State] = {}
        for name, cluster in (("a", "cluster-a"), ("b", "cluster-b")):
            state, _ = machine.bootstrap(name, frozenset({name}), cluster=cluster)
            self.states[name] = state
        self.states["j"] = machine.joiner("j")
        # Each leader sees the joiner; the joiner sees both.
        self.input("a", ViewChanged({"a": IDS["a"], "j": IDS["j"]}))
        self.input("b", ViewChanged({"b": IDS["b"], "j": IDS["j"]}))
        self.input("j", ViewChanged(dict(IDS)))

    def input(self, name: str, inp: object) -> None:
        state, ready = machine.step(self.states[name], inp, self.now)
        self.states[name] = state
        for send in ready.messages:
            if name == "j" and isinstance(send.message, AppendAck | AppendReject | HeartbeatAck):
                self.answered[send.to] += 1
            if send.to not in self.states:
                continue
            delay = self.rng.uniform(0.0005, 0.02)  # wide: the two leaders' messages interleave at random
            self.counter += 1
            heapq.heappush(
                self.queue, (self.now + delay, self.counter, name, send.to, send.message, send.cluster)
            )

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.005)):
            self.now = round(self.now + 0.005, 9)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dst, message, cluster = heapq.heappop(self.queue)
                self.input(dst, Receive(src, message, cluster))
            for name in self.states:
                self.input(name, Tick())
            if self.now < 0.5 and self.rng.random() < 0.2:
                leader = self.rng.choice("ab")
                payload = f"{leader}-{self.counter}".encode()
                self.input(leader, Submit(((f"r{self.counter}", payload),)))


def commands(state: machine.State) -> list[bytes]:
    return [e.payload for e in state.log if e.kind is Kind.COMMAND]


@pytest.mark.parametrize("chunk", range(3))
def test_a_node_heard_by_two_clusters_takes_one_history_and_answers_only_its_leader(chunk):
    joined = {"cluster-a": 0, "cluster-b": 0}
    for seed in range(chunk * TRIALS // 3, (chunk + 1) * TRIALS // 3):
        sim = TwoClusters(seed)
        sim.run(1.5)
        j = sim.states["j"]
        cluster = j.hard.cluster
        assert cluster in joined, f"seed {seed}: the joiner joined {cluster!r}"
        joined[cluster] += 1
        mine, other = ("a", "b") if cluster == "cluster-a" else ("b", "a")
        member = sim.states[mine]
        # One cluster's history: the joiner and the other member of its cluster agree entry for entry on
        # their common prefix (either may lead now: the joiner may have the higher ID), and the joiner
        # holds none of the other cluster's writes.
        common = min(len(j.log), len(member.log))
        assert j.last.index > 0, f"seed {seed}: the joiner holds nothing"
        assert list(j.log[:common]) == list(member.log[:common]), f"seed {seed}: the joiner's log is mixed"
        assert not any(p.startswith(f"{other}-".encode()) for p in commands(j)), f"seed {seed}"
        # The other cluster never counted the joiner as holding any of its entries.
        progress = sim.states[other].progress.get("j")
        assert progress is None or progress.match == 0, f"seed {seed}: {other} counts the joiner as its own"
        assert sim.states[other].role == machine.LEADER, f"seed {seed}: the other cluster lost its leader"
    assert all(joined.values()), f"every trial joined the same cluster: {joined}"
