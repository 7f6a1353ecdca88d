"""The caches of verified tokens and authenticated headers (node.auth) under altered tokens: once a valid
token is cached, no alteration of it is let through on the strength of the cache. A changed token either
means the same bytes (base64 has spare bits in its last character) and gets the same principal, or is refused
exactly as an uncached check refuses it."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import auth, errors

SECRET = "k" * 32
NOW = 10_000
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _segments(token: str) -> list[bytes] | None:
    """The decoded bytes of a JWT's three segments, or None if they do not decode."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in parts]
    except (binascii.Error, ValueError):
        return None


def _answer(header: str, now: float):
    try:
        return auth.authenticate(header, SECRET, now=now)
    except errors.Unauthorized as exc:
        return ("401", str(exc))


def _uncached_answer(header: str, now: float):
    saved_headers, saved_tokens = dict(auth._authenticated), dict(auth._verified)
    auth._authenticated.clear()
    auth._verified.clear()
    try:
        return _answer(header, now)
    finally:
        auth._authenticated.clear()
        auth._authenticated.update(saved_headers)
        auth._verified.clear()
        auth._verified.update(saved_tokens)


def test_a_flipped_signature_byte_is_refused_after_the_token_was_cached():
    token = auth.mint_jwt(SECRET, auth.Role.ADMIN, now=NOW, ttl_s=600)
    assert auth.authenticate(f"Bearer {token}", SECRET, now=NOW).role is auth.Role.ADMIN  # now cached
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[5] ^= 0x01
    forged = f"{head}.{payload}.{base64.urlsafe_b64encode(bytes(raw)).decode().rstrip('=')}"
    for _ in range(2):  # and it is not cached as valid after its first refusal either
        with pytest.raises(errors.Unauthorized, match="signature"):
            auth.authenticate(f"Bearer {forged}", SECRET, now=NOW)
    assert all(token != forged for _, token in auth._verified)


def test_an_expired_token_is_refused_although_it_was_cached():
    token = auth.mint_jwt(SECRET, auth.Role.WRITE, now=NOW, ttl_s=60)
    header = f"Bearer {token}"
    assert auth.authenticate(header, SECRET, now=NOW).role is auth.Role.WRITE
    with pytest.raises(errors.Unauthorized, match="expired"):
        auth.authenticate(header, SECRET, now=NOW + 60 + auth.LEEWAY_S)
    assert auth.authenticate(header, SECRET, now=NOW + 1).role is auth.Role.WRITE  # still valid before


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from(list(auth.Role)),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(list(_B64URL) + [".", "=", " ", "é", "\x00"])),
        min_size=1,
        max_size=3,
    ),
    basic=st.booleans(),
    now_offset_s=st.sampled_from([0, 100, 600 + auth.LEEWAY_S]),
)
def test_an_altered_cached_token_gets_what_an_uncached_check_gives(role, edits, basic, now_offset_s):
    token = auth.mint_jwt(SECRET, role, now=NOW, ttl_s=600)
    original = _segments(token)
    header = ("Basic " + base64.b64encode(f"u:{token}".encode()).decode()) if basic else f"Bearer {token}"
    assert auth.authenticate(header, SECRET, now=NOW).role is role  # cached, under both caches
    altered = list(token)
    for position, char in edits:
        altered[position % len(altered)] = char
    altered_token = "".join(altered)
    if basic:
        altered_header = "Basic " + base64.b64encode(f"u:{altered_token}".encode()).decode()
    else:
        altered_header = f"Bearer {altered_token}"
    now = NOW + now_offset_s
    answer = _answer(altered_header, now)
    assert answer == _uncached_answer(altered_header, now)
    if isinstance(answer, auth.Principal):
        # Accepted only if it is, byte for byte, the token that was signed.
        assert _segments(altered_token) == original
        assert answer == _uncached_answer(header, now)
