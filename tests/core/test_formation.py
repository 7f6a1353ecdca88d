"""The pure formation and merge rules (node.core.replication.formation).

Besides examples, two simulations over the rules alone, with generated inputs:

* formation: N empty nodes that see each other when their windows end form exactly one cluster, whatever
  their IDs and the order in which they decide;
* merge: any set of clusters without data, seeing each other, ends as one cluster led by the highest ID;
  a cluster with data never moves, and two with data end in a conflict on both sides.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.replication import formation as f
from node.core.replication.formation import Action, Me, Peer


def member_peer(node_id: int, leader: str, leader_id: int, data: bool = False) -> Peer:
    return Peer(node_id, True, f"id{node_id}", True, leader, leader_id, data)


def test_an_empty_node_waits_within_the_window_then_the_highest_bootstraps():
    peers = [Peer(2, identity="b", member=False), Peer(3, identity="c", member=False)]
    assert f.decide_empty(5, peers, window_over=False).action is Action.WAIT
    assert f.decide_empty(5, peers, window_over=True).action is Action.BOOTSTRAP
    assert f.decide_empty(1, peers, window_over=True).action is Action.JOIN


def test_an_empty_node_joins_a_cluster_it_sees_even_if_it_has_the_highest_id():
    peers = [Peer(2, identity="b", member=True, leader="b", leader_id=2)]
    assert f.decide_empty(9, peers, window_over=False).action is Action.JOIN


def test_unhealthy_peers_neither_block_bootstrap_nor_count_as_a_cluster():
    peers = [Peer(9, healthy=False, identity="z", member=True)]
    assert f.decide_empty(5, peers, window_over=True).action is Action.BOOTSTRAP
    assert not f.settled(peers)


def test_a_peer_of_this_cluster_is_not_foreign_even_before_this_node_has_its_config_entry():
    me = Me(1, "a", True, leader="c", leader_id=3, config=frozenset({"a", "c"}))
    newly_added = member_peer(2, "c", 3)  # same leader: the same cluster
    assert not f.is_foreign(me, newly_added)
    assert f.is_foreign(me, member_peer(7, "x", 7))
    assert not f.is_foreign(me, Peer(7, identity="x", member=False))  # a joiner is anyone's to add


def test_data_meets_data_is_a_conflict_and_nobody_moves():
    me = Me(9, "a", True, data=True, leader="a", leader_id=9, config=frozenset({"a"}))
    d = f.decide_member(me, [member_peer(3, "x", 3, data=True)])
    assert d.action is Action.CONFLICT and d.other_leader == "x"


def test_the_cluster_without_data_dissolves_into_the_one_with_data_whatever_the_ids():
    me = Me(9, "a", True, data=False, leader="a", leader_id=9, config=frozenset({"a"}))
    assert f.decide_member(me, [member_peer(3, "x", 3, data=True)]).action is Action.DISSOLVE
    me_data = Me(3, "x", True, data=True, leader="x", leader_id=3, config=frozenset({"x"}))
    assert f.decide_member(me_data, [member_peer(9, "a", 9)]).action is Action.STAY


def test_without_data_the_lower_leader_dissolves():
    low = Me(3, "x", True, leader="x", leader_id=3, config=frozenset({"x"}))
    high = Me(9, "a", True, leader="a", leader_id=9, config=frozenset({"a"}))
    assert f.decide_member(low, [member_peer(9, "a", 9)]).action is Action.DISSOLVE
    assert f.decide_member(high, [member_peer(3, "x", 3)]).action is Action.STAY


def test_a_leaderless_member_ranks_by_its_own_id():
    orphan = Me(2, "o", True, leader=None, config=frozenset({"o", "x"}))
    assert f.decide_member(orphan, [member_peer(9, "a", 9)]).action is Action.DISSOLVE
    assert f.decide_member(orphan, [member_peer(1, "a", 1)]).action is Action.STAY


# --- simulations over the rules -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(1, 254), min_size=1, max_size=7, unique=True),
    order=st.randoms(use_true_random=False),
)
def test_empty_nodes_that_see_each_other_form_exactly_one_cluster_in_any_order(ids, order):
    """Nodes decide one at a time in a random order (later deciders see earlier decisions)."""
    leader_of: dict[int, int | None] = {i: None for i in ids}  # node -> leader it joined (or itself)
    pending = list(ids)
    order.shuffle(pending)
    for _round in range(len(ids) + 1):  # each round every undecided node re-decides (bounded)
        for node in list(pending):
            peers = [
                Peer(
                    o, True, f"id{o}", leader_of[o] is not None,
                    None if leader_of[o] is None else f"id{leader_of[o]}", leader_of[o] or 0,
                )
                for o in ids
                if o != node
            ]  # fmt: skip
            d = f.decide_empty(node, peers, window_over=True)
            if d.action is Action.BOOTSTRAP:
                leader_of[node] = node
                pending.remove(node)
            elif d.action is Action.JOIN and any(p.member for p in peers):
                leader_of[node] = next(p.leader_id for p in peers if p.member)
                pending.remove(node)
        if not pending:
            break
    assert not pending
    assert len({v for v in leader_of.values()}) == 1
    assert sum(1 for n, v in leader_of.items() if v == n) == 1


cluster_sets = st.lists(
    st.tuples(st.lists(st.integers(1, 254), min_size=1, max_size=3), st.booleans()), min_size=1, max_size=4
)


@settings(max_examples=300, deadline=None)
@given(clusters=cluster_sets, order=st.randoms(use_true_random=False))
def test_clusters_seeing_each_other_merge_by_the_leader_rule_and_data_never_moves(clusters, order):
    """Each cluster: its members (IDs unique across clusters) and whether it holds data. Nodes re-decide
    in random order; a DISSOLVEd node becomes empty and joins the cluster it dissolved into."""
    used: set[int] = set()
    cl: dict[int, tuple[frozenset[int], bool]] = {}  # leader id -> (members, data)
    for members, data in clusters:
        ms = frozenset(m for m in members if m not in used)
        if not ms:
            continue
        used |= ms
        cl[max(ms)] = (ms, data)
    with_data = [lead for lead, (_, d) in cl.items() if d]
    node_leader = {n: lead for lead, (ms, _) in cl.items() for n in ms}
    conflicts: set[int] = set()
    for _round in range(20):
        nodes = sorted(node_leader)
        order.shuffle(nodes)
        changed = False
        for n in nodes:
            lead = node_leader[n]
            ms, data = cl[lead]
            me = Me(n, f"id{n}", True, data, f"id{lead}", lead, frozenset(f"id{m}" for m in ms))
            peers = [
                member_peer(o, f"id{node_leader[o]}", node_leader[o], cl[node_leader[o]][1])
                for o in node_leader
                if o != n
            ]
            d = f.decide_member(me, peers)
            if d.action is Action.CONFLICT:
                conflicts.add(n)
                assert data
            elif d.action is Action.DISSOLVE:
                assert not data
                target = d.other_leader_id
                cl[lead] = (ms - {n}, data)
                node_leader[n] = target
                cl[target] = (cl[target][0] | {n}, cl[target][1])
                changed = True
        if not changed:
            break
    leaders = {lead for lead in node_leader.values()}
    if len(with_data) <= 1:
        assert len(leaders) == 1
        assert not conflicts
        if with_data:
            assert leaders == set(with_data)  # the data's cluster absorbed the rest
        else:
            assert leaders == {max(node_leader)}  # the highest ID leads
    else:
        assert leaders == set(with_data)  # every data cluster kept, every empty one merged into one
        assert conflicts == {n for n, lead in node_leader.items()}


def test_only_the_winning_cluster_recruits_a_joiner():
    low = Me(3, "x", True, leader="x", leader_id=3, config=frozenset({"x"}))
    high = Me(9, "a", True, leader="a", leader_id=9, config=frozenset({"a"}))
    joiner = Peer(2, identity="j", member=False)
    assert f.may_recruit(high, [member_peer(3, "x", 3), joiner])
    assert not f.may_recruit(low, [member_peer(9, "a", 9), joiner])
    data_low = Me(3, "x", True, data=True, leader="x", leader_id=3, config=frozenset({"x"}))
    assert f.may_recruit(data_low, [member_peer(9, "a", 9)])
    assert not f.may_recruit(high, [member_peer(3, "x", 3, data=True)])


@settings(max_examples=300, deadline=None)
@given(
    clusters=st.lists(
        st.tuples(st.integers(1, 254), st.booleans(), st.booleans()),
        min_size=1,
        max_size=5,
        unique_by=lambda t: t[0],
    )
)
def test_at_most_one_cluster_in_sight_recruits(clusters):
    """Among clusters that all see each other (leader ID, holds data, leader known), at most one may add a
    joiner, so no joiner is ever claimed by two leaders; and if every leader is known, exactly one may."""
    mes = [
        Me(
            lid,
            f"id{lid}",
            True,
            data,
            f"id{lid}" if known else None,
            lid if known else 0,
            frozenset({f"id{lid}"}),
        )
        for lid, data, known in clusters
    ]
    peers_of = {
        me.identity: [
            member_peer(o.node_id, o.leader or o.identity, o.leader_id or o.node_id, o.data)
            for o in mes
            if o is not me
        ]
        for me in mes
    }
    recruiting = [me for me in mes if f.may_recruit(me, peers_of[me.identity])]
    assert len(recruiting) <= 1
    if all(me.leader is not None for me in mes):
        assert len(recruiting) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    raw=json_values
    | st.fixed_dictionaries(
        {"leader": json_values, "leader_id": json_values, "data": json_values},
        optional={"name": json_values},
    )
)
def test_a_peers_cluster_facts_are_validated_never_trusted(raw):
    """Whatever a peer answers as ``cluster``, the transport hands on well-typed facts or nothing."""
    from node.replication import codec
    from node.replication.transport import _cluster_of

    facts = _cluster_of(raw)
    if facts is not None:
        leader, leader_id, data, name = facts
        assert isinstance(name, str) and len(name) <= codec.MAX_IDENTITY_CHARS
        assert leader is None or (isinstance(leader, str) and 0 < len(leader) <= codec.MAX_IDENTITY_CHARS)
        assert type(leader_id) is int and 0 <= leader_id < 1 << 63
        assert data is True or data is False


def test_well_formed_cluster_facts_pass():
    from node.replication.transport import _cluster_of

    assert _cluster_of({"leader": "abc", "leader_id": 7, "data": True}) == ("abc", 7, True, "")
    assert _cluster_of({"leader": None, "leader_id": 0, "data": "yes"}) == (None, 0, False, "")
    assert _cluster_of({"leader": "a", "leader_id": 1, "data": False, "name": "c1"}) == ("a", 1, False, "c1")
    assert _cluster_of({"leader": "a", "leader_id": 1, "name": 5}) is None
    assert _cluster_of({"leader": "", "leader_id": 1}) is None
    assert _cluster_of({"leader": "a", "leader_id": True}) is None


def test_named_clusters_are_told_apart_by_name_even_when_one_added_the_others_nodes_as_learners():
    """Regression: cluster B (node 3, alone) added nodes 2 and 4 as learners before they joined cluster A
    (led by 4). By the configuration rule they were B's own, so B saw no other cluster and never dissolved;
    nodes 2 and 4 refused B's messages (another cluster's) and the cluster never became one."""
    b = Me(3, "n3", True, leader="n3", leader_id=3, config=frozenset({"n3", "n2", "n4"}), cluster="B")
    a_leader = Peer(4, True, "n4", True, "n4", 4, cluster="A")
    a_member = Peer(2, True, "n2", True, "n4", 4, cluster="A")
    assert f.is_foreign(b, a_leader) and f.is_foreign(b, a_member)
    decision = f.decide_member(b, [a_leader, a_member])
    assert decision.action is Action.DISSOLVE and decision.other_leader == "n4"
    # The same cluster by name is never foreign, whatever the configuration says.
    a = Me(4, "n4", True, leader="n4", leader_id=4, config=frozenset({"n4"}), cluster="A")
    assert not f.is_foreign(a, a_member)
    assert f.is_foreign(a, Peer(3, True, "n3", True, "n3", 3, cluster="B"))
    assert (
        f.decide_member(a, [a_member, Peer(3, True, "n3", True, "n3", 3, cluster="B")]).action is Action.STAY
    )
    # Data is counted by name too: a lagging member of A with data elsewhere in A never dissolves.
    lagging = Me(2, "n2", True, leader="n4", leader_id=4, config=frozenset({"n2"}), cluster="A")
    with_data = Peer(4, True, "n4", True, "n4", 4, data=True, cluster="A")
    assert (
        f.decide_member(lagging, [with_data, Peer(9, True, "x", True, "x", 9, cluster="C")]).action
        is Action.STAY
    )


def test_a_lagging_follower_of_a_cluster_with_data_never_dissolves():
    """Regression: its own log has no COMMAND yet, but its leader's has: the cluster holds data."""
    follower = Me(2, "f", True, data=False, leader="x", leader_id=3, config=frozenset({"f", "x"}))
    own_leader = member_peer(3, "x", 3, data=True)
    other = member_peer(9, "a", 9, data=True)
    assert f.decide_member(follower, [own_leader, other]).action is Action.CONFLICT
    assert f.decide_member(follower, [own_leader, member_peer(9, "a", 9)]).action is Action.STAY


@settings(max_examples=300, deadline=None)
@given(
    others=st.lists(st.tuples(st.integers(4, 254), st.booleans()), max_size=4),
    mates=st.lists(st.booleans(), min_size=1, max_size=3),
)
def test_no_member_of_a_cluster_with_data_ever_dissolves(others, mates):
    """If any healthy node of this cluster reports data, no foreign cluster makes this node DISSOLVE."""
    config = frozenset({"me", "x"} | {f"m{i}" for i in range(len(mates))})
    me = Me(1, "me", True, data=False, leader="x", leader_id=3, config=config)
    peers = [Peer(10 + i, True, f"m{i}", True, "x", 3, d) for i, d in enumerate(mates)]
    peers += [member_peer(n, f"id{n}", n, d) for n, d in others]
    d = f.decide_member(me, peers)
    if any(mates):
        assert d.action is not Action.DISSOLVE
