"""Catch-up of a follower whose divergent (uncommitted) suffix reaches below the leader's in-memory window.

The leader probes back one Append at a time until the logs match; entries below its window are read from
disk (ReadLog), one batch ending at the window. The simulation checks safety after every step; these
tests check that the follower converges.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core.replication import machine
from node.core.replication.messages import Append
from tests.support.repsim import RepSim

ALL = {"node-1": 1, "node-2": 2, "node-3": 3}


def diverged(seed: int, divergent: int, behind: int, options: machine.Options, pipelined: bool) -> RepSim:
    """node-3 leads and appends ``divergent`` entries that reach nobody (its Appends are cut; the views,
    fixed, still show everyone healthy, so it accepts them within its lease); then it is cut off both ways.
    node-2 leads node-1 and commits ``behind`` entries, then restarts (so everything it had is on disk, below
    its in-memory window) and leads again, now heard by node-3: still alive, with a suffix that diverges
    where node-2's first epoch began, node-3 answers the new leader's first Append with a reject."""
    sim = RepSim(3, seed=seed, options=options, pipelined=pipelined)
    for name in ALL:
        sim.set_view(name, ALL)
    assert sim.leader() == "node-3"
    sim.run(0.1)
    sim.cut("node-3", "node-1")
    sim.cut("node-3", "node-2")
    for i in range(divergent):
        sim.submit("node-3", f"lost{i}".encode())
    sim.run(0.02)
    sim.isolate("node-3")
    two = {"node-1": 1, "node-2": 2}
    for name in two:
        sim.set_view(name, two)
    assert sim.run_until(lambda: sim.state("node-2").writable, 5), sim.describe()
    for i in range(behind):
        sim.submit("node-2", f"kept{i}".encode())
        sim.tick()
    assert sim.run_until(lambda: sim.state("node-1").commit == sim.state("node-2").last.index, 3)
    sim.crash("node-2")
    sim.restart("node-2")
    sim.set_view("node-2", two)
    sim.heal()  # before node-2 leads again, so that its first Append reaches node-3
    assert sim.run_until(lambda: sim.state("node-2").writable, 5), sim.describe()
    for name in ALL:
        sim.set_view(name, ALL)
    return sim


def caught_up(sim: RepSim) -> bool:
    logs = {tuple(sim.nodes[n].durable.log) for n in ALL}
    return len(logs) == 1 and len(sim.writable()) == 1


def test_a_divergent_suffix_below_the_leaders_window_is_probed_down_to_the_match():
    """Regression (found by the pipelined random schedules): the leader sent the disk batch and, in the
    same step, the in-memory batch above it. The follower rejected the upper one with its last index as
    hint, which moved the probe back up every round: it never got below the divergence and the follower
    (the handover target) never caught up."""
    options = machine.Options(keep_applied=4, max_batch_entries=64)
    sim = diverged(seed=1, divergent=12, behind=20, options=options, pipelined=True)
    assert sim.state("node-2").base.index > sim.state("node-1").commit - 20  # the window moved past it
    assert sim.run_until(lambda: caught_up(sim), 5), sim.describe()
    assert not any(b"lost" in p for p in sim.applied_commands("node-3"))


def test_a_probing_leader_has_one_append_in_flight():
    """The rule itself: whenever the leader sends node-3 entries while probing, nothing else is in flight
    to it (the answer to the one before came back, or it was given up on)."""
    sim = diverged(seed=2, divergent=12, behind=20, options=machine.Options(keep_applied=4), pipelined=False)
    sends: list[tuple[bool, int]] = []
    original = sim._send

    def watch(src, dst, message):
        if src == "node-2" and dst == "node-3" and isinstance(message, Append) and message.entries:
            progress = sim.state("node-2").progress.get("node-3")
            if progress is not None:
                sends.append((progress.probing, progress.inflight))
        original(src, dst, message)

    sim._send = watch
    assert sim.run_until(lambda: caught_up(sim), 5), sim.describe()
    probing = [inflight for was_probing, inflight in sends if was_probing]
    assert probing, sends  # the schedule did probe
    assert max(probing) <= 1, sends


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**16),
    divergent=st.integers(1, 40),
    behind=st.integers(1, 60),
    keep_applied=st.integers(1, 16),
    batch=st.integers(1, 16),
    inflight=st.integers(1, 8),
    pipelined=st.booleans(),
)
def test_any_divergent_suffix_converges(seed, divergent, behind, keep_applied, batch, inflight, pipelined):
    """The whole class: divergent suffixes of any length against any amount of newer history, small memory
    windows, batches and in-flight windows, on both shells: the old leader's log ends equal to the new
    leader's, without its lost entries, within a few seconds."""
    options = machine.Options(keep_applied=keep_applied, max_batch_entries=batch, max_inflight=inflight)
    sim = diverged(seed, divergent, behind, options, pipelined)
    assert sim.run_until(lambda: caught_up(sim), 8), sim.describe()
    assert not any(b"lost" in p for p in sim.applied_commands("node-3"))
