"""Query flags parsed once per request and cached by query string: the same answer as parsing them afresh."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from node import errors
from node.core.sqlreq import parse_flags
from node.http import common

NAMES = [
    "level",
    "timings",
    "pretty",
    "transaction",
    "redirect",
    "freshness",
    "db_timeout",
    "associative",
    "x",
]
VALUES = ["", "1", "true", "weak", "none", "strong", "1s", "250ms", "-1s", "bogus", "NONE", "0.5s"]


def _request(query_string: str):
    return make_mocked_request("POST", "/db/execute" + (f"?{query_string}" if query_string else ""))


def _outcome(fn, *args):
    try:
        return fn(*args)
    except errors.NodeError as exc:
        return (type(exc), str(exc))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=4), max_size=6))
def test_cached_flags_always_equal_a_fresh_parse_and_bad_ones_are_refused_every_time(queries):
    for pairs in queries + queries:  # every query twice: the second answer may come from the cache
        query_string = urlencode(pairs)
        fresh = _outcome(parse_flags, _request(query_string).query)
        request = _request(query_string)
        assert _outcome(common.request_flags, request) == fresh
        assert _outcome(common.request_flags, request) == fresh  # kept on the request
        if isinstance(fresh, tuple):
            assert query_string not in common._flags_by_query
        assert len(common._flags_by_query) <= common.FLAGS_CACHE_ENTRIES


def test_the_query_string_cache_is_bounded_and_skips_long_query_strings():
    common._flags_by_query.clear()
    for n in range(common.FLAGS_CACHE_ENTRIES * 2 + 3):
        common.request_flags(_request(f"x={n}"))
        assert len(common._flags_by_query) <= common.FLAGS_CACHE_ENTRIES
    long_query = "x=" + "a" * common.FLAGS_CACHE_QUERY_CHARS
    assert common.request_flags(_request(long_query)) == parse_flags(_request(long_query).query)
    assert long_query not in common._flags_by_query


def test_a_bad_duration_is_a_400_even_after_the_same_keys_were_cached():
    common.request_flags(_request("freshness=1s"))
    with pytest.raises(errors.BadRequest):
        common.request_flags(_request("freshness=soon"))
    with pytest.raises(errors.BadRequest):
        common.request_flags(_request("freshness=soon"))
