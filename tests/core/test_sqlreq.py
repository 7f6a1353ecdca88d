"""Pure parsing of data API requests, flags and write commands."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import errors
from node.core import sqlreq as q


def parse(body, max_statements=100):
    return q.parse_statements(body, max_statements=max_statements)


def test_plain_positional_and_named_statements():
    stmts = parse(
        [
            "CREATE TABLE foo (id INTEGER PRIMARY KEY, name TEXT)",
            ["INSERT INTO foo(name, age) VALUES(?, ?)", "fiona", 20],
            ["INSERT INTO foo(name, age) VALUES(:name, :age)", {"name": "fiona", "age": 20}],
            ["SELECT 1"],
        ]
    )
    assert stmts[0] == q.Statement("CREATE TABLE foo (id INTEGER PRIMARY KEY, name TEXT)")
    assert stmts[1].params == ("fiona", 20)
    assert dict(stmts[2].params) == {"name": "fiona", "age": 20}
    assert stmts[3] == q.Statement("SELECT 1")


def test_value_mapping():
    (stmt,) = parse([["x", 1, 1.5, "s", None, True, False, [0, 255], "x'0aff'", "X''"]])
    assert stmt.params == (1, 1.5, "s", None, 1, 0, b"\x00\xff", b"\x0a\xff", b"")


def test_named_keys_may_carry_their_prefix():
    (stmt,) = parse([["x", {":a": 1, "$b": 2, "@c": 3}]])
    assert dict(stmt.params) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize(
    "body",
    [
        {"sql": "x"},
        "SELECT 1",
        42,
        None,
        [1],
        [[1, 2]],
        [[]],
        [["x", {"a": {"nested": 1}}]],
        [["x", [256]]],
        [["x", [-1]]],
        [["x", ["a"]]],
        [["x", 1, {"a": 1}]],
        [["x", 1 << 63]],
        ["   "],
        ["SELECT 1\x00"],
    ],
)
def test_bad_bodies_are_400(body):
    with pytest.raises(errors.BadRequest):
        parse(body)


def test_empty_array_is_no_statements():
    with pytest.raises(errors.BadRequest, match="no statements"):
        parse([])


def test_too_many_statements_is_413():
    with pytest.raises(errors.PayloadTooLarge):
        parse(["SELECT 1"] * 11, max_statements=10)
    assert len(parse(["SELECT 1"] * 10, max_statements=10)) == 10


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_any_json_either_parses_or_is_a_4xx(body):
    try:
        stmts = parse(body)
    except errors.NodeError as exc:
        assert exc.status in (400, 413)
    else:
        assert all(isinstance(s.sql, str) and s.sql.strip() for s in stmts)


def test_flags():
    flags = q.parse_flags(
        {"transaction": "", "timings": "", "associative": "", "pretty": "", "level": "strong", "redirect": ""}
    )
    assert flags == q.Flags(True, True, True, True, False, q.Level.STRONG, True, None)
    assert q.parse_flags({}) == q.Flags()
    assert q.parse_flags({"transaction": "false"}).transaction is False
    assert q.parse_flags({"level": "bogus"}).level is q.Level.WEAK
    for level in ("none", "weak", "linearizable", "strong", "auto"):
        assert q.parse_flags({"level": level}).level.value == level


@pytest.mark.parametrize(
    ("text", "seconds"), [("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), ("2", 2.0), ("1.5s", 1.5)]
)
def test_durations(text, seconds):
    assert q.parse_flags({"db_timeout": text}).db_timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "-1s", "1s2", "nan", "inf", "0"])
def test_bad_durations(text):
    with pytest.raises(errors.BadRequest, match="db_timeout is not a valid duration"):
        q.parse_flags({"db_timeout": text})


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT CURRENT_TIMESTAMP", "SELECT (datetime('now'))"),
        ("select current_date, Current_Time", "select (date('now')), (time('now'))"),
        (
            "CREATE TABLE t(a DEFAULT CURRENT_TIMESTAMP)",
            "CREATE TABLE t(a DEFAULT (datetime('now')))",
        ),
        ("SELECT 'CURRENT_TIMESTAMP', \"current_date\", [current_time], `current_time`", None),
        ("SELECT 1 -- CURRENT_TIMESTAMP\n", None),
        ("SELECT /* CURRENT_TIMESTAMP */ 1", None),
        ("SELECT 'it''s CURRENT_TIME'", None),
        ("SELECT current_timestamp_x, xcurrent_time", None),
        ("SELECT 'unterminated CURRENT_TIME", None),
    ],
)
def test_time_keywords_are_rewritten_only_as_keywords(sql, expected):
    assert q.rewrite_time_keywords(sql) == (sql if expected is None else expected)


@given(st.text())
def test_rewrite_leaves_sql_without_keywords_alone(sql):
    if "current_" not in sql.lower():
        assert q.rewrite_time_keywords(sql) == sql


def test_stamp_write_carries_one_time_and_seed():
    request = q.DbRequest(
        parse(["INSERT INTO t VALUES(CURRENT_TIMESTAMP)"]), q.parse_flags({"transaction": ""})
    )
    command = q.stamp_write(request, time_ns=1_700_000_000_123_456_789, seed=7)
    assert command.statements[0].sql == "INSERT INTO t VALUES((datetime('now')))"
    assert command.transaction is True
    assert command.seed == 7
    assert command.now_text == "2023-11-14 22:13:20.123"


@given(st.integers(min_value=0, max_value=253_402_300_799_999_999_999))
def test_utc_text_matches_the_calendar(time_ns):
    from datetime import UTC, datetime, timedelta

    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=time_ns // 1000)
    assert (
        q.utc_text(time_ns) == expected.strftime("%Y-%m-%d %H:%M:%S.") + f"{expected.microsecond // 1000:03d}"
    )


def test_blob_encoding():
    assert q.encode_value(b"\x00\x01", blob_array=False) == "AAE="
    assert q.encode_value(b"\x00\x01", blob_array=True) == [0, 1]
    assert q.encode_value("x", blob_array=False) == "x"
