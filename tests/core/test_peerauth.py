from hypothesis import given
from hypothesis import strategies as st

from node.core import peerauth

KEY = peerauth.derive_key("s" * 32)
NOW = 1_800_000_000


def test_round_trip():
    header = peerauth.sign(KEY, "/cluster/leave", "10.0.0.2:3000", NOW)
    assert peerauth.verify(KEY, header, "/cluster/leave", "10.0.0.2:3000", NOW + 5)


def test_refuses_other_secret_path_sender_and_stale_or_future_stamps():
    header = peerauth.sign(KEY, "/cluster/leave", "10.0.0.2:3000", NOW)
    other = peerauth.derive_key("t" * 32)
    assert not peerauth.verify(other, header, "/cluster/leave", "10.0.0.2:3000", NOW)
    assert not peerauth.verify(KEY, header, "/cluster/hello", "10.0.0.2:3000", NOW)
    assert not peerauth.verify(KEY, header, "/cluster/leave", "10.0.0.3:3000", NOW)
    assert not peerauth.verify(KEY, header, "/cluster/leave", "10.0.0.2:3000", NOW + peerauth.WINDOW_S + 1)
    assert not peerauth.verify(KEY, header, "/cluster/leave", "10.0.0.2:3000", NOW - peerauth.WINDOW_S - 1)
    assert not peerauth.verify(KEY, None, "/cluster/leave", "10.0.0.2:3000", NOW)


def test_peer_key_differs_from_the_secret_itself():
    assert KEY != ("s" * 32).encode()


@given(st.text(max_size=300))
def test_garbage_headers_are_refused_not_raised(header):
    assert not peerauth.verify(KEY, header, "/cluster/leave", "10.0.0.2:3000", NOW)
