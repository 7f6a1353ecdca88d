"""The replication codec: every message and command survives a round trip; anything else is CodecError."""

from __future__ import annotations

import json
import math

import apsw
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.core.replication import messages as msg
from node.core.sqlreq import Statement, WriteCommand
from node.replication import codec
from node.storage.corestate import (
    decode_core_hard_state,
    encode_core_hard_state,
    load_core_hard_state,
    save_core_hard_state,
)
from node.storage.statemachine import Command

n = st.integers(0, 2**63 - 1)
logid = st.builds(msg.LogId, n, n)
entry = st.builds(msg.Entry, n, n, st.sampled_from(list(msg.Kind)), st.binary(max_size=64))
entries = st.lists(entry, max_size=4).map(tuple)
message = st.one_of(
    st.builds(msg.Prepare, n, logid, st.booleans()),
    st.builds(msg.Promise, n, logid),
    st.builds(msg.Refuse, n, n, st.text(max_size=20)),
    st.builds(msg.Append, n, logid, entries, n, n),
    st.builds(msg.AppendAck, n, n, n),
    st.builds(msg.AppendReject, n, n, n, n),
    st.builds(msg.Heartbeat, n, n, n),
    st.builds(msg.HeartbeatAck, n, n),
    st.builds(msg.Stale, n),
    st.builds(msg.Fetch, n, n),
    st.builds(msg.FetchReply, n, n, entries, logid),
    st.builds(msg.TakeOver, n, st.booleans()),
    st.builds(msg.SnapshotOffer, n, logid),
)


def test_every_message_type_has_a_tag():
    assert set(codec._TAGS) == set(msg.Message.__args__)


@given(st.lists(message, max_size=8), st.sampled_from(["", "c0ffee", "log1-" + "a" * 32]))
def test_batches_round_trip(messages, cluster):
    raw = codec.encode_batch("id-1", "10.0.0.2:3000", messages, cluster)
    assert codec.decode_batch(raw) == ("id-1", "10.0.0.2:3000", messages, cluster)


def test_a_batch_without_a_cluster_is_read_as_from_a_node_without_one():
    """What a release that did not name clusters sends: still read, as from a node that has none."""
    raw = orjson.dumps({"v": codec.BATCH_VERSION, "from": "x", "addr": "10.0.0.2:3000", "msgs": []})
    assert codec.decode_batch(raw).cluster == ""


@pytest.mark.parametrize("cluster", [7, None, ["c"], "c" * 10_000])
def test_a_batch_whose_cluster_is_not_a_short_string_is_refused(cluster):
    raw = orjson.dumps({"v": codec.BATCH_VERSION, "from": "x", "addr": "a", "msgs": [], "cluster": cluster})
    with pytest.raises(codec.CodecError, match="cluster"):
        codec.decode_batch(raw)


value = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=20),
    st.binary(max_size=20),
)  # fmt: skip
params = st.one_of(
    st.none(), st.lists(value, max_size=4).map(tuple), st.dictionaries(st.text(max_size=5), value, max_size=3)
)
command = st.builds(
    Command,
    st.builds(
        WriteCommand,
        st.lists(st.builds(Statement, st.text(max_size=40), params), min_size=1, max_size=4).map(tuple),
        st.booleans(),
        st.integers(0, 2**62),
        st.integers(0, 2**63 - 1),
    ),
    st.booleans(),
    st.text(max_size=10),
    st.one_of(st.none(), st.text(min_size=1, max_size=10)),
    sqlite_version=st.sampled_from(["3.46.0", "3.54.0", "3.45.1"]),
)


def test_infinite_parameters_stay_infinite():
    # Regression: orjson writes inf as null, so a replica would have bound NULL where the leader bound inf.
    cmd = Command(
        WriteCommand((Statement("INSERT INTO t VALUES (?, ?)", (math.inf, -math.inf)),), False, 1, 2),
        sqlite_version=apsw.sqlite_lib_version(),
    )
    assert codec.decode_command(codec.encode_command(cmd)) == cmd
    nan = codec.decode_command(
        codec.encode_command(Command(WriteCommand((Statement("x", (math.nan,)),), False, 1, 2)))
    )
    assert math.isnan(nan.write.statements[0].params[0])


@given(command)
def test_commands_round_trip_exactly(cmd):
    assert codec.decode_command(codec.encode_command(cmd)) == cmd


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_cleanly(raw):
    for decode in (codec.decode_batch, codec.decode_command):
        try:
            decode(raw)
        except codec.CodecError:
            pass


# Real field names most of the time, so decoding gets past the name check and meets wrong types and ranges.
field_name = st.sampled_from(sorted(codec._FIELD_PARSERS)) | st.text(max_size=8)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(st.tuples(st.sampled_from(sorted(codec._TYPES)), st.dictionaries(field_name, json_value))))
def test_malformed_messages_are_codec_errors_never_crashes(items):
    raw = json.dumps({"v": 1, "from": "x", "addr": "1.2.3.4:5", "msgs": [list(i) for i in items]}).encode()
    try:
        codec.decode_batch(raw)
    except codec.CodecError:
        pass


def test_unknown_versions_are_refused():
    with pytest.raises(codec.CodecError):
        codec.decode_batch(orjson.dumps({"v": 2, "from": "x", "addr": "a", "msgs": []}))
    with pytest.raises(codec.CodecError):
        codec.decode_command(orjson.dumps({"v": 2}))


def test_core_hard_state_round_trips_with_learners():
    hard = msg.HardState(
        7,
        "peer",
        ((3, msg.Config(frozenset({"a"}), frozenset({"b"}))), (9, msg.Config(frozenset({"a", "b"})))),
        "cluster-a",
    )
    assert decode_core_hard_state(encode_core_hard_state(hard, "me")) == ("me", hard)


def test_a_hard_state_file_from_before_clusters_were_named_reads_as_without_one():
    from node.storage import corestate
    from node.storage.durable import encode_framed

    old = {
        "identity": "me",
        "epoch": 4,
        "promised_to": None,
        "configs": [[1, msg.Config(frozenset({"a"})).encode().decode()]],
    }
    data = encode_framed(corestate._STATE_MAGIC, corestate._STATE_VERSION, orjson.dumps(old))
    assert decode_core_hard_state(data) == (
        "me",
        msg.HardState(4, None, ((1, msg.Config(frozenset({"a"}))),), ""),
    )
    with pytest.raises(ValueError, match="cluster"):
        decode_core_hard_state(encode_framed(corestate._STATE_MAGIC, 1, orjson.dumps({**old, "cluster": 5})))


def test_a_hard_state_written_by_another_node_is_refused(tmp_path):
    save_core_hard_state(tmp_path, msg.HardState(3, None), "other-node")
    with pytest.raises(RuntimeError, match="belongs to node other-node"):
        load_core_hard_state(tmp_path, "me")
    assert load_core_hard_state(tmp_path, "other-node") == msg.HardState(3, None)
    assert load_core_hard_state(tmp_path / "missing", "me") is None


def test_a_heartbeat_without_the_later_prev_field_decodes_and_unknown_fields_are_refused():
    from node.core.replication import messages as msg

    old = codec.decode_message(["heartbeat", {"epoch": 3, "commit": 5, "seq": 1}])
    assert old == msg.Heartbeat(3, 5, 1, msg.LogId(0, 0))
    new = msg.Heartbeat(3, 5, 1, msg.LogId(3, 5))
    assert codec.decode_message(codec.encode_message(new)) == new
    with pytest.raises(codec.CodecError):
        codec.decode_message(["heartbeat", {"epoch": 3, "commit": 5, "seq": 1, "extra": 1}])
    with pytest.raises(codec.CodecError):
        codec.decode_message(["heartbeat", {"epoch": 3, "seq": 1}])
