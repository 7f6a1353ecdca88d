"""Pure parsing of data API requests, flags and write commands."""

from __future__ import annotations

import json
import re
from types import MappingProxyType
from typing import Any

import apsw
import apsw.ext
import orjson
import pytest
from hypothesis import given, settings
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
    (stmt,) = parse(
        [["SELECT " + ", ".join("?" * 9), 1, 1.5, "s", None, True, False, [0, 255], "x'0aff'", "X''"]]
    )
    assert stmt.params == (1, 1.5, "s", None, 1, 0, b"\x00\xff", b"\x0a\xff", b"")


def test_named_keys_may_carry_their_prefix():
    (stmt,) = parse([["SELECT :a, $b, @c", {":a": 1, "$b": 2, "@c": 3}]])
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


# --- parameters are checked against the values before anything runs ------------------------------------------


@pytest.mark.parametrize(
    ("sql", "count", "named"),
    [
        ("SELECT 1", 0, ()),
        ("SELECT ?, ?", 2, ()),
        ("SELECT ?, ?1", 1, ()),  # ?1 is the first ? again
        ("SELECT ?5", 5, ()),  # ?NNN counts as its number
        ("SELECT ?2, ?", 3, ()),  # ? takes the number after the highest so far
        ("SELECT :a, @a, $a, :a", 3, (":a", "@a", "$a")),  # distinct parameters, one key 'a' for apsw
        ("SELECT ?; SELECT ?1, ?1; ;", 2, ()),  # each statement of a string numbers from 1
        ("SELECT :a; SELECT :b, :a", 3, (":a", ":b")),
        ("SELECT '?', \"?\", [?], `?`, 'it''s :a' -- ?\n", 0, ()),
        ("SELECT /* ? :a */ 1 /* unterminated ?", 0, ()),
        ("SELECT 'unterminated ?", 0, ()),
        ("SELECT a$b, x'00'", 0, ()),  # '$' inside an identifier is not a parameter
        ("SELECT é$a, \u00a0$b, $$c", 1, ("$$c",)),  # ... nor after any non-ASCII character
        ("SELECT 1 - -1 / 2 - ?", 1, ()),
        ("SELECT '1'::int, :a", 1, (":a",)),  # a PostgreSQL cast: SQLite's own error, not a parameter
        ("SELECT :é, :a\u00a0", 2, (":é", ":a\u00a0")),  # every non-ASCII character is a name character
        ("SELECT ?١", 1, ()),  # only ASCII digits number a parameter
        ("SELECT ?12abc", 12, ()),
    ],
)
def test_sql_parameters_are_found_as_sqlite_finds_them(sql, count, named):
    found = q.sql_parameters(sql)
    assert (found.count, found.named, found.unsupported) == (count, named, ())


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT $a::b",
        "SELECT $a(x)",
        "SELECT :a::b(c)",
        "SELECT $::a",
        "SELECT #a",
        "SELECT ?0",
        "SELECT ?32767",
        "SELECT ?" + "9" * 5000,
    ],
)
def test_forms_that_are_not_bound_are_refused(sql):
    assert q.sql_parameters(sql).unsupported
    with pytest.raises(errors.BadRequest, match="statement 0: unsupported parameter"):
        parse([[sql, 1]])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([["SELECT :zz", {"a": 1}]], "statement 0: no value for parameter :zz"),
        ([["SELECT 1"], ["SELECT :a, :b", {"a": 1}]], "statement 1: no value for parameter :b"),
        ([["SELECT :a", {"a": 1, "b": 2}]], "statement 0: value for 'b' matches no parameter"),
        ([["SELECT :a", {"a": 1, ":a": 2}]], "two values for parameter 'a'"),
        ([["SELECT ?", {"a": 1}]], "named values given, but the SQL has positional parameter ?"),
        ([["SELECT :a", 1]], "an array of values given, but the SQL has named parameter :a"),
        ([["SELECT ?, ?", 1]], "statement 0 has 2 parameters but 1 value were given"),
        ([["SELECT 1", 1]], "statement 0 has 0 parameters but 1 value were given"),
        ([["SELECT ?5", 1, 2, 3, 4]], "statement 0 has 5 parameters but 4 values were given"),
        ([["SELECT ?; SELECT ?", 1]], "has 2 parameters but 1 value"),
        (["SELECT ?, :a"], "statement 0 has 2 parameters but no values"),
        ([["SELECT ?, ?"]], "statement 0 has 2 parameters but no values"),
        ([["SELECT :a", {}]], "no value for parameter :a"),
    ],
)
def test_values_that_do_not_fit_the_parameters_are_400(body, message):
    with pytest.raises(errors.BadRequest, match=re.escape(message)):
        parse(body)


def test_text_statements_are_checked_unless_told_not_to():
    with pytest.raises(errors.BadRequest, match="statement 0 has 1 parameter but no values"):
        q.parse_text_statement("SELECT ?")
    assert q.parse_text_statement("SELECT ?", check=False)[0].sql == "SELECT ?"


@pytest.mark.parametrize(
    "body",
    [
        [["SELECT :a, @b, $c", {":a": 1, "@b": 2, "$c": 3}]],
        [["SELECT :a, @b, $c", {"a": 1, "b": 2, "c": 3}]],
        [["SELECT ?1, ?1, ?2", 1, 2]],
        [["INSERT INTO t VALUES(?); INSERT INTO t VALUES(?)", 1, 2]],
        [["SELECT 1", {}]],
        ["SELECT '?', ':a'"],
    ],
)
def test_rqlite_forms_still_parse(body):
    assert parse(body)


# --- integers beyond 64 bits, however the fast parser decoded them --------------------------------------------


@pytest.mark.parametrize(
    "text", [str(1 << 64), str(1 << 63), str(-(1 << 63) - 1), "1" + "0" * 300, "-" + "9" * 40]
)
def test_integers_beyond_64_bits_are_400_naming_statement_and_value(text):
    raw = f'[["SELECT 1"], ["SELECT ?", {text}]]'.encode()
    with pytest.raises(
        errors.BadRequest, match=f"statement 1 value 1: integer {text} does not fit in 64 bits"
    ):
        parse_raw(raw)
    named = f'[["SELECT :a", {{"a": {text}}}]]'.encode()
    with pytest.raises(errors.BadRequest, match="statement 0 parameter 'a': integer"):
        parse_raw(named)


@pytest.mark.parametrize("text", ["1e19", "-1.5e300", "9.3e18", "1.0E20"])
def test_large_float_literals_stay_floats(text):
    (stmt,) = parse_raw(f'[["SELECT ?", {text}]]'.encode())
    assert stmt.params == (float(text),)


def test_64_bit_bounds_are_accepted():
    (stmt,) = parse_raw(f'[["SELECT ?, ?", {(1 << 63) - 1}, {-(1 << 63)}]]'.encode())
    assert stmt.params == ((1 << 63) - 1, -(1 << 63))


@pytest.mark.parametrize("raw", [b"[1e400]", b"[NaN]", b"[-Infinity]", b"[" * 100_000 + b"]" * 100_000])
def test_exact_json_refuses_what_json_does_not_have(raw):
    with pytest.raises(errors.BadRequest, match="invalid JSON body"):
        q.exact_json(raw)


def parse_raw(raw: bytes, max_statements: int = 100):
    return q.parse_statements(orjson.loads(raw), max_statements=max_statements, raw=raw)


@given(
    st.integers(q.INT64_MAX + 1)
    | st.integers(max_value=q.INT64_MIN - 1)
    | st.integers(1, 309).map(lambda d: 10**d),
    st.booleans(),
)
def test_every_out_of_range_integer_is_400(number, named):
    if q.INT64_MIN <= number <= q.INT64_MAX:
        return
    body = [["SELECT :a", {"a": number}]] if named else [["SELECT ?", number]]
    raw = json.dumps(body).encode()
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # beyond a double: the HTTP layer's parser refuses it already (400)
    with pytest.raises(errors.BadRequest, match=f"integer {number} does not fit in 64 bits"):
        q.parse_statements(decoded, max_statements=10, raw=raw)


@given(st.integers(q.INT64_MIN, q.INT64_MAX) | st.floats(allow_nan=False, allow_infinity=False) | st.none())
def test_every_in_range_number_keeps_its_type_and_value(number):
    raw = json.dumps([["SELECT ?", number]]).encode()
    (stmt,) = parse_raw(raw)
    assert stmt.params == (number,)
    assert type(stmt.params[0]) is type(number)


# --- the scanner agrees with SQLite itself --------------------------------------------------------------------

_NAME = st.text(alphabet=st.sampled_from("abcXYZ_é☃\u00a0"), min_size=1, max_size=4).filter(
    lambda s: not s[0].isdigit()
)
_PARAM = st.one_of(
    st.just("?"),
    st.integers(1, 40).map(lambda n: f"?{n}"),
    st.tuples(st.sampled_from(":@$"), _NAME).map("".join),
)
_NOISE = st.text(alphabet=st.sampled_from("?:@$'\"`[]-*/;x1 \n"), max_size=8)
_EXPR = st.one_of(
    _PARAM,
    _PARAM.map(lambda p: f"({p})"),
    _NOISE.map(lambda s: "'" + s.replace("'", "''") + "'"),
    st.integers(0, 99).map(str),
    st.just("x'00ff'"),
    st.just("CURRENT_TIMESTAMP"),
)
_ALIAS = st.one_of(
    st.just(""),
    _NOISE.map(lambda s: ' AS "' + s.replace('"', '""') + '"'),
    _NOISE.map(lambda s: " AS [" + s.replace("]", "") + "]"),
    _NOISE.map(lambda s: " AS `" + s.replace("`", "``") + "`"),
    st.just(" AS a$b"),
)
_GAP = st.one_of(
    st.just(" "),
    _NOISE.map(lambda s: "/*" + s.replace("*/", "") + "*/"),
    _NOISE.map(lambda s: "--" + s.replace("\n", "") + "\n"),
)
_SELECT = st.lists(st.tuples(_EXPR, _ALIAS, _GAP).map("".join), min_size=1, max_size=5).map(
    lambda items: "SELECT " + ", ".join(items)
)
_SQL = st.lists(_SELECT, min_size=1, max_size=3).flatmap(
    lambda selects: st.sampled_from([";", "; ", ";\n;", " -- end\n;"]).map(lambda sep: sep.join(selects))
)


def sqlite_parameters(sql: str) -> tuple[int, set[str]]:
    """Count and names as SQLite reports them, statement by statement (the reference)."""
    conn = apsw.Connection(":memory:")
    count, names = 0, set()
    rest: str | None = sql
    for _ in range(20):
        if not rest or not rest.strip(" \n;") or rest.strip().startswith("--"):
            break
        info = apsw.ext.query_info(conn, rest)
        count += info.bindings_count
        names |= {n for n in info.bindings_names if n is not None and not n.isdigit()}
        rest = info.query_remaining
    return count, names


@settings(max_examples=300, deadline=None)
@given(_SQL)
def test_parameters_found_are_those_sqlite_finds(sql):
    found = q.sql_parameters(sql)
    assert found.unsupported == ()
    assert (found.count, set(found.names)) == sqlite_parameters(sql)


@settings(max_examples=200, deadline=None)
@given(_SQL, st.data())
def test_values_accepted_always_bind_in_sqlite(sql, data):
    """Whatever passes the check binds without a binding error, every statement of the string."""
    found = q.sql_parameters(sql)
    if found.named:
        keys = data.draw(st.sets(st.sampled_from(sorted(found.names) + ["zz"])))
        params: Any = MappingProxyType({k: 1 for k in keys})
    else:
        params = tuple(range(data.draw(st.integers(0, found.count + 2))))
    try:
        q.check_parameters(q.Statement(sql, params), "statement 0")
    except errors.BadRequest:
        return
    conn = apsw.Connection(":memory:")
    conn.execute(sql, dict(params) if isinstance(params, MappingProxyType) else params).fetchall()
