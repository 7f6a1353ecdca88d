"""What a follower does per received entry, built the fast way, is what the plain way builds: commands decoded
through their slots equal (type for type) what the dataclass constructors give, and are refused with the
same error; log entries converted through their slots equal ``LogEntry(...)``."""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from node.core.replication import messages as msg
from node.core.sqlreq import Statement, WriteCommand
from node.replication import codec
from node.storage.log import LogEntry
from node.storage.statemachine import Command
from tests.replication.test_codec import command, entry, json_value


def reference_decode_command(data: bytes) -> Command:
    """decode_command as it was before it built its values by their slots (every check unchanged, but the
    version's: an integer, so that an unhashable one is refused, not a TypeError; see the test below)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise codec.CodecError(f"not JSON: {exc}") from None
    version = body.get("v") if isinstance(body, dict) else None
    if type(version) is not int or version not in codec.COMMAND_VERSIONS:
        raise codec.CodecError("unknown command version")
    try:
        statements = []
        for sql, params in body["stmts"]:
            if not isinstance(sql, str):
                raise codec.CodecError("sql must be text")
            if isinstance(params, dict):
                params = {str(k): codec._unparam(v) for k, v in params.items()}
            elif isinstance(params, list):
                params = tuple(codec._unparam(v) for v in params)
            elif params is not None:
                raise codec.CodecError("params must be a list, an object or null")
            statements.append(Statement(sql, params))
        tx, time_ns, seed, unified, client, rid = (body[k] for k in ("tx", "t", "seed", "u", "c", "rid"))
        if not isinstance(tx, bool) or not isinstance(unified, bool):
            raise codec.CodecError("tx and u must be booleans")
        if type(time_ns) is not int or type(seed) is not int:
            raise codec.CodecError("t and seed must be integers")
        if not isinstance(client, str) or not (rid is None or isinstance(rid, str)):
            raise codec.CodecError("c must be text and rid text or null")
        write = WriteCommand(tuple(statements), tx, time_ns, seed)
        sqlite_version = None
        load = None
        if version >= 2:
            sqlite_version = body["sq"]
            if not isinstance(sqlite_version, str) or not 0 < len(sqlite_version) <= codec.MAX_SQLITE_VERSION_CHARS:
                raise codec.CodecError("sq must be the SQLite version text")
            if "load" in body:
                if statements:
                    raise codec.CodecError("a load command carries no statements of its own")
                load = codec._load_part(body["load"])
        return Command(
            write, unified=unified, client=client, request_id=rid, sqlite_version=sqlite_version, load=load
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, codec.CodecError):
            raise
        raise codec.CodecError(f"malformed command: {exc!r}") from None


def outcome(decode, data: bytes):
    try:
        return "ok", decode(data)
    except Exception as exc:  # noqa: BLE001 - whatever either raises, both must raise it alike
        return "refused", f"{type(exc).__name__}: {exc}"


def same_values(a, b) -> None:
    """Equal and of the same types all the way down (== alone takes 1 for True and 1.0 for 1)."""
    assert type(a) is type(b)
    if isinstance(a, tuple | list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same_values(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same_values(a[k], b[k])
    elif isinstance(a, Command | WriteCommand | Statement):
        for name in type(a).__dataclass_fields__:
            same_values(getattr(a, name), getattr(b, name))
    elif a == a:  # not NaN
        assert a == b


def assert_same_decoding(data: bytes) -> None:
    got, want = outcome(codec.decode_command, data), outcome(reference_decode_command, data)
    assert got[0] == want[0], (got, want)
    if got[0] == "refused":
        assert got[1] == want[1]
    else:
        same_values(got[1], want[1])
        assert got[1] == want[1]


@given(command)
def test_a_decoded_command_is_what_the_constructors_build(cmd):
    assert_same_decoding(codec.encode_command(cmd))


params = st.one_of(json_value, st.lists(json_value | st.dictionaries(st.sampled_from(["b64", "f"]), json_value)))
statement = st.one_of(json_value, st.tuples(json_value | st.text(max_size=8), params).map(list))
body_field = st.sampled_from(["v", "sq", "stmts", "tx", "t", "seed", "u", "c", "rid", "load"])


@given(command, st.dictionaries(body_field, json_value | st.lists(statement, max_size=3), max_size=3))
def test_a_damaged_command_is_refused_exactly_as_before(cmd, changes):
    body = orjson.loads(codec.encode_command(cmd))
    body.update(changes)
    assert_same_decoding(json.dumps(body).encode())  # json: integers beyond 64 bits too


@given(command, st.sampled_from(["v", "sq", "stmts", "tx", "t", "seed", "u", "c", "rid"]))
def test_a_command_missing_a_field_is_refused_exactly_as_before(cmd, field):
    body = orjson.loads(codec.encode_command(cmd))
    del body[field]
    assert_same_decoding(orjson.dumps(body))


@given(st.lists(entry, max_size=8))
def test_log_entries_built_by_their_slots_equal_the_constructed_ones(entries):
    got = codec.to_log_entries(entries)
    want = [LogEntry(e.epoch, e.index, codec.KIND_CODES[e.kind], e.payload) for e in entries]
    assert got == want and [hash(x) for x in got] == [hash(x) for x in want]
    assert all(type(x) is LogEntry and x.payload is e.payload for x, e in zip(got, entries, strict=True))
    assert [codec.to_log_entry(e) for e in entries] == want
    assert [codec.from_log_entry(x) for x in got] == list(entries)


def test_every_kind_has_its_log_code():
    for kind in msg.Kind:
        (converted,) = codec.to_log_entries([msg.Entry(1, 2, kind, b"p")])
        assert converted.kind == codec.KIND_CODES[kind]


@given(command, st.sampled_from([[1], {"v": 1}, [], True, False, 1.0, "1", None]))
def test_a_version_that_is_not_an_integer_is_refused_as_unknown(cmd, version):
    """Regression: a list or an object as "v" raised TypeError (unhashable) out of decode_command, which
    the applier does not catch; true passed for version 1."""
    body = orjson.loads(codec.encode_command(cmd))
    body["v"] = version
    try:
        codec.decode_command(orjson.dumps(body))
    except codec.CodecError as exc:
        assert str(exc) == "unknown command version"
    else:
        raise AssertionError(f"version {version!r} was accepted")


@given(command, st.dictionaries(body_field, json_value | st.lists(statement, max_size=3), max_size=4))
def test_whatever_a_command_holds_decoding_raises_nothing_but_a_codec_error(cmd, changes):
    """The class of the regression above: the applier catches CodecError (the entry is refused, the node
    keeps running); any other exception out of decode_command would end its applier task."""
    body = orjson.loads(codec.encode_command(cmd))
    body.update(changes)
    try:
        codec.decode_command(json.dumps(body).encode())
    except codec.CodecError:
        pass


@given(st.binary(max_size=64) | json_value.map(lambda v: json.dumps(v).encode()))
def test_bytes_that_are_no_command_raise_only_a_codec_error(data):
    try:
        codec.decode_command(data)
    except codec.CodecError:
        pass
