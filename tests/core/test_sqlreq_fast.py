"""The fast path of :func:`sqlreq.parse_statements` gives what the general path gives: the same statements, or
the same error (type, status and message), on generated bodies of every shape, good and bad."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import errors
from node.core import sqlreq as q

MAX_STATEMENTS = 8


def general(body: Any, raw: bytes | None) -> Any:
    """What parse_statements answered before the fast path existed: the general path alone."""
    if raw is not None:
        try:
            return q._statements(body, MAX_STATEMENTS, huge_floats=False)
        except q._HugeFloat:
            body = q.exact_json(raw)
    return q._statements(body, MAX_STATEMENTS, huge_floats=True)


def outcome(parse: Any, body: Any, raw: bytes | None) -> tuple[str, Any]:
    try:
        return "ok", parse(body, raw)
    except errors.NodeError as exc:
        return type(exc).__name__, (exc.status, str(exc))


def fast(body: Any, raw: bytes | None) -> Any:
    return q.parse_statements(body, max_statements=MAX_STATEMENTS, raw=raw)


def assert_agree(body: Any, raw: bytes | None = None) -> None:
    expected = outcome(general, body, raw)
    got = outcome(fast, body, raw)
    assert got == expected
    if got[0] == "ok":  # same values of the same types (1 == 1.0 == True would hide a conversion)
        for a, b in zip(got[1], expected[1], strict=True):
            pa = tuple(a.params.items()) if isinstance(a.params, q.Mapping) else a.params
            pb = tuple(b.params.items()) if isinstance(b.params, q.Mapping) else b.params
            assert [type(v) for v in pa or ()] == [type(v) for v in pb or ()]
            assert type(a.params) is type(b.params)


SQL = st.sampled_from(
    [
        "SELECT 1",
        "INSERT INTO t(v) VALUES(?)",
        "INSERT INTO t(a, b) VALUES(?, ?)",
        "INSERT INTO t(a, b) VALUES(?2, ?1)",
        "INSERT INTO t(a) VALUES(:a)",
        "INSERT INTO t(a, b) VALUES(:a, @b)",
        "SELECT $x, ?",
        "SELECT ?99999",
        "SELECT $a::b",
        "SELECT #a",
        "SELECT '?' -- ?",
        "SELECT ?; SELECT ?",
        "",
        "   ",
        "SELECT\x001",
        "SELECT CURRENT_TIMESTAMP",
    ]
) | st.text(alphabet="SELCT ?:@$#';-x01\x00", max_size=12)

INT64 = st.integers(min_value=q.INT64_MIN, max_value=q.INT64_MAX)
VALUE = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.integers(),  # also beyond 64 bits
    st.sampled_from([float(1 << 63), -float(1 << 63), 1e19, 2.5, -0.0]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(["x'0aff'", "X''", "x'0'", "x'zz'", "x", "X'"]),
    st.lists(st.integers(min_value=-1, max_value=256), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
KEY = st.sampled_from(["a", ":a", "@a", "$a", "b", "@b", ":", "", "x"]) | st.text(max_size=3)
STATEMENT = st.one_of(
    SQL,
    st.tuples(SQL).map(list),
    st.tuples(SQL, st.lists(VALUE, max_size=3)).map(lambda t: [t[0], *t[1]]),
    st.tuples(SQL, st.dictionaries(KEY, VALUE, max_size=3)).map(lambda t: [t[0], t[1]]),
    st.tuples(SQL, st.dictionaries(KEY, VALUE, max_size=2), VALUE).map(list),
    st.sampled_from([[], [1], [None, 1], 42, None, {"sql": "SELECT 1"}, [["SELECT 1"]]]),
)
# Mostly the shapes the fast path takes, with values at and beyond its edges (booleans, hex literals,
# 64-bit bounds, huge floats), so that both its answers and its fallbacks are exercised.
EDGE_VALUE = st.one_of(
    st.none(),
    INT64,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.booleans(),
    st.sampled_from(
        [
            "x'0aff'",
            "X''",
            "X'0a'",
            "x'0'",
            "x",
            "X",
            q.INT64_MAX,
            q.INT64_MIN,
            1 << 63,
            1e19,
            float(1 << 63),
            -float(1 << 63),
        ]
    ),
)
POSITIONAL = st.lists(EDGE_VALUE, min_size=1, max_size=4).map(
    lambda vs: [f"INSERT INTO t VALUES({', '.join('?' * len(vs))})", *vs]
)
NAMED = (
    st.dictionaries(st.sampled_from(["a", "b", "c"]), EDGE_VALUE, min_size=1, max_size=3)
    .flatmap(
        lambda d: st.tuples(
            st.just(d), st.lists(st.sampled_from(["", ":", "@", "$"]), min_size=len(d), max_size=len(d))
        )
    )
    .map(
        lambda t: [
            f"SELECT {', '.join(':' + k for k in t[0])}",
            {prefix + k: v for (k, v), prefix in zip(t[0].items(), t[1], strict=True)},
        ]
    )
)
COMMON = st.one_of(st.sampled_from(["SELECT 1", "CREATE TABLE t(a)", "SELECT '?'"]), POSITIONAL, NAMED)
BODY = st.one_of(
    st.lists(COMMON, min_size=1, max_size=MAX_STATEMENTS + 1),
    st.lists(COMMON, min_size=1, max_size=3).flatmap(
        lambda good: st.tuples(st.just(good), STATEMENT).map(lambda t: [*t[0], t[1]])
    ),
    st.lists(STATEMENT, max_size=MAX_STATEMENTS + 2),
    st.sampled_from([None, {}, "SELECT 1", 7]),
)


@settings(max_examples=600, deadline=None)
@given(BODY)
def test_fast_and_general_paths_agree_on_decoded_bodies(body):
    assert_agree(body)


@settings(max_examples=400, deadline=None)
@given(BODY)
def test_fast_and_general_paths_agree_on_json_text(body):
    """As the HTTP layer calls it: the body decoded by orjson from its text (huge integers become floats,
    then are decoded again exactly by the general path)."""
    try:
        raw = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        raw = None
    if raw is None:  # an integer beyond 64 bits: orjson refuses to write it; Python's json does not
        import json

        raw = json.dumps(body).encode()
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # not the parser's concern: the HTTP layer answers 400 before it gets here
    assert_agree(decoded, raw)


@pytest.mark.parametrize(
    "body",
    [
        ["SELECT 1", ["INSERT INTO t(v) VALUES(?)", "hello"], ["SELECT :a", {":a": 1}]],
        [["SELECT ?", True]],  # a boolean is converted: the general path does it
        [["SELECT ?", "x'00'"]],  # a hex literal is a BLOB
        [["SELECT ?", 9223372036854775808]],  # beyond 64 bits: 400
        [["SELECT ?", float(1 << 63)]],
        [["SELECT :a", {"a": 1, ":a": 2}]],  # two values for one name
        [["SELECT ?", 1, 2]],
        ["SELECT ?"],
        [["SELECT ?1$a", 1]],
    ],
)
def test_paths_agree_on_known_edges(body):
    assert_agree(body)


def test_the_fast_path_is_taken_for_the_common_shapes():
    """It must not fall back for what clients send every time (else it would pay for nothing)."""
    body = [
        "CREATE TABLE t(a, b)",
        ["INSERT INTO t(a, b) VALUES(?, ?)", "fiona", 20],
        ["INSERT INTO t(a, b) VALUES(:a, :b)", {"a": None, ":b": 1.5}],
    ]
    statements = q._fast_statements(body)
    assert statements is not None
    assert statements == general(body, None)
