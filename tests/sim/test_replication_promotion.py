"""Liveness around a promotion: a learner promoted to voter by a CONFIG entry that only some members hold.

A configuration takes effect when appended, so until the promotion is committed (and every member has it)
the members disagree on whether the new node is a voter. The ones holding the entry defer to it when it
has the highest ID; the ones without it must still be able to promise to it, or nobody ever leads. The
simulation checks safety after every step; ``settle_and_check_liveness`` then restarts every node, heals
every link and expects one writable leader that commits, with every log converged.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core.replication.messages import Config, Kind
from tests.sim.test_replication_random import settle_and_check_liveness
from tests.support.repsim import RepSim

NAMES = ["node-1", "node-2", "node-3", "node-4"]


def durable_voters(sim: RepSim, name: str) -> frozenset[str]:
    """The voters of the newest CONFIG entry in the node's durable log: its configuration after a restart
    (the hard state may be ahead of a log write that a crash lost; ``restore`` goes by the log)."""
    last = next(e for e in reversed(sim.nodes[name].durable.log) if e.kind is Kind.CONFIG)
    return Config.decode(last.payload).voters


def test_a_promoted_joiner_leads_after_the_voters_without_its_promotion_restart():
    """Regression (found by the generated pipelined schedules): node-3 promoted node-4 (entry 4, a CONFIG
    only node-3 and node-4 hold) and node-1/node-2 crashed before they had it. After the restart node-4
    campaigned for ever: node-1/node-2 saw a learner and refused it, node-3 deferred to node-4 as the
    highest-ID voter of its configuration, and nobody led."""
    sim = RepSim(3, joiners=1, seed=0, drop=0.02, duplicate=0.02, pipelined=True)
    sim.heal()
    sim.run(0.05)
    sim.crash("node-1")
    sim.crash("node-2")
    sim.run(0.2)
    sim.restart("node-1")
    sim.crash("node-1")
    sim.run(0.01)
    promoted = {n for n in ("node-3", "node-4") if "node-4" in sim.state(n).config.voters}
    assert promoted == {"node-3", "node-4"}, sim.describe()  # the situation the regression is about
    assert all("node-4" not in durable_voters(sim, n) for n in ("node-1", "node-2"))
    settle_and_check_liveness(sim)
    assert sim.writable() == ["node-4"]  # the highest-ID voter leads, its promotion committed everywhere
    # ... at once, by the promises of node-1/node-2 (machine._Step.may_lead), not by the end of deference
    assert not [f for n in sim.nodes.values() for _, f, _ in n.facts if f == "deference_expired"]


def test_a_voter_that_lacks_its_own_promotion_is_not_waited_for_ever():
    """Regression (found by the generated schedules below: seed 44, pipelined): node-3 promoted node-4,
    node-1 and node-3 wrote the entry, node-4 (and node-2) had not when the crashes came. After the restart
    node-1 and node-3 deferred to node-4, the highest-ID voter of their configuration; node-2 deferred to
    node-3; node-4, a learner in its own log, never campaigned. Nobody led. Now node-3, next in rank,
    stops deferring, leads, brings node-4 its promotion and hands over to it."""
    sim = RepSim(3, joiners=1, seed=44, pipelined=True)
    assert sim.run_until(lambda: "node-4" in sim.state("node-3").config.voters, 5)
    sim.tick()
    for name in ("node-2", "node-3", "node-4"):
        sim.crash(name)
    assert "node-4" not in durable_voters(sim, "node-4")  # a learner for itself
    assert "node-4" in durable_voters(sim, "node-3")
    settle_and_check_liveness(sim)
    assert sim.writable() == ["node-4"]
    expired = [
        (n, d["deferred_to"])
        for n, node in sim.nodes.items()
        for _, f, d in node.facts
        if f == "deference_expired"
    ]
    assert expired == [("node-3", "node-4")]


def newest_config_index(sim: RepSim) -> int:
    return max(sim.state(n).hard.configs[-1][0] for n in sim.alive())


def lacking_newest_config(sim: RepSim) -> list[str]:
    """Live voters of the first configuration (not the joiner) whose log lacks the newest CONFIG entry
    any live node holds."""
    newest = newest_config_index(sim)
    return [n for n in sim.alive() if n != "node-4" and sim.state(n).hard.configs[-1][0] < newest]


ACTIONS = st.one_of(
    st.tuples(st.just("crash"), st.sampled_from(NAMES)),
    st.tuples(st.just("restart"), st.sampled_from(NAMES)),
    st.tuples(st.just("crash_lacking"), st.just("")),
    st.tuples(st.just("crash_holding"), st.just("")),
    st.tuples(st.just("run"), st.sampled_from(["0.005", "0.01", "0.05", "0.2", "0.6"])),
)


def run_schedule(sim: RepSim, actions: list[tuple[str, str]]) -> None:
    for action, arg in actions:
        if action == "crash" and sim.nodes[arg].alive:
            sim.crash(arg)
        elif action == "restart" and not sim.nodes[arg].alive:
            sim.restart(arg)
        elif action == "crash_lacking" and sim.alive():
            for name in lacking_newest_config(sim):
                sim.crash(name)
        elif action == "crash_holding" and sim.alive():
            # The other side: crash the nodes that hold the newest entry, except one.
            newest = newest_config_index(sim)
            holding = [n for n in sim.alive() if sim.state(n).hard.configs[-1][0] == newest]
            for name in holding[1:]:
                sim.crash(name)
        elif action == "run":
            sim.run(float(arg))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**16),
    pipelined=st.booleans(),
    lossy=st.booleans(),
    warmup_ticks=st.integers(0, 6),
    actions=st.lists(ACTIONS, min_size=1, max_size=12),
)
def test_generated_crashes_around_a_promotion_leave_a_leader(seed, pipelined, lossy, warmup_ticks, actions):
    """The whole class: 3 voters and a joiner that becomes a learner and is promoted; the schedule starts a
    generated number of ticks after the promotion is proposed (so it may have reached anything from one
    node to all of them) and then crashes and restarts nodes, in particular the ones whose log lacks the
    newest configuration (or all but one of those that hold it), with runs of 5 ms to 0.6 s between. Once
    every node is back, one leader must be writable and every log converge."""
    loss = 0.05 if lossy else 0.0
    sim = RepSim(3, joiners=1, seed=seed, drop=loss, duplicate=loss, pipelined=pipelined)

    def promotion_proposed() -> bool:
        return any("node-4" in sim.state(n).config.voters for n in sim.alive())

    assert sim.run_until(promotion_proposed, 5), sim.describe()
    for _ in range(warmup_ticks):
        sim.tick()
    run_schedule(sim, actions)
    settle_and_check_liveness(sim)
