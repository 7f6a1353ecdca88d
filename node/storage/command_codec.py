"""Log entry payloads: write commands (and load markers) as versioned bytes.

Why a codec of its own: a log entry outlives the process that wrote it (it is replayed at the next start
and, with replication, shipped to other nodes running another release). So every payload starts with a
format version byte, and a reader refuses a version it does not know (:class:`CommandFormatError`) instead
of guessing; a later release adds a version and keeps reading the old ones.

Kinds (the log's ``kind`` field, see :mod:`node.storage.log`):

* :data:`KIND_COMMANDS`: one or more client write commands, applied together as one log entry. Version 1
  payload: ``0x01`` then the orjson encoding of ``[[statements, transaction, time_ns, seed, unified,
  client, request_id], ...]`` where a statement is ``[sql, params]`` and ``params`` is ``null``, a list of
  values (positional) or ``{"n": {name: value}}`` (named). Values are JSON null/integer/float/string, except
  that a BLOB is ``{"b": base64}``, a non-finite float ``{"x": float.hex()}`` and a string JSON cannot hold
  (a lone surrogate, which a JSON body may carry as an escape) ``{"s": base64 of UTF-8 surrogatepass}``.
  Everything that makes a command deterministic travels with it (the stamped SQL, one time, one seed), so
  replaying an entry gives what applying it gave.
* :data:`KIND_LOAD_MARKER`: a /db/load happened at this index. The loaded data is NOT in the log (a dump or
  file may exceed the 64 MiB entry cap); replay cannot repeat it and skips the marker. Version 1 payload:
  ``0x01`` then orjson ``{"load": "dump"|"sqlite"}``. Why that is sound: see :mod:`node.service`.

Pure functions; encoding and decoding run off the event loop (the submit path runs them in a thread).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import orjson

from node.core.sqlreq import Statement, WriteCommand
from node.storage.statemachine import Command

KIND_COMMANDS = 1
KIND_LOAD_MARKER = 2
KINDS = frozenset({KIND_COMMANDS, KIND_LOAD_MARKER})
FORMAT_VERSION = 1
READABLE_VERSIONS = frozenset({FORMAT_VERSION})
LOAD_KINDS = frozenset({"dump", "sqlite"})


class CommandFormatError(ValueError):
    """A payload this release cannot read: an unknown format version or kind, or damaged content."""


def encode_commands(commands: Sequence[Command]) -> bytes:
    """The payload of a :data:`KIND_COMMANDS` entry."""
    body = [_command_out(c, plain=True) for c in commands]
    try:
        data = orjson.dumps(body)
    except (orjson.JSONEncodeError, TypeError):
        # A string orjson refuses (a lone surrogate): the slow path tags such strings. Rare: only JSON escapes
        # produce them, so the common path stays one C call.
        data = orjson.dumps([_command_out(c, plain=False) for c in commands])
    return bytes((FORMAT_VERSION,)) + data


def decode_commands(payload: bytes) -> tuple[Command, ...]:
    body = _body(payload)
    if not isinstance(body, list):
        raise CommandFormatError("commands payload is not a list")
    try:
        return tuple(_command_in(item) for item in body)
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        if isinstance(exc, CommandFormatError):
            raise
        raise CommandFormatError(f"malformed command: {exc}") from exc


def encode_load_marker(load: str) -> bytes:
    if load not in LOAD_KINDS:
        raise ValueError(f"unknown load kind {load!r}")
    return bytes((FORMAT_VERSION,)) + orjson.dumps({"load": load})


def decode_load_marker(payload: bytes) -> str:
    body = _body(payload)
    if not isinstance(body, dict) or body.get("load") not in LOAD_KINDS:
        raise CommandFormatError("malformed load marker")
    return str(body["load"])


def _body(payload: bytes) -> Any:
    if not payload:
        raise CommandFormatError("empty payload")
    version = payload[0]
    if version not in READABLE_VERSIONS:
        raise CommandFormatError(
            f"log entry format version {version} is unknown to this release (it reads "
            f"{', '.join(map(str, sorted(READABLE_VERSIONS)))}): written by a newer release?"
        )
    try:
        return orjson.loads(payload[1:])
    except orjson.JSONDecodeError as exc:
        raise CommandFormatError(f"payload is not valid: {exc}") from exc


def _command_out(command: Command, *, plain: bool) -> list[Any]:
    write = command.write
    text = _text_out if not plain else _same
    return [
        [[text(s.sql), _params_out(s.params, plain)] for s in write.statements],
        write.transaction, write.time_ns, write.seed, command.unified, text(command.client),
        None if command.request_id is None else text(command.request_id),
    ]  # fmt: skip


def _params_out(params: Any, plain: bool) -> Any:
    if params is None:
        return None
    if hasattr(params, "items"):
        return {"n": {(k if plain else _key_out(k)): _value_out(v, plain) for k, v in params.items()}}
    return [_value_out(v, plain) for v in params]


def _same(value: Any) -> Any:
    return value


def _value_out(value: Any, plain: bool) -> Any:
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"x": value.hex()}
    if isinstance(value, str) and not plain:
        return _text_out(value)
    return value


def _text_out(text: str) -> Any:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return {"s": base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")}
    return text


def _key_out(key: str) -> str:
    # Parameter names come from SQL text matched by a pattern of word characters: never surrogates. If one
    # were, orjson refuses it and the write fails as a whole (400/503), never silently altered.
    return key


def _command_in(item: Any) -> Command:
    statements, transaction, time_ns, seed, unified, client, request_id = item
    if not isinstance(transaction, bool) or not isinstance(unified, bool):
        raise CommandFormatError("flags must be booleans")
    if not _is_int(time_ns) or not _is_int(seed):
        raise CommandFormatError("time and seed must be integers")
    write = WriteCommand(tuple(_statement_in(s) for s in statements), transaction, time_ns, seed)
    rid = None if request_id is None else _text_in(request_id)
    return Command(write, unified=unified, client=_text_in(client), request_id=rid)


def _statement_in(raw: Any) -> Statement:
    sql, params = raw
    if params is None:
        return Statement(_text_in(sql))
    if isinstance(params, dict):
        named = params["n"]
        if not isinstance(named, dict):
            raise CommandFormatError("named parameters must be an object")
        return Statement(_text_in(sql), MappingProxyType({k: _value_in(v) for k, v in named.items()}))
    if not isinstance(params, list):
        raise CommandFormatError("parameters must be a list or an object")
    return Statement(_text_in(sql), tuple(_value_in(v) for v in params))


def _value_in(raw: Any) -> Any:
    if isinstance(raw, dict):
        if len(raw) != 1:
            raise CommandFormatError("a tagged value has exactly one tag")
        ((tag, data),) = raw.items()
        if tag == "b":
            return base64.b64decode(data, validate=True)
        if tag == "x":
            return float.fromhex(data)
        if tag == "s":
            return base64.b64decode(data, validate=True).decode("utf-8", "surrogatepass")
        raise CommandFormatError(f"unknown value tag {tag!r}")
    if raw is None or isinstance(raw, str | float) or _is_int(raw):
        return raw
    raise CommandFormatError(f"unsupported value {type(raw).__name__}")


def _text_in(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and set(raw) == {"s"}:
        return base64.b64decode(raw["s"], validate=True).decode("utf-8", "surrogatepass")
    raise CommandFormatError("text expected")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
