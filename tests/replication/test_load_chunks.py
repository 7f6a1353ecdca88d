"""A replicated load's chunking and its command payloads: round trips, bounded sizes, whole statements.

Properties over generated dumps (hypothesis): chunks give back exactly the dump's statements in order and
never split one; every chunk payload stays within the bound a core Append batch carries; load commands
survive the codec exactly; anything malformed is a CodecError, never an exception of another kind.
"""

from __future__ import annotations

import apsw
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import errors
from node.core.sqlreq import WriteCommand
from node.replication import codec
from node.storage import statemachine as sm
from node.storage.dump import (
    LOAD_CHUNK_BYTES,
    LOAD_ENVELOPE_BYTES,
    chunk_statements,
    dump_statements,
    encoded_size,
)

VERSION = apsw.sqlite_lib_version()
PIECES = st.sampled_from(
    [
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES ('a;b')",
        "INSERT INTO t VALUES ('it''s;\n\"quoted\"')",
        "INSERT INTO t VALUES (X'00ff')",
        "SELECT 1 -- a comment; with a semicolon\n",
        "/* ; block ; */ SELECT 2",
        "INSERT INTO t VALUES ('ü;€ 日本 \\u0001')",
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END",
        "INSERT INTO t VALUES ('\t\x01\x1f')",
    ]
)
statements = st.lists(
    st.one_of(PIECES, st.text(alphabet="abc;' \n", min_size=1, max_size=5).map(lambda s: f"SELECT '{s.replace(chr(39), chr(39) * 2)}'")),
    max_size=30,
)  # fmt: skip


@given(st.lists(st.text(min_size=1, max_size=50), max_size=40), st.integers(3, 300))
def test_chunks_keep_every_statement_whole_in_order_and_bounded(stmts, max_bytes):
    chunks = list(chunk_statements(stmts, max_bytes, 1 << 20))
    assert [s for chunk in chunks for s in chunk] == stmts
    assert all(chunks), "no empty chunk"
    for chunk in chunks:
        size = len(orjson.dumps(chunk))
        assert size <= max_bytes or len(chunk) == 1, "only a statement larger than a chunk goes over, alone"
    # Greedy: a chunk was closed only because the next statement did not fit.
    for chunk, following in zip(chunks, chunks[1:], strict=False):
        assert len(orjson.dumps([*chunk, following[0]])) > max_bytes


def test_a_statement_above_the_statement_bound_is_a_400():
    with pytest.raises(errors.BadRequest, match="at most 100"):
        list(chunk_statements(["x" * 200], 50, 100))
    assert encoded_size("x") == len('"x"') + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(statements, st.integers(40, 400))
def test_a_dump_file_chunks_into_complete_statements(tmp_path_factory, stmts, max_bytes):
    """Split from a file and chunked, every chunk holds complete statements only: none is cut in two."""
    path = tmp_path_factory.mktemp("d") / "dump.sql"
    path.write_text("".join(f"{s};\n" for s in stmts), encoding="utf-8")
    split = list(dump_statements(path, 1 << 20))
    chunks = list(chunk_statements(split, max_bytes, 1 << 20))
    assert [s for chunk in chunks for s in chunk] == split
    assert all(apsw.complete(s) for chunk in chunks for s in chunk)
    assert "".join(s for chunk in chunks for s in chunk).strip() == "".join(f"{s};\n" for s in stmts).strip()


load_id = st.text(alphabet="0123456789abcdef", min_size=1, max_size=16)
chunk_command = st.builds(
    lambda i, seq, sql: sm.Command(WriteCommand((), False, 0, 0), sqlite_version=VERSION,
                                   load=sm.LoadChunk(i, seq, tuple(sql))),
    load_id, st.integers(0, 2**40), st.lists(st.text(max_size=30), max_size=5),
)  # fmt: skip
end_command = st.builds(
    lambda i, n, k, d, a, t, seed, rid: sm.Command(
        WriteCommand((), False, t, seed), client="c", request_id=rid, sqlite_version=VERSION,
        load=sm.LoadEnd(i, n, k, d, a),
    ),
    load_id, st.integers(0, 2**40), st.integers(0, 2**40),
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), st.booleans(),
    st.integers(0, 2**62), st.integers(0, 2**63 - 1), st.one_of(st.none(), st.text(min_size=1, max_size=10)),
)  # fmt: skip


@given(st.one_of(chunk_command, end_command))
def test_load_commands_round_trip_exactly(command):
    assert codec.decode_command(codec.encode_command(command)) == command


@settings(max_examples=20, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                        max_size=3000), min_size=1, max_size=1500))  # fmt: skip
def test_every_chunk_payload_fits_one_append_batch(stmts):
    for seq, chunk in enumerate(chunk_statements(stmts, LOAD_CHUNK_BYTES)):
        payload = codec.encode_command(
            sm.Command(WriteCommand((), False, 0, 0), sqlite_version=VERSION,
                       load=sm.LoadChunk("f" * 16, seq, tuple(chunk)))
        )  # fmt: skip
        assert len(payload) <= LOAD_CHUNK_BYTES + LOAD_ENVELOPE_BYTES == 1 << 20


BAD_LOADS = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5),
    st.fixed_dictionaries({"id": st.one_of(st.text(max_size=80), st.integers(-(2**63), 2**63 - 1)), "seq": st.integers(-5, 5),
                           "sql": st.one_of(st.lists(st.integers(-9, 9), min_size=1), st.text())}),
    st.fixed_dictionaries({"id": st.text(min_size=1, max_size=5),
                           "end": st.dictionaries(st.sampled_from(["chunks", "stmts", "digest", "abort", "x"]),
                                                  st.one_of(st.integers(-3, 3), st.text(max_size=70),
                                                            st.booleans()))}),
)  # fmt: skip


@given(BAD_LOADS)
def test_malformed_load_parts_are_codec_errors(load):
    body = {"v": 2, "sq": VERSION, "stmts": [], "tx": False, "t": 0, "seed": 0, "u": False, "c": "", "rid": None,
            "load": load}  # fmt: skip
    try:
        command = codec.decode_command(orjson.dumps(body))
    except codec.CodecError:
        return
    # Accepted only if it is a well-formed chunk or end.
    assert isinstance(command.load, sm.LoadChunk | sm.LoadEnd)
    assert codec.decode_command(codec.encode_command(command)) == command


def test_a_load_with_statements_of_its_own_and_a_bad_version_are_refused():
    base = {"v": 2, "sq": VERSION, "stmts": [["SELECT 1", None]], "tx": False, "t": 0, "seed": 0, "u": False,
            "c": "", "rid": None, "load": {"id": "a", "seq": 0, "sql": []}}  # fmt: skip
    with pytest.raises(codec.CodecError, match="no statements"):
        codec.decode_command(orjson.dumps(base))
    for sq in (None, "", 3, "x" * 40):
        with pytest.raises(codec.CodecError, match="sq"):
            codec.decode_command(orjson.dumps({**base, "stmts": [], "sq": sq}))


def test_version_1_commands_are_still_read_without_a_version():
    body = {
        "v": 1,
        "stmts": [["SELECT 1", None]],
        "tx": False,
        "t": 0,
        "seed": 0,
        "u": False,
        "c": "",
        "rid": None,
    }
    command = codec.decode_command(orjson.dumps(body))
    assert command.sqlite_version is None and command.load is None


def test_a_command_is_stamped_with_the_running_sqlite_when_it_names_none():
    command = sm.Command(WriteCommand((), False, 0, 0))
    assert codec.decode_command(codec.encode_command(command)).sqlite_version == VERSION
