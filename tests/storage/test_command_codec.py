"""The log entry codec: every command round-trips exactly; unknown versions and damage are refused."""

from __future__ import annotations

import math
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.sqlreq import INT64_MAX, INT64_MIN, Statement, WriteCommand
from node.storage import command_codec as cc
from node.storage.statemachine import Command

# Text with lone surrogates mixed in (st.text() never makes them): a JSON body may carry them as escapes.
texts = st.lists(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=12).map("".join)
values = st.one_of(
    st.none(),
    st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=64),
)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
params = st.one_of(
    st.none(),
    st.lists(values, max_size=5).map(tuple),
    st.dictionaries(names, values, max_size=4).map(MappingProxyType),
)
statements = st.builds(Statement, texts.filter(bool), params)
writes = st.builds(
    WriteCommand,
    st.lists(statements, max_size=4).map(tuple),
    st.booleans(),
    st.integers(0, INT64_MAX),
    st.integers(0, INT64_MAX),
)
commands = st.builds(
    Command,
    writes,
    unified=st.booleans(),
    client=texts,
    request_id=st.none() | texts,
)


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return type(a) is type(b) and a == b


def _same_params(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    if hasattr(a, "items"):
        return hasattr(b, "items") and a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return not hasattr(b, "items") and len(a) == len(b) and all(map(_same_value, a, b))


def _same_command(a: Command, b: Command) -> bool:
    wa, wb = a.write, b.write
    return (
        (wa.transaction, wa.time_ns, wa.seed, a.unified, a.client, a.request_id)
        == (wb.transaction, wb.time_ns, wb.seed, b.unified, b.client, b.request_id)
        and len(wa.statements) == len(wb.statements)
        and all(
            x.sql == y.sql and _same_params(x.params, y.params)
            for x, y in zip(wa.statements, wb.statements, strict=True)
        )
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(commands, min_size=1, max_size=4))
def test_any_commands_round_trip_exactly(batch: list[Command]) -> None:
    payload = cc.encode_commands(batch)
    assert payload[0] == cc.FORMAT_VERSION
    decoded = cc.decode_commands(payload)
    assert len(decoded) == len(batch)
    for a, b in zip(batch, decoded, strict=True):
        assert _same_command(a, b), (a, b)


@settings(max_examples=100, deadline=None)
@given(st.lists(commands, min_size=1, max_size=2), st.integers(0, 255))
def test_an_unknown_version_is_refused_explicitly(batch: list[Command], version: int) -> None:
    payload = cc.encode_commands(batch)
    forged = bytes((version,)) + payload[1:]
    if version in cc.READABLE_VERSIONS:
        assert cc.decode_commands(forged)
        return
    with pytest.raises(cc.CommandFormatError, match=f"format version {version} is unknown"):
        cc.decode_commands(forged)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_refused_never_misread(data: bytes) -> None:
    try:
        decoded = cc.decode_commands(data)
    except cc.CommandFormatError:
        return
    assert all(isinstance(c, Command) for c in decoded)


def test_a_blob_and_a_string_stay_apart() -> None:
    command = Command(WriteCommand((Statement("INSERT INTO t VALUES(?, ?)", (b"ab", "ab")),), False, 1, 2))
    (back,) = cc.decode_commands(cc.encode_commands([command]))
    assert back.write.statements[0].params == (b"ab", "ab")
    assert type(back.write.statements[0].params[0]) is bytes


def test_load_marker_round_trip_and_version() -> None:
    assert cc.decode_load_marker(cc.encode_load_marker("dump")) == "dump"
    with pytest.raises(cc.CommandFormatError):
        cc.decode_load_marker(b"\x07" + cc.encode_load_marker("sqlite")[1:])
    with pytest.raises(ValueError):
        cc.encode_load_marker("other")


def test_a_lone_surrogate_survives_the_slow_path() -> None:
    text = "a\ud800b"
    command = Command(WriteCommand((Statement(f"SELECT '{text}'", (text,)),), False, 1, 2), client=text)
    (back,) = cc.decode_commands(cc.encode_commands([command]))
    assert back.write.statements[0].sql == f"SELECT '{text}'"
    assert back.write.statements[0].params == (text,) and back.client == text
