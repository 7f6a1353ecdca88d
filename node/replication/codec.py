"""Versioned encodings for replication: peer message batches and the payload of a COMMAND log entry.

Why one explicit codec: peers of different releases meet on the wire and old entries stay on disk, so every
encoding carries a version and a reader refuses versions it does not know (``CodecError``) instead of
guessing. stdlib + orjson only; bytes travel as base64 in JSON.

Batch (``POST /cluster/replication`` body), version 1::

    {"v": 1, "from": <identity>, "addr": "ip:port", "msgs": [[<type tag>, {field: value, ...}], ...]}

LogId values are ``[epoch, index]``, entries ``[epoch, index, kind, payload base64]``. Decoding validates
every field's type and range: a malformed batch is a 400, never an exception inside the core.

Command payload (the bytes a COMMAND entry carries), version 2: ``{"v": 2, "sq": SQLite version,
"stmts": [[sql, params]], "tx": bool, "t": time_ns, "seed": n, "u": unified, "c": client, "rid": request
id}``; parameter values keep their types (bytes as ``{"b64": ...}``, infinities and NaN as ``{"f": "inf"}``),
so every replica executes exactly the stamped command. ``sq`` is the SQLite the leader ran: a replica running
another refuses to apply the entry (:func:`node.storage.statemachine.foreign_version`). Version 1 (no
``sq``) is still read: entries an earlier release wrote stay valid.

A replicated /db/load travels as commands of version 2 with a ``"load"`` object instead of statements
(``stmts`` empty): a chunk ``{"id": load id, "seq": n, "sql": [statement, ...]}`` (whole statements,
stamped), or the end ``{"id": load id, "end": {"chunks": n, "stmts": n, "digest": hex sha256, "abort":
bool}}`` which also carries ``t``, ``seed``, ``c`` and ``rid`` (see :class:`node.storage.statemachine.
LoadChunk` and ``LoadEnd``). A load of an SQLite *file* is ``{"file": {"sha256": hex, "size": bytes}}``
(:class:`~node.storage.statemachine.LoadFile`; with ``c`` and ``rid``): a release that predates it finds no
``id`` there and refuses the entry (its apply is retried, never skipped), so it can never apply the load as
an empty command.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import hmac
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import apsw
import orjson

from node.core.replication import messages as msg
from node.core.slots import slot_setters
from node.core.sqlreq import Statement, WriteCommand
from node.storage.log import LogEntry
from node.storage.statemachine import Command, LoadChunk, LoadEnd, LoadFile

BATCH_VERSION = 1
COMMAND_VERSION = 2
COMMAND_VERSIONS = frozenset({1, 2})
MAX_LOAD_ID_CHARS = 64
MAX_SQLITE_VERSION_CHARS = 32
MAX_MESSAGES_PER_BATCH = 4096
MAX_NUMBER = (1 << 63) - 1
MAX_IDENTITY_CHARS = 64


class CodecError(ValueError):
    """Bytes that are not a valid encoding of a known version: refused, never guessed."""


# --- message batches ----------------------------------------------------------------------------------------

_TYPES: dict[str, type] = {
    "prepare": msg.Prepare,
    "promise": msg.Promise,
    "refuse": msg.Refuse,
    "append": msg.Append,
    "append_ack": msg.AppendAck,
    "append_reject": msg.AppendReject,
    "heartbeat": msg.Heartbeat,
    "heartbeat_ack": msg.HeartbeatAck,
    "stale": msg.Stale,
    "fetch": msg.Fetch,
    "fetch_reply": msg.FetchReply,
    "take_over": msg.TakeOver,
    "snapshot_offer": msg.SnapshotOffer,
}
_TAGS = {cls: tag for tag, cls in _TYPES.items()}
_KINDS = {k.value: k for k in msg.Kind}
# The durable log stores a kind as a number; these numbers are part of the log format (never reuse one).
KIND_CODES = {msg.Kind.COMMAND: 1, msg.Kind.EPOCH_START: 2, msg.Kind.CONFIG: 3}
KINDS_BY_CODE = {code: kind for kind, code in KIND_CODES.items()}


_LOG_EPOCH, _LOG_INDEX, _LOG_KIND, _LOG_PAYLOAD = slot_setters(LogEntry)
# By the kind's ``_value_``: a dict keyed by the member calls Enum.__hash__, a Python function, per entry.
_KIND_CODES_BY_VALUE = {kind._value_: code for kind, code in KIND_CODES.items()}


def to_log_entry(entry: msg.Entry) -> LogEntry:
    return to_log_entries((entry,))[0]


def to_log_entries(entries: Iterable[msg.Entry]) -> list[LogEntry]:
    """The entries as the durable log stores them. Built by their slots (node.core.slots), not through the
    frozen dataclass's ``__init__``: a follower converts every entry it appends, and that ``__init__`` was
    most of the conversion. The objects are the same (the tests compare them)."""
    out = []
    codes, new, cls = _KIND_CODES_BY_VALUE, object.__new__, LogEntry
    for e in entries:
        entry = new(cls)
        _LOG_EPOCH(entry, e.epoch)
        _LOG_INDEX(entry, e.index)
        _LOG_KIND(entry, codes[e.kind._value_])
        _LOG_PAYLOAD(entry, e.payload)
        out.append(entry)
    return out


def from_log_entry(entry: LogEntry) -> msg.Entry:
    return msg.Entry(entry.epoch, entry.index, KINDS_BY_CODE[entry.kind], entry.payload)


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")  # base64.b64encode without its layer


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise CodecError("expected base64 text")
    try:
        # What base64.b64decode(text, validate=True) does on Python 3.11+, without its two Python layers.
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise CodecError(f"bad base64: {exc}") from None


# A kind's text is its ``_value_`` (the member's value as the enum stores it): ``Enum.value`` is a descriptor
# call and a dict keyed by the member calls Enum.__hash__, a Python function, per entry.


def _entry_out(e: msg.Entry) -> list[Any]:
    return [e.epoch, e.index, e.kind._value_, _b64(e.payload)]


class EntryCache:
    """Entries already encoded, by identity: a leader sends the same Entry objects to every follower (the
    core's in-memory window), so each is encoded (its payload's base64, most of the cost) once, not once per
    peer. It hands out the JSON-ready list ``[epoch, index, kind, payload base64]``, the very list
    ``encode_batch`` would build, so a batch's bytes are the same with or without it; the lists are never
    changed after they are made.

    Bounded in two generations: new items go to the young one; when it holds ``max_entries`` items or
    ``max_bytes`` of base64 text it becomes the old one and the old one is dropped, so at most twice the
    bounds are kept (an insert costs no eviction walk): with the defaults at most 1024 entries, 4 MiB of
    base64 and the 3 MiB of payloads it encodes. It only has to span the moments between the Appends of one
    round to the followers. Each item keeps its entry alive, so an ``id`` in the cache cannot belong
    to another object; an entry larger than an eighth of ``max_bytes`` is encoded but not kept (a catch-up
    of large entries read from disk would only push out the useful ones). Not thread-safe: the transport
    uses it from the event loop only."""

    def __init__(self, max_entries: int = 512, max_bytes: int = 2 << 20) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_item_bytes = max_bytes // 8
        self._young: dict[int, tuple[msg.Entry, list[Any]]] = {}
        self._old: dict[int, tuple[msg.Entry, list[Any]]] = {}
        self._young_bytes = 0

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def encoded(self, entry: msg.Entry) -> list[Any]:
        """The entry as ``encode_batch`` writes it (do not change the list: it is shared)."""
        key = id(entry)
        hit = self._young.get(key) or self._old.get(key)
        if hit is not None and hit[0] is entry:
            return hit[1]
        text = _b64(entry.payload)
        out = [entry.epoch, entry.index, entry.kind._value_, text]
        size = len(text)
        if size <= self._max_item_bytes:
            if len(self._young) >= self._max_entries or self._young_bytes + size > self._max_bytes:
                self._old, self._young, self._young_bytes = self._young, {}, 0
            self._young[key] = (entry, out)
            self._young_bytes += size
        return out


def _logid_out(v: msg.LogId, _cache: EntryCache | None) -> list[int]:
    return [v.epoch, v.index]


def _entries_out(v: tuple[msg.Entry, ...], cache: EntryCache | None) -> list[Any]:
    if cache is None:
        return [_entry_out(e) for e in v]
    encoded = cache.encoded
    return [encoded(e) for e in v]


# How each field is written (by name, as it is read: see _FIELD_PARSERS); any other field as it is.
_FIELD_WRITERS = {"last": _logid_out, "prev": _logid_out, "snapshot": _logid_out, "entries": _entries_out}
_WRITERS = {
    cls: (tag, tuple((name, _FIELD_WRITERS.get(name)) for name in cls.__dataclass_fields__))
    for cls, tag in _TAGS.items()
}


def _append_out(m: msg.Append, cache: EntryCache | None) -> list[Any]:
    prev = m.prev
    return [
        "append",
        {
            "epoch": m.epoch,
            "prev": [prev.epoch, prev.index],
            "entries": _entries_out(m.entries, cache),
            "commit": m.commit,
            "seq": m.seq,
        },
    ]


def _append_ack_out(m: msg.AppendAck, _cache: EntryCache | None) -> list[Any]:
    return ["append_ack", {"epoch": m.epoch, "match": m.match, "seq": m.seq}]


def _heartbeat_out(m: msg.Heartbeat, _cache: EntryCache | None) -> list[Any]:
    prev = m.prev
    return [
        "heartbeat",
        {"epoch": m.epoch, "commit": m.commit, "seq": m.seq, "prev": [prev.epoch, prev.index]},
    ]


def _heartbeat_ack_out(m: msg.HeartbeatAck, _cache: EntryCache | None) -> list[Any]:
    return ["heartbeat_ack", {"epoch": m.epoch, "seq": m.seq}]


# The common messages written field by field (what the generic writer below writes for them, in the same
# order, without its per-field lookups: the tests compare both).
_FAST_WRITERS: dict[type, Callable[[Any, EntryCache | None], list[Any]]] = {
    msg.Append: _append_out,
    msg.AppendAck: _append_ack_out,
    msg.Heartbeat: _heartbeat_out,
    msg.HeartbeatAck: _heartbeat_ack_out,
}


def encode_message(m: msg.Message, cache: EntryCache | None = None) -> list[Any]:
    fast = _FAST_WRITERS.get(type(m))
    if fast is not None:
        return fast(m, cache)
    return encode_message_generic(m, cache)


def encode_message_generic(m: msg.Message, cache: EntryCache | None = None) -> list[Any]:
    """Any message, each field through its writer (what :func:`encode_message` does for the others)."""
    tag, fields = _WRITERS[type(m)]
    return [
        tag,
        {
            name: getattr(m, name) if write is None else write(getattr(m, name), cache)
            for name, write in fields
        },
    ]


class Batch(NamedTuple):
    sender: str  # identity
    address: str
    messages: list[msg.Message]
    cluster: str  # the sender's cluster when it made these messages ("" if it had none)


def encode_batch(
    sender: str,
    address: str,
    messages: list[msg.Message] | tuple[msg.Message, ...],
    cluster: str = "",
    *,
    cache: EntryCache | None = None,
) -> bytes:
    """The batch's bytes; with ``cache``, entries it already holds are not encoded again (the bytes are the
    same either way)."""
    body = {
        "v": BATCH_VERSION,
        "from": sender,
        "addr": address,
        "msgs": [encode_message(m, cache) for m in messages],
    }
    if cluster:
        body["cluster"] = cluster
    return orjson.dumps(body)


def _int(v: Any, name: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_NUMBER:
        raise CodecError(f"{name} must be an integer in 0..2**63-1")
    return v


def _logid(v: Any, name: str) -> msg.LogId:
    if not isinstance(v, list) or len(v) != 2:
        raise CodecError(f"{name} must be [epoch, index]")
    return msg.LogId(_int(v[0], name), _int(v[1], name))


def _entry(v: Any) -> msg.Entry:
    kind = _KINDS.get(v[2]) if isinstance(v, list) and len(v) == 4 and isinstance(v[2], str) else None
    if kind is None:
        raise CodecError("an entry must be [epoch, index, kind, payload]")
    return msg.Entry(_int(v[0], "epoch"), _int(v[1], "index"), kind, _unb64(v[3]))


def _entries(v: Any) -> tuple[msg.Entry, ...]:
    if not isinstance(v, list):
        raise CodecError("entries must be a list")
    return tuple([_entry(e) for e in v])


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str) or len(v) > 256:
        raise CodecError(f"{name} must be a short string")
    return v


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise CodecError(f"{name} must be a boolean")
    return v


_FIELD_PARSERS = {
    "epoch": _int, "index": _int, "commit": _int, "seq": _int, "match": _int, "rejected": _int, "hint": _int,
    "promised": _int, "start": _int,
    "last": _logid, "prev": _logid, "snapshot": _logid,
    "entries": lambda v, _n: _entries(v),
    "reason": _str,
    "handover": _bool, "leaving": _bool,
}  # fmt: skip


class _Reader(NamedTuple):
    """How one message type is read: its class, its fields with their parsers (in order), every field name
    and the required ones. Fields with a default were added later (a compatible extension): a sender may
    omit them."""

    cls: type
    fields: tuple[tuple[str, Callable[[Any, str], Any]], ...]
    names: frozenset[str]
    required: frozenset[str]


_READERS = {
    tag: _Reader(
        cls,
        tuple((name, _FIELD_PARSERS[name]) for name in cls.__dataclass_fields__),
        frozenset(cls.__dataclass_fields__),
        frozenset(n for n, f in cls.__dataclass_fields__.items() if f.default is dataclasses.MISSING),
    )
    for tag, cls in _TYPES.items()
}


# --- the common messages, read without the generic reader ----------------------------------------------------
#
# Why: a follower reads an Append (and a leader an AppendAck, both a Heartbeat or its ack) for every write and
# heartbeat; the generic reader calls a parser per field and builds each value through the dataclass
# ``__init__``, which for a frozen dataclass sets every field through ``object.__setattr__`` (about three
# times what setting its slots directly costs). These readers check the very conditions the generic one
# checks (exact field set, integer ranges, LogId and entry shapes, base64) inline and build the values by
# their slots (node.core.slots); anything they do not accept goes to the generic reader, which accepts it or says why not,
# so what is accepted and refused is unchanged (the tests compare both readers on any JSON).

_new = object.__new__
_LOGID_EPOCH, _LOGID_INDEX = slot_setters(msg.LogId)
_ENTRY_EPOCH, _ENTRY_INDEX, _ENTRY_KIND, _ENTRY_PAYLOAD = slot_setters(msg.Entry)
_APPEND_EPOCH, _APPEND_PREV, _APPEND_ENTRIES, _APPEND_COMMIT, _APPEND_SEQ = slot_setters(msg.Append)
_ACK_EPOCH, _ACK_MATCH, _ACK_SEQ = slot_setters(msg.AppendAck)
_HB_EPOCH, _HB_COMMIT, _HB_SEQ, _HB_PREV = slot_setters(msg.Heartbeat)
_HB_ACK_EPOCH, _HB_ACK_SEQ = slot_setters(msg.HeartbeatAck)
_a2b_base64 = binascii.a2b_base64


def _fast_logid(v: Any) -> msg.LogId | None:
    if type(v) is not list or len(v) != 2:
        return None
    epoch, index = v
    if (
        type(epoch) is not int
        or type(index) is not int
        or not (0 <= epoch <= MAX_NUMBER and 0 <= index <= MAX_NUMBER)
    ):
        return None
    out = _new(msg.LogId)
    _LOGID_EPOCH(out, epoch)
    _LOGID_INDEX(out, index)
    return out


def _fast_entries(v: Any) -> tuple[msg.Entry, ...] | None:
    if type(v) is not list:
        return None
    out = []
    kinds, new, entry_cls = _KINDS, _new, msg.Entry
    for item in v:
        if type(item) is not list or len(item) != 4:
            return None
        epoch, index, kind_text, text = item
        if (
            type(epoch) is not int or type(index) is not int or type(kind_text) is not str or type(text) is not str
            or not (0 <= epoch <= MAX_NUMBER and 0 <= index <= MAX_NUMBER)
        ):  # fmt: skip
            return None
        kind = kinds.get(kind_text)
        if kind is None:
            return None
        try:
            payload = _a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        entry = new(entry_cls)
        _ENTRY_EPOCH(entry, epoch)
        _ENTRY_INDEX(entry, index)
        _ENTRY_KIND(entry, kind)
        _ENTRY_PAYLOAD(entry, payload)
        out.append(entry)
    return tuple(out)


def _fast_append(body: dict[str, Any]) -> msg.Append | None:
    if len(body) != 5:
        return None
    try:
        epoch, prev, entries, commit, seq = (
            body["epoch"],
            body["prev"],
            body["entries"],
            body["commit"],
            body["seq"],
        )
    except KeyError:
        return None
    if (
        type(epoch) is not int or type(commit) is not int or type(seq) is not int
        or not (0 <= epoch <= MAX_NUMBER and 0 <= commit <= MAX_NUMBER and 0 <= seq <= MAX_NUMBER)
    ):  # fmt: skip
        return None
    prev_id = _fast_logid(prev)
    if prev_id is None:
        return None
    read = _fast_entries(entries)
    if read is None:
        return None
    out = _new(msg.Append)
    _APPEND_EPOCH(out, epoch)
    _APPEND_PREV(out, prev_id)
    _APPEND_ENTRIES(out, read)
    _APPEND_COMMIT(out, commit)
    _APPEND_SEQ(out, seq)
    return out


def _fast_append_ack(body: dict[str, Any]) -> msg.AppendAck | None:
    if len(body) != 3:
        return None
    try:
        epoch, match, seq = body["epoch"], body["match"], body["seq"]
    except KeyError:
        return None
    if (
        type(epoch) is not int or type(match) is not int or type(seq) is not int
        or not (0 <= epoch <= MAX_NUMBER and 0 <= match <= MAX_NUMBER and 0 <= seq <= MAX_NUMBER)
    ):  # fmt: skip
        return None
    out = _new(msg.AppendAck)
    _ACK_EPOCH(out, epoch)
    _ACK_MATCH(out, match)
    _ACK_SEQ(out, seq)
    return out


def _fast_heartbeat(body: dict[str, Any]) -> msg.Heartbeat | None:
    if len(body) != 4:
        return None  # without ``prev`` (an earlier release): the generic reader
    try:
        epoch, commit, seq, prev = body["epoch"], body["commit"], body["seq"], body["prev"]
    except KeyError:
        return None
    if (
        type(epoch) is not int or type(commit) is not int or type(seq) is not int
        or not (0 <= epoch <= MAX_NUMBER and 0 <= commit <= MAX_NUMBER and 0 <= seq <= MAX_NUMBER)
    ):  # fmt: skip
        return None
    prev_id = _fast_logid(prev)
    if prev_id is None:
        return None
    out = _new(msg.Heartbeat)
    _HB_EPOCH(out, epoch)
    _HB_COMMIT(out, commit)
    _HB_SEQ(out, seq)
    _HB_PREV(out, prev_id)
    return out


def _fast_heartbeat_ack(body: dict[str, Any]) -> msg.HeartbeatAck | None:
    if len(body) != 2:
        return None
    try:
        epoch, seq = body["epoch"], body["seq"]
    except KeyError:
        return None
    if (
        type(epoch) is not int
        or type(seq) is not int
        or not (0 <= epoch <= MAX_NUMBER and 0 <= seq <= MAX_NUMBER)
    ):
        return None
    out = _new(msg.HeartbeatAck)
    _HB_ACK_EPOCH(out, epoch)
    _HB_ACK_SEQ(out, seq)
    return out


_FAST_READERS: dict[str, Callable[[dict[str, Any]], msg.Message | None]] = {
    "append": _fast_append,
    "append_ack": _fast_append_ack,
    "heartbeat": _fast_heartbeat,
    "heartbeat_ack": _fast_heartbeat_ack,
}


def decode_message(item: Any) -> msg.Message:
    if type(item) is list and len(item) == 2:
        tag, body = item
        if type(tag) is str and type(body) is dict:
            fast = _FAST_READERS.get(tag)
            if fast is not None:
                message = fast(body)
                if message is not None:
                    return message
    return decode_message_generic(item)


def decode_message_generic(item: Any) -> msg.Message:
    """Any message, each field through its parser (what :func:`decode_message` falls back to)."""
    if not isinstance(item, list) or len(item) != 2:
        raise CodecError("a message must be [known type, {fields}]")
    tag, body = item
    reader = _READERS.get(tag) if isinstance(tag, str) else None
    if reader is None or not isinstance(body, dict):
        raise CodecError("a message must be [known type, {fields}]")
    keys = body.keys()
    if keys == reader.names:  # every field: the common case, read in field order
        return reader.cls(*[parse(body[name], name) for name, parse in reader.fields])
    if not reader.required <= keys <= reader.names:
        raise CodecError(
            f"{tag} needs the fields {sorted(reader.required)} "
            f"(optional: {sorted(reader.names - reader.required)})"
        )
    return reader.cls(**{name: parse(body[name], name) for name, parse in reader.fields if name in body})


def decode_batch(data: bytes) -> Batch:
    """The batch; CodecError for anything else. ``cluster`` is optional (a release that did not name
    clusters sends none)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CodecError("a batch is a JSON object")
    if body.get("v") != BATCH_VERSION:
        raise CodecError(f"unknown batch version {body.get('v')!r}")
    sender, address, items = body.get("from"), body.get("addr"), body.get("msgs")
    if not isinstance(sender, str) or not 0 < len(sender) <= MAX_IDENTITY_CHARS:
        raise CodecError("from must be the sender's identity")
    if not isinstance(address, str) or len(address) > 64:
        raise CodecError("addr must be the sender's address")
    if not isinstance(items, list) or len(items) > MAX_MESSAGES_PER_BATCH:
        raise CodecError(f"msgs must be a list of at most {MAX_MESSAGES_PER_BATCH} messages")
    cluster = body.get("cluster", "")
    if not isinstance(cluster, str) or len(cluster) > MAX_IDENTITY_CHARS:
        raise CodecError("cluster must be the sender's cluster name")
    return Batch(sender, address, [decode_message(i) for i in items], cluster)


# --- the stream: the same batches as frames of one long-lived, authenticated connection --------------------
#
# Why: a POST per batch costs a request, a response and their parsing on both nodes for every hop, which on a
# busy machine is most of a replicated write's time. A stream (a WebSocket on the node's HTTP port) carries
# the same batch bodies as binary frames and answers none of them. Its opening request is signed like a
# batch (``peerauth`` header over the path, the sender address and the hello below, replay-guarded); every
# frame then carries its own MAC over that opening's (incarnation, seq), the frame's number and its body, so
# a frame cannot be forged, changed, replayed, reordered or moved to another stream. Frame, version 1:
#
#     b"TNR" 0x01 | seq: 8 bytes big-endian, 1, 2, 3... | HMAC-SHA256: 32 bytes | body: a batch as above
#
# The hello (the opening request's ``X-TalentNest-Stream`` header): ``{"v": 1, "from": <identity>,
# "addr": "ip:port"}``; every batch of the stream must name the same sender and address.

STREAM_VERSION = 1
FRAME_MAGIC = b"TNR\x01"
_SEQ_BYTES = 8
_MAC_BYTES = 32
FRAME_HEADER_BYTES = len(FRAME_MAGIC) + _SEQ_BYTES + _MAC_BYTES
_STREAM_LABEL = b"talentnest/replication-stream/v1\n"


def encode_hello(sender: str, address: str) -> bytes:
    return orjson.dumps({"v": STREAM_VERSION, "from": sender, "addr": address})


def decode_hello(data: bytes) -> tuple[str, str]:
    """(sender identity, sender address) of a stream's hello; CodecError for anything else."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != STREAM_VERSION or set(body) != {"v", "from", "addr"}:
        raise CodecError(f"a stream hello is {{'v': {STREAM_VERSION}, 'from': ..., 'addr': ...}}")
    sender, address = body["from"], body["addr"]
    if not isinstance(sender, str) or not 0 < len(sender) <= MAX_IDENTITY_CHARS:
        raise CodecError("from must be the sender's identity")
    if not isinstance(address, str) or len(address) > 64:
        raise CodecError("addr must be the sender's address")
    return sender, address


_SHA256_BLOCK_BYTES = 64


class FrameMac:
    """The MAC of one stream's frames: bound to the opening request's (sender address, incarnation, seq),
    which the receiver accepted once (replay guard), so frames of one stream never verify on another.

    It is HMAC-SHA256(key, label + binding + frame number + body), computed as RFC 2104 defines it from two
    SHA-256 states (the key's inner pad with the label and binding already hashed, and its outer pad) that
    are copied per frame. Why not ``hmac.HMAC.copy``: copying OpenSSL's HMAC context costs about twice as
    much as copying two digest states, through a Python wrapper; and a one-shot ``hmac.digest`` hashes the
    key's pads again for every frame. The bytes are the same (the tests compare them with ``hmac``)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, address: str, incarnation: int, seq: int) -> None:
        binding = f"{address}\n{incarnation}\n{seq}\n".encode()
        if len(key) > _SHA256_BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK_BYTES, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + _STREAM_LABEL + binding)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def of(self, seq: int, body: bytes) -> bytes:
        return self.of_numbered(seq.to_bytes(_SEQ_BYTES, "big"), body)

    def of_numbered(self, seq_bytes: bytes, body: bytes) -> bytes:
        """:meth:`of` with the frame number already as its 8 bytes (as the frame carries it)."""
        inner = self._inner.copy()
        inner.update(seq_bytes)
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def encode_frame(mac: FrameMac, seq: int, body: bytes) -> bytes:
    if not 0 < seq <= MAX_NUMBER:
        raise ValueError("frame numbers are 1..2**63-1")
    seq_bytes = seq.to_bytes(_SEQ_BYTES, "big")
    return b"".join((FRAME_MAGIC, seq_bytes, mac.of_numbered(seq_bytes, body), body))


def decode_frame(mac: FrameMac, expected_seq: int, frame: bytes) -> bytes:
    """The body of the frame numbered ``expected_seq`` (a stream is in order, none skipped); CodecError for a
    frame of another version, out of order, or whose MAC is wrong."""
    if len(frame) < FRAME_HEADER_BYTES or frame[: len(FRAME_MAGIC)] != FRAME_MAGIC:
        raise CodecError("not a version 1 replication frame")
    start = len(FRAME_MAGIC)
    seq_bytes = frame[start : start + _SEQ_BYTES]
    seq = int.from_bytes(seq_bytes, "big")
    if seq != expected_seq:
        raise CodecError(f"frame {seq} where {expected_seq} was due")
    body = frame[FRAME_HEADER_BYTES:]
    if not hmac.compare_digest(
        frame[start + _SEQ_BYTES : FRAME_HEADER_BYTES], mac.of_numbered(seq_bytes, body)
    ):
        raise CodecError("frame MAC does not verify")
    return body


# --- command payloads ---------------------------------------------------------------------------------------


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _param(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"b64": _b64(v)}
    if isinstance(v, float) and not math.isfinite(v):
        # JSON has no infinity: orjson would write null, and a replica would bind NULL instead.
        return {"f": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    return v


def _unparam(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"f"} and v["f"] in _NON_FINITE:
            return _NON_FINITE[v["f"]]
        if set(v) != {"b64"}:
            raise CodecError("a parameter object must be {'b64': ...} or {'f': 'inf' | '-inf' | 'nan'}")
        return _unb64(v["b64"])
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise CodecError("a parameter must be null, a number, text or {'b64': ...}")


def _load_body(part: LoadChunk | LoadEnd | LoadFile) -> dict[str, Any]:
    if isinstance(part, LoadFile):
        return {"file": {"sha256": part.sha256, "size": part.size_bytes}}
    if isinstance(part, LoadChunk):
        return {"id": part.load_id, "seq": part.seq, "sql": list(part.statements)}
    end = {"chunks": part.chunks, "stmts": part.statements, "digest": part.digest, "abort": part.abort}
    return {"id": part.load_id, "end": end}


def _load_part(body: Any) -> LoadChunk | LoadEnd | LoadFile:
    if not isinstance(body, dict):
        raise CodecError("load must be an object")
    if set(body) == {"file"}:
        file = body["file"]
        if not isinstance(file, dict) or set(file) != {"sha256", "size"}:
            raise CodecError("a file load needs exactly sha256 and size")
        sha256 = file["sha256"]
        if not isinstance(sha256, str) or len(sha256) != 64 or sha256.strip("0123456789abcdef"):
            raise CodecError("file sha256 must be 64 lowercase hex digits")
        return LoadFile(sha256, _int(file["size"], "size"))
    load_id = body.get("id")
    if not isinstance(load_id, str) or not 0 < len(load_id) <= MAX_LOAD_ID_CHARS:
        raise CodecError("load id must be a short string")
    if set(body) == {"id", "seq", "sql"}:
        sql = body["sql"]
        if not isinstance(sql, list) or not all(isinstance(x, str) for x in sql):
            raise CodecError("load sql must be a list of statements")
        return LoadChunk(load_id, _int(body["seq"], "seq"), tuple(sql))
    if set(body) == {"id", "end"} and isinstance(body["end"], dict):
        end = body["end"]
        if set(end) != {"chunks", "stmts", "digest", "abort"}:
            raise CodecError("load end needs exactly chunks, stmts, digest and abort")
        digest = end["digest"]
        if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise CodecError("load digest must be 64 lowercase hex digits")
        return LoadEnd(
            load_id, _int(end["chunks"], "chunks"), _int(end["stmts"], "stmts"), digest,
            _bool(end["abort"], "abort"),
        )  # fmt: skip
    raise CodecError("load must be a chunk {id, seq, sql} or an end {id, end}")


def encode_command(command: Command) -> bytes:
    """Version 2, stamped with ``command.sqlite_version`` or else the SQLite this process runs (the leader's:
    only a leader encodes commands)."""
    stmts = []
    for s in command.write.statements:
        params: Any = None
        if isinstance(s.params, Mapping):
            params = {k: _param(v) for k, v in s.params.items()}
        elif s.params is not None:
            params = [_param(v) for v in s.params]
        stmts.append([s.sql, params])
    body: dict[str, Any] = {
        "v": COMMAND_VERSION,
        "sq": command.sqlite_version or apsw.sqlite_lib_version(),
        "stmts": stmts,
        "tx": command.write.transaction,
        "t": command.write.time_ns,
        "seed": command.write.seed,
        "u": command.unified,
        "c": command.client,
        "rid": command.request_id,
    }
    if command.load is not None:
        body["load"] = _load_body(command.load)
    return orjson.dumps(body)


# Why the values below are built by their slots (node.core.slots): a follower decodes every entry it applies,
# and the frozen dataclasses' ``__init__`` (a Python-level ``object.__setattr__`` per field) was more than
# half of the decoding after orjson. The objects are the same (the tests compare them with the constructors).
_STATEMENT_SQL, _STATEMENT_PARAMS = slot_setters(Statement)
_WRITE_STATEMENTS, _WRITE_TX, _WRITE_TIME, _WRITE_SEED = slot_setters(WriteCommand)
_CMD_WRITE, _CMD_UNIFIED, _CMD_CLIENT, _CMD_RID, _CMD_SQLITE, _CMD_LOAD = slot_setters(Command)
# The values ``_unparam`` returns unchanged, by exact type (what orjson makes of JSON scalars): the others
# (objects, lists, and anything a subclass could be) go through it.
_PLAIN_PARAMS = frozenset({str, int, float, bool, type(None)})


def decode_command(data: bytes) -> Command:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not JSON: {exc}") from None
    version = body.get("v") if isinstance(body, dict) else None
    # type() first: an unhashable "v" (a list, an object) must be refused, not raise TypeError at the lookup.
    if type(version) is not int or version not in COMMAND_VERSIONS:
        raise CodecError("unknown command version")
    plain, new = _PLAIN_PARAMS, _new
    try:
        statements = []
        for sql, params in body["stmts"]:
            if not isinstance(sql, str):
                raise CodecError("sql must be text")
            if isinstance(params, dict):
                params = {str(k): v if type(v) in plain else _unparam(v) for k, v in params.items()}
            elif isinstance(params, list):
                params = tuple([v if type(v) in plain else _unparam(v) for v in params])
            elif params is not None:
                raise CodecError("params must be a list, an object or null")
            statement = new(Statement)
            _STATEMENT_SQL(statement, sql)
            _STATEMENT_PARAMS(statement, params)
            statements.append(statement)
        # In this order: a command missing several of them is refused naming the first.
        tx, time_ns, seed, unified, client, rid = (
            body["tx"], body["t"], body["seed"], body["u"], body["c"], body["rid"]
        )  # fmt: skip
        if not isinstance(tx, bool) or not isinstance(unified, bool):
            raise CodecError("tx and u must be booleans")
        if type(time_ns) is not int or type(seed) is not int:
            raise CodecError("t and seed must be integers")
        if not isinstance(client, str) or not (rid is None or isinstance(rid, str)):
            raise CodecError("c must be text and rid text or null")
        write = new(WriteCommand)
        _WRITE_STATEMENTS(write, tuple(statements))
        _WRITE_TX(write, tx)
        _WRITE_TIME(write, time_ns)
        _WRITE_SEED(write, seed)
        sqlite_version: str | None = None
        load: LoadChunk | LoadEnd | LoadFile | None = None
        if version >= 2:
            sqlite_version = body["sq"]
            if not isinstance(sqlite_version, str) or not 0 < len(sqlite_version) <= MAX_SQLITE_VERSION_CHARS:
                raise CodecError("sq must be the SQLite version text")
            if "load" in body:
                if statements:
                    raise CodecError("a load command carries no statements of its own")
                load = _load_part(body["load"])
        command = new(Command)
        _CMD_WRITE(command, write)
        _CMD_UNIFIED(command, unified)
        _CMD_CLIENT(command, client)
        _CMD_RID(command, rid)
        _CMD_SQLITE(command, sqlite_version)
        _CMD_LOAD(command, load)
        return command
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"malformed command: {exc!r}") from None
