"""Hypothesis strategies for the pure core."""

from hypothesis import strategies as st

from node.core import membership as m
from node.core.ids import Endpoint

PORT = 3000

hosts = st.builds(lambda c, d: f"10.0.{c}.{d}", st.integers(0, 3), st.integers(1, 254))
endpoints = hosts.map(lambda h: Endpoint(h, PORT))


def inputs(pool: list[Endpoint]):
    ep = st.sampled_from(pool)
    return st.one_of(
        st.builds(lambda eps: m.DnsAnswered(frozenset(e.host for e in eps)), st.lists(ep, max_size=len(pool))),
        st.builds(m.DnsFailed, st.sampled_from(["timeout", "refused"])),
        st.builds(m.ProbeSucceeded, ep),
        st.builds(m.ProbeFailed, ep, st.just("refused")),
        st.builds(m.PeerAnnounced, ep),
        st.builds(m.ProbedBy, ep),
        st.builds(m.PeerDeparted, ep),
        st.just(m.Tick()),
    )


@st.composite
def histories(draw, max_len: int = 60):
    """A node, a pool of peers, and a timed sequence of membership inputs."""
    pool = draw(st.lists(endpoints, min_size=2, max_size=6, unique=True))
    me = pool[0]
    events = draw(
        st.lists(st.tuples(st.floats(0, 12, allow_nan=False), inputs(pool)), max_size=max_len)
    )
    return me, pool, events
