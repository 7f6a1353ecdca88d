"""Peer-message signatures and the anti-replay window (node.core.peerauth): pure, no clock."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.core import peerauth
from node.core.peerauth import Claims, ReplayGuard, Signer, Verdict, Window, advance

KEY = peerauth.derive_key("s" * 32)
PATH = "/cluster/leave"
SENDER = "10.0.0.2:3000"
INC = 1_800_000_000_000


CLAIMS = Claims(INC, 1, 7)


def header(claims=CLAIMS, path=PATH, sender=SENDER, key=KEY):
    return peerauth.sign(key, path, sender, claims)


# --- signatures ---------------------------------------------------------------------------------------------


def test_round_trip_returns_the_claims():
    assert peerauth.verify(KEY, header(), PATH, SENDER) == Claims(INC, 1, 7)


def test_the_mac_covers_key_path_sender_and_every_number():
    h = header()
    assert peerauth.verify(peerauth.derive_key("t" * 32), h, PATH, SENDER) is None
    assert peerauth.verify(KEY, h, "/cluster/hello", SENDER) is None
    assert peerauth.verify(KEY, h, PATH, "10.0.0.3:3000") is None
    sig = h.rpartition("sig=")[2]
    for tampered in (
        f"v=2,inc={INC + 1},seq=1,rinc=7,sig={sig}",
        f"v=2,inc={INC},seq=2,rinc=7,sig={sig}",
        f"v=2,inc={INC},seq=1,rinc=8,sig={sig}",
        f"v=2,inc={INC},seq=1,rinc=0,sig={sig}",
    ):
        assert peerauth.verify(KEY, tampered, PATH, SENDER) is None, tampered
    assert peerauth.verify(KEY, None, PATH, SENDER) is None


def test_peer_key_differs_from_the_secret_itself():
    assert KEY != ("s" * 32).encode()


def test_the_old_timestamp_header_is_refused():
    assert peerauth.verify(KEY, "t=1800000000,sig=" + "0" * 64, PATH, SENDER) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=2",
        f"v=2,inc={INC},seq=1,rinc=7",  # no sig
        f"v=2,inc={INC},seq=1,rinc=7,sig=abc",
        f"v=2,inc={INC},seq=1,seq=1,rinc=7,sig=" + "0" * 64,  # duplicated field
        f"v=2,inc={INC},seq=1,rinc=7,sig={'0' * 64},x=1",  # unknown field
        f"v=3,inc={INC},seq=1,rinc=7,sig=" + "0" * 64,
        "v=2,inc=\u00b2,seq=1,rinc=7,sig=" + "0" * 64,  # a Unicode digit
        "v=2,inc=\u0661,seq=1,rinc=7,sig=" + "0" * 64,  # Arabic-Indic one
        "v=2,inc=" + "9" * 5000 + ",seq=1,rinc=7,sig=" + "0" * 64,
        "v=2,inc=99999999999999999999,seq=1,rinc=7,sig=" + "0" * 64,  # > 2**63 - 1
        "v=2,inc=-1,seq=1,rinc=7,sig=" + "0" * 64,
        "v=2,inc=0,seq=1,rinc=7,sig=" + "0" * 64,  # incarnation 0 is 'unknown', never a sender's
        "v=2,inc=5,seq=0,rinc=7,sig=" + "0" * 64,
        "v=2,inc=05,seq=1,rinc=7,sig=" + "0" * 64,  # one spelling per number
        "\x00" * 100,
    ],
)
def test_malformed_headers_are_refused_not_raised(text):
    assert peerauth.parse(text) is None
    assert peerauth.verify(KEY, text, PATH, SENDER) is None


def test_a_leading_zero_cannot_respell_a_valid_header():
    good = header(Claims(INC, 10, 7))
    assert peerauth.verify(KEY, good.replace("seq=10", "seq=010"), PATH, SENDER) is None


@given(st.text(max_size=400))
def test_garbage_headers_are_refused_not_raised(text):
    assert peerauth.verify(KEY, text, PATH, SENDER) is None


@given(
    st.lists(
        st.sampled_from(
            ["v=2", f"inc={INC}", "inc=\u00b2", "seq=1", "seq=", "rinc=0", "sig=" + "a" * 64, "=", ""]
        ),
        max_size=8,
    )
)
def test_near_miss_headers_are_refused_not_raised(parts):
    assert peerauth.verify(KEY, ",".join(parts), PATH, SENDER) is None


def test_receiver_incarnation_policy():
    leave = Claims(INC, 1, 42)
    assert peerauth.addressed_to(leave, 42, state_changing=True)
    assert not peerauth.addressed_to(leave, 43, state_changing=True)
    assert not peerauth.addressed_to(Claims(INC, 1, 0), 42, state_changing=True)
    assert peerauth.addressed_to(Claims(INC, 1, 0), 42, state_changing=False)
    assert not peerauth.addressed_to(Claims(INC, 1, 41), 42, state_changing=False)


def test_signer_never_reuses_a_sequence_number():
    signer = Signer(KEY, SENDER, INC)
    seqs = [peerauth.verify(KEY, signer.next_header(PATH, 3), PATH, SENDER).seq for _ in range(100)]
    assert seqs == list(range(1, 101))
    with pytest.raises(ValueError):
        Signer(KEY, SENDER, 0)


# --- the window -----------------------------------------------------------------------------------------------


def run(messages, guard=None):
    guard = guard or ReplayGuard()
    return [guard.accept(SENDER, Claims(inc, seq, 0)) for inc, seq in messages]


def test_window_in_order_duplicates_and_too_old():
    verdicts = run([(5, 1), (5, 2), (5, 2), (5, 100), (5, 36), (5, 37), (5, 37), (5, 30), (5, 101)])
    assert verdicts == [
        Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.REPLAYED, Verdict.ACCEPTED, Verdict.TOO_OLD,
        Verdict.ACCEPTED, Verdict.REPLAYED, Verdict.TOO_OLD, Verdict.ACCEPTED,
    ]  # fmt: skip


def test_newer_incarnation_resets_and_older_is_refused():
    verdicts = run([(5, 1000), (6, 1), (5, 1001), (6, 1), (6, 2), (4, 1)])
    assert verdicts == [
        Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.OLD_INCARNATION, Verdict.REPLAYED, Verdict.ACCEPTED,
        Verdict.OLD_INCARNATION,
    ]  # fmt: skip


def test_guard_is_bounded_and_evicts_least_recently_used():
    guard = ReplayGuard(max_senders=3)
    for name in ("a", "b", "c"):
        assert guard.accept(name, Claims(1, 1, 0)).accepted
    assert not guard.accept("a", Claims(1, 1, 0)).accepted  # touches a: b is now the oldest
    assert guard.accept("d", Claims(1, 1, 0)).accepted
    assert len(guard) == 3
    assert guard.accept("b", Claims(1, 1, 0)).accepted  # b was forgotten (the documented limit)
    assert not guard.accept("a", Claims(1, 1, 0)).accepted


@given(
    base=st.integers(1, 2**40),
    offsets=st.lists(st.integers(0, peerauth.WINDOW_BITS - 1), unique=True, min_size=1, max_size=64),
    seed=st.integers(0, 2**32),
)
def test_any_permutation_of_fresh_seqs_in_the_window_is_accepted_once_each(base, offsets, seed):
    seqs = [base + o for o in offsets]
    order = seqs[:]
    random.Random(seed).shuffle(order)
    window = None
    for seq in order:
        verdict, window = advance(window, 9, seq)
        assert verdict is Verdict.ACCEPTED, (seq, order)
    for seq in order:
        verdict, after = advance(window, 9, seq)
        assert verdict is not Verdict.ACCEPTED
        assert after == window  # a refusal changes nothing


@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 300)), max_size=200))
def test_window_matches_a_reference_model(messages):
    """Against an unbounded model: accepted iff the incarnation is the newest so far, the pair is new, and
    the seq is within WINDOW_BITS of the highest seen in that incarnation."""
    window: Window | None = None
    newest, highest, seen = 0, 0, set()
    for inc, seq in messages:
        verdict, window = advance(window, inc, seq)
        if inc > newest:
            expected, newest, highest, seen = True, inc, seq, {seq}
        elif inc < newest or seq in seen or seq <= highest - peerauth.WINDOW_BITS:
            expected = False
        else:
            expected = True
            seen.add(seq)
            highest = max(highest, seq)
        assert verdict.accepted is expected, (inc, seq, verdict)
        assert window.incarnation == newest and window.highest == highest
        assert 0 <= window.seen < 2**peerauth.WINDOW_BITS


# --- signatures over a body (replication batches) ---------------------------------------------------------

BODY_KEY = peerauth.derive_key("body-secret-body-secret-body-secret!!")


def test_a_signature_over_a_body_verifies_only_with_that_body():
    # Regression: peer signatures did not cover the body, so a captured replication batch could carry
    # other log entries under a valid signature.
    signer = Signer(BODY_KEY, "10.0.0.2:3000", 5)
    header = signer.next_header("/cluster/replication", 0, b'{"msgs":[1]}')
    assert peerauth.verify(BODY_KEY, header, "/cluster/replication", "10.0.0.2:3000", b'{"msgs":[1]}')
    assert peerauth.verify(BODY_KEY, header, "/cluster/replication", "10.0.0.2:3000", b'{"msgs":[2]}') is None
    # A body signature is not a body-less one, nor the other way round.
    assert peerauth.verify(BODY_KEY, header, "/cluster/replication", "10.0.0.2:3000") is None
    plain = signer.next_header("/cluster/replication", 0)
    assert peerauth.verify(BODY_KEY, plain, "/cluster/replication", "10.0.0.2:3000", b"") is None


def test_callers_without_a_body_sign_as_before():
    claims = Claims(7, 3, 0)
    assert peerauth.sign(BODY_KEY, "/cluster/hello", "a", claims) == peerauth.sign(
        BODY_KEY, "/cluster/hello", "a", claims, None
    )


@given(st.binary(max_size=512), st.binary(max_size=512), st.integers(1, 2**40), st.integers(1, 2**40))
def test_no_other_body_verifies_under_a_body_signature(body, other, incarnation, seq):
    header = peerauth.sign(BODY_KEY, "/cluster/replication", "s", Claims(incarnation, seq, 0), body)
    claims = peerauth.verify(BODY_KEY, header, "/cluster/replication", "s", body)
    assert claims == Claims(incarnation, seq, 0)
    if other != body:
        assert peerauth.verify(BODY_KEY, header, "/cluster/replication", "s", other) is None
