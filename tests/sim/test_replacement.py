"""A node that loses its data (a wiped or quarantined DATA_DIR) comes back at the same address under a new
identity. The leader removes the old identity at once, so each such loss costs one voter for a moment,
never the quorum: after two of them in a row the cluster is still writable (before, the second loss left
four voters with two gone, and no majority could ever reap them)."""

from node.core.replication import machine
from tests.support.repsim import RepSim


def members(sim: RepSim, name: str) -> tuple[frozenset[str], frozenset[str]]:
    cfg = sim.state(name).config
    return cfg.voters, cfg.learners


def lose_data(sim: RepSim, name: str, new_name: str) -> None:
    """``name`` crashes and comes back empty, under ``new_name``, at the same node ID."""
    node_id = sim.ids[name]
    sim.crash(name)
    sim.add_joiner(new_name, node_id)
    sim.update_views()


def test_two_nodes_losing_their_data_one_after_the_other_never_cost_the_quorum():
    sim = RepSim(3, seed=21)
    assert sim.leader() == "node-3"
    lose_data(sim, "node-1", "node-1b")
    assert sim.run_until(lambda: members(sim, "node-3")[0] == {"node-1b", "node-2", "node-3"}, 10), (
        sim.describe()
    )
    lose_data(sim, "node-2", "node-2b")
    assert sim.run_until(lambda: members(sim, "node-3")[0] == {"node-1b", "node-2b", "node-3"}, 10), (
        sim.describe()
    )
    reply = sim.submit(sim.leader(), b"still writable")
    assert sim.run_until(lambda: sim.write_committed(reply), 5)
    reasons = [f["reason"] for _, e, f in sim.nodes["node-3"].facts if e == "config_proposed"]
    assert "member node-1 replaced by node-1b at node ID 1" in reasons
    assert "member node-2 replaced by node-2b at node ID 2" in reasons


def test_a_member_that_answers_is_never_replaced():
    """The control: a voter still answering (within the lease) keeps its place even if another identity
    shows up at its node ID (two processes cannot share an address; this is a confused view, not a loss)."""
    sim = RepSim(3, seed=22)
    sim.leader()
    sim.add_joiner("impostor", 1)  # same node ID as node-1, which keeps running
    sim.update_views()
    sim.run(2.0)
    assert "node-1" in members(sim, "node-3")[0]


def test_without_replacement_two_losses_in_a_row_leave_no_quorum(monkeypatch):
    """What the rule prevents, shown by turning it off."""
    monkeypatch.setattr(machine._Step, "replaced_by", lambda self, member: None)
    sim = RepSim(3, seed=21)
    sim.leader()
    lose_data(sim, "node-1", "node-1b")
    assert sim.run_until(lambda: "node-1b" in members(sim, "node-3")[0], 10), sim.describe()
    lose_data(sim, "node-2", "node-2b")
    sim.run(5.0)
    assert sim.writable() == []  # four voters, two of them gone: no majority, and none to reap them
