from hypothesis import given, settings
from hypothesis import strategies as st

from node.core import election
from node.core import membership as m
from node.core.ids import Endpoint, InvalidAddress, node_id_from_ipv4
from tests.core.strategies import endpoints


def test_documented_example_ids():
    assert node_id_from_ipv4("10.0.2.3") == 515
    assert [node_id_from_ipv4(f"10.0.10.{d}") for d in (1, 2, 3)] == [2561, 2562, 2563]


def test_ipv6_gives_no_id():
    for bad in ("::1", "fe80::1", "not-an-ip", "10.0.0.256"):
        try:
            node_id_from_ipv4(bad)
        except InvalidAddress as exc:
            assert "IPv4" in str(exc)
        else:
            raise AssertionError(f"{bad} gave an ID")


def members_from(rows, self_index):
    members = [
        m.Member(ep.node_id, ep, healthy=healthy or i == self_index, is_self=i == self_index)
        for i, (ep, healthy) in enumerate(rows)
    ]
    members.sort(key=lambda x: (x.node_id, x.endpoint))
    return m.View(1, rows[self_index][0].node_id, tuple(members))


views = st.lists(st.tuples(endpoints, st.booleans()), min_size=1, max_size=8, unique_by=lambda r: r[0])


@settings(max_examples=500)
@given(views, st.data())
def test_leader_is_max_healthy_id(rows, data):
    view = members_from(rows, data.draw(st.integers(0, len(rows) - 1)))
    leader = election.elect(view)
    assert leader.healthy
    assert leader.node_id == max(x.node_id for x in view.members if x.healthy)


@settings(max_examples=300)
@given(views)
def test_same_view_same_leader_on_every_node(rows):
    # Every node sees the others' health the same way; each sees itself healthy. Make all healthy members
    # agree on health, then ask each healthy member who leads.
    healthy_rows = [(ep, True) for ep, h in rows if h] or [(rows[0][0], True)]
    leaders = {
        election.elect(members_from(healthy_rows, i)).endpoint for i in range(len(healthy_rows))
    }
    assert len(leaders) == 1


def test_id_ties_break_on_address_and_are_reported():
    a, b = Endpoint("10.1.2.3", 3000), Endpoint("10.9.2.3", 3000)
    view = members_from([(a, True), (b, True)], 0)
    decision, facts = election.step(None, view)
    assert decision.leader.endpoint == b
    assert election.NodeIdConflict(515, (str(a), str(b))) in facts


def test_step_reports_changes_once_and_counts_epochs():
    a, b = Endpoint("10.0.0.1", 3000), Endpoint("10.0.0.2", 3000)
    both = members_from([(a, True), (b, True)], 0)
    alone = members_from([(a, True), (b, False)], 0)
    d1, f1 = election.step(None, both)
    assert f1 == [
        election.LeaderElected(None, b.node_id, b.url, 1),
        election.RoleChanged(None, election.Role.FOLLOWER, 1),
    ]
    d2, f2 = election.step(d1, both)
    assert f2 == [] and d2.epoch == 1
    d3, f3 = election.step(d2, alone)
    assert f3 == [
        election.LeaderElected(b.node_id, a.node_id, a.url, 2),
        election.RoleChanged(election.Role.FOLLOWER, election.Role.LEADER, 2),
    ]
    assert d3.role is election.Role.LEADER


def test_ineligible_members_do_not_lead():
    a, b = Endpoint("10.0.0.1", 3000), Endpoint("10.0.0.2", 3000)
    view = m.View(
        1,
        a.node_id,
        (m.Member(a.node_id, a, True, is_self=True), m.Member(b.node_id, b, True, eligible=False)),
    )
    assert election.elect(view).endpoint == a
