from hypothesis import given, settings
from hypothesis import strategies as st

from node.core import membership as m
from node.core.ids import Endpoint
from tests.core.strategies import histories

PARAMS = m.Params(failure_threshold=3, node_timeout_s=30.0)
ME = Endpoint("10.0.2.1", 3000)
A = Endpoint("10.0.2.2", 3000)
B = Endpoint("10.0.2.3", 3000)


def run(events, state=None, start=0.0):
    state = state or m.initial(ME, PARAMS)
    facts = []
    now = start
    for dt, event in events:
        now += dt
        state, new = m.step(state, event, now)
        facts += new
    return state, facts, now


def test_dns_adds_pending_peers_that_cannot_lead_until_probed():
    state, facts, _ = run([(0, m.DnsAnswered(frozenset({ME.host, A.host})))])
    assert [type(f) for f in facts] == [m.PeerDiscovered]
    assert state.peers[A].health is m.Health.PENDING
    assert [mem.healthy for mem in state.view().members] == [True, False]
    state, facts, _ = run([(0.1, m.ProbeSucceeded(A))], state)
    assert facts == [m.PeerHealthy(A, A.node_id)]
    assert state.view().healthy[-1].endpoint == A


def test_threshold_misses_make_unhealthy_and_one_answer_recovers():
    state, _, _ = run([(0, m.PeerAnnounced(A)), (0, m.ProbeSucceeded(A))])
    state, facts, _ = run([(0.25, m.ProbeFailed(A, "refused"))] * 2, state)
    assert facts == [] and state.peers[A].health is m.Health.HEALTHY
    state, facts, _ = run([(0.25, m.ProbeFailed(A, "refused"))], state)
    assert facts == [m.PeerUnhealthy(A, A.node_id, 3, "refused")]
    state, facts, _ = run([(0.25, m.ProbeFailed(A, "refused"))], state)
    assert facts == [], "unhealthy is reported once"
    state, facts, _ = run([(0.25, m.ProbeSucceeded(A))], state)
    assert facts == [m.PeerRecovered(A, A.node_id)]
    assert state.peers[A].misses == 0


def test_silence_for_node_timeout_removes():
    state, _, now = run([(0, m.PeerAnnounced(A)), (0, m.ProbeSucceeded(A))])
    state, facts = m.step(state, m.Tick(), now + 29.9)
    assert facts == [] and A in state.peers
    state, facts = m.step(state, m.Tick(), now + 30.0)
    assert facts == [m.PeerRemoved(A, A.node_id, "timeout")]
    assert A not in state.peers


def test_goodbye_removes_at_once_and_dns_cannot_bring_it_back_until_hello():
    state, _, now = run([(0, m.PeerAnnounced(A)), (0, m.ProbeSucceeded(A))])
    state, facts = m.step(state, m.PeerDeparted(A), now)
    assert facts == [m.PeerRemoved(A, A.node_id, "left")]
    state, facts = m.step(state, m.DnsAnswered(frozenset({A.host})), now + 1)
    assert facts == [] and A not in state.peers
    state, facts = m.step(state, m.ProbeSucceeded(A), now + 1)
    assert facts == [] and A not in state.peers, "a probe in flight at goodbye must not resurrect the peer"
    state, facts = m.step(state, m.ProbedBy(A), now + 1)
    assert facts == [] and A not in state.peers
    state, facts = m.step(state, m.PeerAnnounced(A), now + 2)
    assert facts == [m.PeerDiscovered(A, A.node_id, "hello")]
    assert state.peers[A].health is m.Health.PENDING, "a hello is a claim; only our probe makes it healthy"
    state, facts = m.step(state, m.ProbeSucceeded(A), now + 2)
    assert facts == [m.PeerHealthy(A, A.node_id)]


def test_tombstone_expires_after_node_timeout():
    state, _, now = run([(0, m.PeerAnnounced(A)), (0, m.PeerDeparted(A))])
    state, _ = m.step(state, m.Tick(), now + 30)
    assert A not in state.departed
    state, facts = m.step(state, m.DnsAnswered(frozenset({A.host})), now + 31)
    assert [type(f) for f in facts] == [m.PeerDiscovered]


def test_probe_from_unknown_peer_adds_it_but_known_peers_are_judged_by_our_probes():
    state, facts = m.step(m.initial(ME, PARAMS), m.ProbedBy(A), 0)
    assert facts == [m.PeerDiscovered(A, A.node_id, "probe")]
    assert not state.view().members[-1].healthy
    state, _ = m.step(state, m.ProbeFailed(A, "x"), 1)
    after, facts = m.step(state, m.ProbedBy(A), 1)
    assert facts == [m.ProbeRequested(A)], "a sign of life from a peer we doubt: probe it now"
    assert after == state and state.peers[A].misses == 1


def test_hello_from_an_unhealthy_peer_asks_for_a_probe_but_changes_nothing_else():
    state, _, now = run([(0, m.PeerAnnounced(A)), (0, m.ProbeSucceeded(A))] + [(0.25, m.ProbeFailed(A, "x"))] * 3)
    assert state.peers[A].health is m.Health.UNHEALTHY
    after, facts = m.step(state, m.PeerAnnounced(A), now + 1)
    assert facts == [m.ProbeRequested(A)]
    assert after == state
    healthy, _ = m.step(state, m.ProbeSucceeded(A), now)
    assert m.step(healthy, m.PeerAnnounced(A), now + 1)[1] == []


def test_forged_hello_cannot_win_an_election():
    high = Endpoint("10.0.255.255", 3000)
    state, _ = m.step(m.initial(ME, PARAMS), m.PeerAnnounced(high), 0)
    assert [x.endpoint for x in state.view().healthy] == [ME]


def test_steady_probes_do_not_bump_the_view_version():
    state, _, now = run([(0, m.PeerAnnounced(A)), (0, m.ProbeSucceeded(A))])
    version = state.version
    for i in range(10):
        state, facts = m.step(state, m.ProbeSucceeded(A), now + i)
        assert facts == []
    assert state.version == version
    assert state.peers[A].last_seen == now + 9


def test_self_is_never_a_peer():
    state, _, _ = run([(0, m.DnsAnswered(frozenset({ME.host}))), (0, m.PeerAnnounced(ME)), (0, m.ProbedBy(ME))])
    assert state.peers == {}


def replay(history):
    """Yield (event, state before, state after, now) for every step of a generated history."""
    me, _, events = history
    state = m.initial(me, PARAMS)
    now = 0.0
    for dt, event in events:
        now += dt
        before = state
        state, _ = m.step(state, event, now)
        yield event, before, state, now


@settings(max_examples=300)
@given(histories())
def test_dns_answers_and_failures_never_remove_anyone(history):
    for event, before, after, _ in replay(history):
        if isinstance(event, m.DnsAnswered | m.DnsFailed):
            assert set(before.peers) <= set(after.peers), "a lookup shrank the view"


@settings(max_examples=300)
@given(histories())
def test_empty_or_failed_lookup_never_shrinks_view_to_self(history):
    state, now = m.initial(history[0], PARAMS), 0.0
    for step in replay(history):
        state, now = step[2], step[3]
    for failing in (m.DnsFailed("timeout"), m.DnsAnswered(frozenset())):
        after, _ = m.step(state, failing, now)
        assert after.view().members == state.view().members


@settings(max_examples=300)
@given(histories())
def test_invariants_hold_after_any_history(history):
    me = history[0]
    timeout = PARAMS.node_timeout_s
    for event, before, state, now in replay(history):
        view = state.view()
        assert me not in state.peers
        assert [x.node_id for x in view.members] == sorted(x.node_id for x in view.members)
        assert sum(1 for x in view.members if x.is_self) == 1
        if isinstance(event, m.Tick):
            assert all(now - p.last_seen < timeout for p in state.peers.values())
        assert not (set(state.peers) & {e for e, t in state.departed.items() if now - t < timeout})
        # The version moves whenever the published view does.
        if view.members != before.view().members:
            assert state.version > before.version


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
def test_node_id_is_last_two_octets(a, b, c, d):
    assert Endpoint(f"{a}.{b}.{c}.{d}", 1).node_id == c * 256 + d
