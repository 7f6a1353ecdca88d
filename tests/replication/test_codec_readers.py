"""The codec's readers of the common messages (Append, AppendAck, Heartbeat, HeartbeatAck) accept and refuse
exactly what the generic reader does, and build the same values; the frame MAC computed from SHA-256 states
is byte for byte the HMAC-SHA256 the stream format defines (``hmac``)."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.replication import messages as msg
from node.replication import codec
from tests.replication.test_codec import entries, json_value, logid, n
from tests.replication.test_codec import message as message_any

common = st.one_of(
    st.builds(msg.Append, n, logid, entries, n, n),
    st.builds(msg.AppendAck, n, n, n),
    st.builds(msg.Heartbeat, n, n, n, logid),
    st.builds(msg.HeartbeatAck, n, n),
)
# Values that sit on either side of what a field accepts.
BOUNDARY = [-1, 0, 2**63 - 1, 2**63, True, False, 1.0, "1", None, [], {}, [1], [1, 2, 3], [0, 2**63], [-1, 0]]
edge = st.one_of(
    st.sampled_from(BOUNDARY),
    json_value,
    st.lists(st.integers(-2, 2**63), min_size=2, max_size=2),
    st.lists(
        st.one_of(
            st.tuples(st.integers(-1, 3), st.integers(-1, 3), st.sampled_from(["command", "config", "x", 1]),
                      st.sampled_from(["", "eA==", "eA=", "e A==", "!!", 5])).map(list),
            json_value,
        ),
        max_size=3,
    ),
)  # fmt: skip


def outcome(read, item):
    try:
        value = read(item)
    except codec.CodecError:
        return ("refused",)
    return ("ok", type(value), value)


def same_outcome(tag, body):
    item = [tag, body]
    assert outcome(codec.decode_message, item) == outcome(codec.decode_message_generic, item), item


bad_entries = [
    [1, 1, "command"], [1, 1, "command", "eA==", 0], [-1, 1, "command", "eA=="], [1, 2**63, "command", "eA=="],
    [True, 1, "command", "eA=="], [1, 1.0, "command", "eA=="], [1, 1, "cmd", "eA=="], [1, 1, ["command"], "eA=="],
    [1, 1, "command", "eA="], [1, 1, "command", "e A=="], [1, 1, "command", "eA==\n"], [1, 1, "command", b"x"],
    [1, 1, "command", None], {"a": 1}, "x",
]  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(common, st.data())
def test_the_fast_readers_accept_and_refuse_what_the_generic_reader_does(message, data):
    """Property: a valid message with any one field dropped, added or set to any boundary value, any entry
    malformed, or read under another tag, reads the same through both readers, or both refuse it; and so
    does the message changed at random in up to three ways."""
    tag, body = codec.encode_message(message)
    body = orjson.loads(orjson.dumps(body))  # as a peer's JSON arrives
    same_outcome(tag, body)
    for name in body:
        same_outcome(tag, {k: v for k, v in body.items() if k != name})
        for value in BOUNDARY:
            same_outcome(tag, {**body, name: value})
    for name in codec._FIELD_PARSERS:
        if name not in body:
            same_outcome(tag, {**body, name: 1})
    for other in codec._FAST_READERS:
        same_outcome(other, body)
    if body.get("entries"):
        for at in range(len(body["entries"])):
            for bad in bad_entries:
                same_outcome(
                    tag, {**body, "entries": [*body["entries"][:at], bad, *body["entries"][at + 1 :]]}
                )
    for _ in range(data.draw(st.integers(1, 3))):
        change = data.draw(st.sampled_from(["drop", "set", "add", "tag"]))
        if change == "drop" and body:
            del body[data.draw(st.sampled_from(sorted(body)))]
        elif change == "set" and body:
            body[data.draw(st.sampled_from(sorted(body)))] = data.draw(edge)
        elif change == "add":
            body[data.draw(st.sampled_from(sorted(codec._FIELD_PARSERS)) | st.text(max_size=4))] = data.draw(
                edge
            )
        elif change == "tag":
            tag = data.draw(st.sampled_from(sorted(codec._TYPES)))
    same_outcome(tag, body)


@given(common)
def test_a_common_message_reads_back_as_itself_through_the_fast_reader(message):
    item = orjson.loads(orjson.dumps(codec.encode_message(message)))
    read = codec._FAST_READERS[item[0]](item[1])
    assert read is not None  # the common case never falls back
    assert type(read) is type(message) and read == message and hash(read) == hash(message)
    if isinstance(read, msg.Append):
        assert all(
            type(e) is msg.Entry and e.id == o.id for e, o in zip(read.entries, message.entries, strict=True)
        )


def test_the_classes_built_by_their_slots_have_no_post_init_and_only_the_known_fields():
    """The fast readers set slots directly (no ``__init__``): a class that gained a ``__post_init__`` or a
    field would be built wrong, so this fails first."""
    known = {
        msg.LogId: ("epoch", "index"),
        msg.Entry: ("epoch", "index", "kind", "payload"),
        msg.Append: ("epoch", "prev", "entries", "commit", "seq"),
        msg.AppendAck: ("epoch", "match", "seq"),
        msg.Heartbeat: ("epoch", "commit", "seq", "prev"),
        msg.HeartbeatAck: ("epoch", "seq"),
    }
    for cls, fields in known.items():
        assert not hasattr(cls, "__post_init__"), cls
        assert tuple(cls.__dataclass_fields__) == fields, cls


def test_an_old_heartbeat_without_prev_still_reads_through_the_generic_reader():
    assert codec.decode_message(["heartbeat", {"epoch": 2, "commit": 1, "seq": 3}]) == msg.Heartbeat(2, 1, 3)


def test_an_unhashable_kind_or_a_bad_payload_is_refused_not_raised():
    body = {"epoch": 1, "prev": [0, 0], "entries": [[1, 1, "command", "eA="]], "commit": 0, "seq": 1}
    with pytest.raises(codec.CodecError, match="base64"):
        codec.decode_message(["append", body])
    body["entries"] = [[1, 1, ["command"], "eA=="]]
    with pytest.raises(codec.CodecError):
        codec.decode_message(["append", body])


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=130),
    st.text(max_size=30),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
    st.integers(1, 2**63 - 1),
    st.binary(max_size=300),
)
def test_the_frame_mac_is_the_hmac_sha256_of_the_format(key, address, incarnation, opening_seq, seq, body):
    """Property: for any key (longer than a SHA-256 block included), binding, frame number and body, the MAC
    and so the frame bytes are those of hmac.new over label, binding, number and body."""
    binding = f"{address}\n{incarnation}\n{opening_seq}\n".encode()
    seq_bytes = seq.to_bytes(8, "big")
    expected = hmac.new(
        key, b"talentnest/replication-stream/v1\n" + binding + seq_bytes + body, hashlib.sha256
    )
    mac = codec.FrameMac(key, address, incarnation, opening_seq)
    assert mac.of(seq, body) == expected.digest()
    frame = codec.encode_frame(mac, seq, body)
    assert frame == b"TNR\x01" + seq_bytes + expected.digest() + body
    assert codec.decode_frame(mac, seq, frame) == body


@given(st.lists(message_any, max_size=6), st.sampled_from(["", "log1-" + "a" * 32]))
def test_the_fast_writers_write_what_the_generic_writer_writes(messages, cluster):
    """Property: every message is written as the generic writer writes it, field order included (the
    batch bytes are compared)."""
    for m in messages:
        assert codec.encode_message(m) == codec.encode_message_generic(m)
    generic = orjson.dumps(
        {
            "v": codec.BATCH_VERSION,
            "from": "id-1",
            "addr": "10.0.0.2:3000",
            "msgs": [codec.encode_message_generic(m) for m in messages],
            **({"cluster": cluster} if cluster else {}),
        }
    )
    assert codec.encode_batch("id-1", "10.0.0.2:3000", messages, cluster) == generic
