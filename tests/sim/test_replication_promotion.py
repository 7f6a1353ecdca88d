"""Liveness around a promotion: a learner promoted to voter by a CONFIG entry that only some members hold.

A configuration takes effect when appended, so until the promotion is committed (and every member has it)
the members disagree on whether the new node is a voter. The ones holding the entry defer to it when it
has the highest ID; the ones without it must still be able to promise to it, or nobody ever leads. The
simulation checks safety after every step; ``settle_and_check_liveness`` then restarts every node, heals
every link and expects one writable leader that commits, with every log converged.
"""

from tests.sim.test_replication_random import settle_and_check_liveness
from tests.support.repsim import RepSim

NAMES = ["node-1", "node-2", "node-3", "node-4"]


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
    assert all("node-4" not in sim.nodes[n].durable.hard.configs[-1][1].voters for n in ("node-1", "node-2"))
    settle_and_check_liveness(sim)
    assert sim.writable() == ["node-4"]  # the highest-ID voter leads, its promotion committed everywhere
