"""The replication codec's faster paths write and read exactly what the format says: a batch encoded with
the entry cache is byte for byte the batch encoded without it and the batch earlier releases wrote (the
reference encoder below is the codec as it was), and whatever a peer sends is a message or a CodecError."""

from __future__ import annotations

import base64
import binascii
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.replication import messages as msg
from node.replication import codec
from tests.replication.test_codec import entry, json_value, message

SENDER, ADDRESS = "id-1", "10.0.0.2:3000"


def reference_value(v):
    """How the codec wrote a field before its writers were specialised (the wire format, unchanged)."""
    if isinstance(v, msg.LogId):
        return [v.epoch, v.index]
    if isinstance(v, msg.Entry):
        return [v.epoch, v.index, v.kind.value, base64.b64encode(v.payload).decode("ascii")]
    if isinstance(v, tuple):
        return [reference_value(x) for x in v]
    return v


def reference_batch(messages, cluster: str) -> bytes:
    body = {
        "v": codec.BATCH_VERSION,
        "from": SENDER,
        "addr": ADDRESS,
        "msgs": [
            [codec._TAGS[type(m)], {n: reference_value(getattr(m, n)) for n in type(m).__dataclass_fields__}]
            for m in messages
        ],
    }
    if cluster:
        body["cluster"] = cluster
    return orjson.dumps(body)


shared_entries = st.lists(entry, min_size=1, max_size=6)


@st.composite
def rounds(draw):
    """Batches as a leader makes them: Appends (and FetchReplies) that share Entry objects, encoded in
    turn for several peers, mixed with other messages."""
    pool = draw(shared_entries)
    out = []
    for _ in range(draw(st.integers(1, 6))):
        picked = tuple(draw(st.lists(st.sampled_from(pool), max_size=4)))
        shared = draw(
            st.sampled_from(
                [
                    msg.Append(3, msg.LogId(3, 1), picked, 1, 9),
                    msg.FetchReply(3, 2, picked, msg.LogId(3, 4)),
                ]
            )
        )
        others = draw(st.lists(message, max_size=3))
        out.append([shared, *others] if draw(st.booleans()) else [*others, shared])
    return out


@settings(max_examples=200, deadline=None)
@given(
    rounds(),
    st.sampled_from(["", "log1-" + "a" * 32]),
    st.integers(1, 8),
    st.integers(16, 4096),
    st.integers(1, 3),
)
def test_a_batch_encoded_with_the_cache_is_the_batch_encoded_without_it(
    batches, cluster, entries, bytes_, peers
):
    """Property: with any bounds (so items come, are hit, age and are dropped), for every peer in turn, the
    bytes equal the uncached encoding and the reference one, and decode back to the messages."""
    cache = codec.EntryCache(max_entries=entries, max_bytes=bytes_)
    for messages in batches:
        for _ in range(peers):
            cached = codec.encode_batch(SENDER, ADDRESS, messages, cluster, cache=cache)
            assert cached == codec.encode_batch(SENDER, ADDRESS, messages, cluster)
            assert cached == reference_batch(messages, cluster)
            assert codec.decode_batch(cached) == (SENDER, ADDRESS, messages, cluster)
        assert len(cache) <= 2 * entries


def test_an_entry_is_encoded_once_for_every_peer_and_large_ones_are_not_kept():
    cache = codec.EntryCache(max_entries=4, max_bytes=800)
    small = msg.Entry(2, 5, msg.Kind.COMMAND, b"x" * 30)
    first = cache.encoded(small)
    assert cache.encoded(small) is first  # the second peer's Append reuses it
    assert cache.encoded(msg.Entry(2, 5, msg.Kind.COMMAND, b"x" * 30)) is not first  # equal is not the same
    large = msg.Entry(2, 6, msg.Kind.COMMAND, b"y" * 200)  # base64 over max_bytes / 8
    assert cache.encoded(large) is not cache.encoded(large)
    for index in range(7, 20):  # bounded: old generations go
        cache.encoded(msg.Entry(2, index, msg.Kind.COMMAND, b"z"))
    assert len(cache) <= 8
    assert cache.encoded(small) is not first


def test_a_message_tag_or_entry_kind_that_is_not_text_is_a_codec_error():
    # Regression: an unhashable tag or kind (a list) raised TypeError out of decode_batch: an unsigned POST
    # /cluster/replication answered 500 (the body is decoded before its signature is checked).
    for item in (
        [[1], {}],
        [{"a": 1}, {}],
        ["append", {"epoch": 1, "prev": [0, 0], "entries": [[1, 1, [2], ""]], "commit": 0, "seq": 1}],
        ["append", {"epoch": 1, "prev": [0, 0], "entries": [[1, 1, {}, ""]], "commit": 0, "seq": 1}],
    ):
        with pytest.raises(codec.CodecError):
            codec.decode_message(item)
        with pytest.raises(codec.CodecError):
            codec.decode_batch(orjson.dumps({"v": 1, "from": "x", "addr": "1.2.3.4:5", "msgs": [item]}))


any_tag = st.sampled_from(sorted(codec._TYPES)) | json_value
any_entry = st.lists(json_value, min_size=4, max_size=4) | json_value


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            any_tag, st.dictionaries(st.sampled_from(sorted(codec._FIELD_PARSERS)), json_value, max_size=6)
        ),
        max_size=3,
    ),
    st.lists(any_entry, max_size=3),
)
def test_any_json_in_any_position_is_a_message_or_a_codec_error(items, entries):
    """Property: tags, fields and entries of any JSON shape (lists and objects where text is expected
    included) decode to messages or raise CodecError, nothing else."""
    msgs = [list(i) for i in items]
    msgs.append(["append", {"epoch": 1, "prev": [0, 0], "entries": entries, "commit": 0, "seq": 1}])
    raw = json.dumps({"v": 1, "from": "x", "addr": "1.2.3.4:5", "msgs": msgs}).encode()
    try:
        batch = codec.decode_batch(raw)
    except codec.CodecError:
        return
    assert all(type(m) in codec._TAGS for m in batch.messages)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ABCDEFabcdef0123456789+/=-_ \n\x00é", max_size=24) | st.text(max_size=12))
def test_payload_base64_is_read_as_b64decode_with_validation_reads_it(text):
    """The payload decoder reads exactly what base64.b64decode(validate=True) reads (what earlier releases
    accepted) and refuses the rest with a CodecError."""
    try:
        expected = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        with pytest.raises(codec.CodecError):
            codec._unb64(text)
        return
    assert codec._unb64(text) == expected


@given(st.binary(max_size=300))
def test_payload_base64_is_written_as_b64encode_writes_it(data):
    assert codec._b64(data) == base64.b64encode(data).decode("ascii")
