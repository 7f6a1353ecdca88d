"""Splitting a dump into statements piece by piece gives what SQLite's own completeness test gives."""

from __future__ import annotations

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import errors
from node.storage import dump
from node.storage.dump import StatementSplitter, split_sql


def reference_split(script: str) -> list[str]:
    """The plain definition: cut at every ';' where apsw.complete says the text so far is complete."""
    out, start, pos = [], 0, script.find(";")
    while pos >= 0:
        candidate = script[start : pos + 1]
        if apsw.complete(candidate):
            if candidate.strip(" \t\r\n;"):
                out.append(candidate)
            start = pos + 1
        pos = script.find(";", pos + 1)
    if script[start:].strip():
        out.append(script[start:])
    return out


PIECES = st.sampled_from(
    [
        "SELECT 1",
        "SELECT 'a;b'",
        "SELECT 'it''s;'",
        'SELECT "x;y" FROM t',
        "SELECT `q;` FROM t",
        "SELECT [a;b] FROM t",
        "SELECT 1 -- a comment; with a semicolon\n",
        "/* ; block ; */ SELECT 2",
        "SELECT 'ü;€ 日本'",
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT ';'; END",
        "CREATE TRIGGER tr2 AFTER INSERT ON t BEGIN SELECT CASE WHEN 1 THEN 2 END; END",
        "INSERT INTO t VALUES(x'00ff')",
        "- 1",
        "SELECT 4 /",
        "SELECT '--' || '/*'",
        "",
        "'unterminated;",
    ]
)
SEPARATORS = st.sampled_from([";", ";\n", " ; ", ";;", "\n", ";-- trailing\n", ";/**/"])


@st.composite
def scripts(draw) -> str:
    parts = draw(st.lists(st.tuples(PIECES, SEPARATORS), min_size=1, max_size=8))
    return "".join(p + s for p, s in parts)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(script=scripts(), cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=20))
def test_piecewise_split_matches_the_reference(script, cuts):
    splitter = StatementSplitter()
    out, pos = [], 0
    for size in cuts:
        out += splitter.feed(script[pos : pos + size])
        pos += size
    out += splitter.feed(script[pos:])
    out += splitter.finish()
    assert out == reference_split(script)
    assert list(split_sql(script)) == reference_split(script)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(script=scripts(), chunk=st.integers(min_value=1, max_value=7))
def test_dump_file_reading_splits_utf8_safely(tmp_path_factory, monkeypatch_chunk, script, chunk):
    monkeypatch_chunk(chunk)
    path = tmp_path_factory.mktemp("dump") / "dump.sql"
    path.write_bytes(script.encode("utf-8"))
    assert list(dump.dump_statements(path, 1 << 20)) == reference_split(script)


@pytest.fixture
def monkeypatch_chunk():
    original = dump.DUMP_CHUNK_CHARS

    def set_chunk(size: int) -> None:
        dump.DUMP_CHUNK_CHARS = size

    yield set_chunk
    dump.DUMP_CHUNK_CHARS = original


def test_a_statement_longer_than_the_limit_is_a_400(tmp_path):
    path = tmp_path / "dump.sql"
    path.write_text("SELECT 1; SELECT '" + "x;" * 5000 + "';")
    with pytest.raises(errors.BadRequest, match="longer than 1000 characters"):
        list(dump.dump_statements(path, 1000))


def test_invalid_utf8_is_a_400(tmp_path):
    path = tmp_path / "dump.sql"
    path.write_bytes(b"SELECT '\xff';")
    with pytest.raises(errors.BadRequest, match="not UTF-8"):
        list(dump.dump_statements(path, 1000))


@pytest.mark.parametrize(
    "tail",
    [
        "ROLLBACK; -- due to errors\n",  # what sqlite3's .dump writes when it met errors
        "rollback;",
        "ROLLBACK TRANSACTION;",
        "ROLLBACK TO sp;",
        "-- a note\n/* and a block */ ROLLBACK;",
    ],
)
def test_a_dump_that_rolls_back_is_a_400(tmp_path, tail):
    """A load is one transaction (a dump's BEGIN/COMMIT are skipped), so a ROLLBACK in it cannot be honoured:
    it was skipped like COMMIT and the statements it rolled back were loaded (found by a hostile probe)."""
    path = tmp_path / "dump.sql"
    path.write_text("CREATE TABLE ld (a);\nBEGIN TRANSACTION;\nINSERT INTO ld VALUES('rolled-back');\n" + tail)
    with pytest.raises(errors.BadRequest, match="rolls back"):
        list(dump.dump_statements(path, 1 << 20))


@pytest.mark.parametrize(
    "text",
    [
        "INSERT INTO t VALUES('ROLLBACK');",
        "CREATE TABLE rollback_log (x);",
        "SELECT 1; -- ROLLBACK in a comment\n",
        "/* ROLLBACK; */ SELECT 2;",
    ],
)
def test_the_word_elsewhere_is_not_a_rollback(tmp_path, text):
    path = tmp_path / "dump.sql"
    path.write_text(text)
    assert list(dump.dump_statements(path, 1 << 20))


@pytest.mark.parametrize(
    "lead", ["-- x" * 20_000, "/* a */" * 20_000, " " * 200_000, "/*" + " " * 200_000, "-- a\n" * 20_000]
)
def test_long_runs_of_comments_and_spaces_are_read_without_backtracking(tmp_path, lead):
    """The check skips comments before the statement's first word; each comment can match in one way only.
    (A pattern whose line comments could end anywhere took exponential time on the first of these.)"""
    path = tmp_path / "dump.sql"
    path.write_text(lead + "\nSELECT 1;")
    assert list(dump.dump_statements(path, 1 << 22))
