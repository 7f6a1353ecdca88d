"""client_key: the same hash of the credential whether or not it was remembered, within a bounded memory."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from node.http import db


def expected(authorization: str | None) -> str:
    return hashlib.sha256((authorization or "").encode("utf-8", "surrogateescape")).hexdigest()[:32]


@given(st.lists(st.none() | st.text(max_size=40) | st.text(min_size=2049, max_size=2100), max_size=30))
def test_client_key_is_the_hash_of_the_credential_cached_or_not(headers):
    for header in headers + headers:  # the second pass answers from the cache where it may
        assert db.client_key(header) == expected(header)
        assert len(db._client_keys) <= db.CLIENT_KEY_CACHE_ENTRIES


def test_the_cache_is_bounded_and_skips_long_headers():
    db._client_keys.clear()
    for n in range(db.CLIENT_KEY_CACHE_ENTRIES + 10):
        assert db.client_key(f"Bearer {n}") == expected(f"Bearer {n}")
    assert 0 < len(db._client_keys) <= db.CLIENT_KEY_CACHE_ENTRIES
    long = "Bearer " + "x" * db.CLIENT_KEY_CACHE_CHARS
    assert db.client_key(long) == expected(long)
    assert long not in db._client_keys
