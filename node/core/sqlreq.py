"""Data API requests as values: parsing and validation of bodies and query flags, and write commands.

Everything here is pure. The HTTP layer hands in the decoded JSON body (or a text statement) and the query
string; it gets back frozen values or a :class:`node.errors.NodeError` saying what is wrong (400, or 413
for too many statements). The storage layer executes the values.

Shapes follow rqlite's HTTP API (see the README's "Data API"):

* ``["CREATE TABLE ...", "INSERT ..."]``                               plain statements
* ``[["INSERT ... VALUES(?, ?)", "fiona", 20]]``                       positional parameters
* ``[["INSERT ... VALUES(:name, :age)", {"name": "fiona", "age": 20}]]`` named parameters

Values: JSON integers (64-bit), floats, strings, booleans (as 1/0), null, an array of 0-255 integers (a
BLOB) and a string that is an SQLite hex literal ``x'0a1b'`` (a BLOB, as rqlite does).

**Writes and determinism.** A write is described by a :class:`WriteCommand`: the statements plus one
timestamp and one random seed, chosen once (by the node that accepts the write; with replication, the
leader) and carried with the command. Executing the same command on two copies of the same database gives
the same result: the storage layer answers ``random()``/``randomblob()`` from the seed and every ``'now'``
from the timestamp, and :func:`rewrite_time_keywords` turns ``CURRENT_TIMESTAMP``/``CURRENT_DATE``/
``CURRENT_TIME`` (which SQLite evaluates from its own clock) into calls of those overridable functions.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from node import errors

Value = None | int | float | str | bytes
Params = tuple[Value, ...] | Mapping[str, Value]

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class Level(enum.Enum):
    """Read consistency levels (rqlite's). On a single node every level reads the local database."""

    NONE = "none"
    WEAK = "weak"
    LINEARIZABLE = "linearizable"
    STRONG = "strong"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    # Positional values, named values (without the leading ':'), or None for a plain statement.
    params: Params | None = None


@dataclass(frozen=True, slots=True)
class Flags:
    transaction: bool = False
    timings: bool = False
    associative: bool = False
    pretty: bool = False
    blob_array: bool = False
    level: Level = Level.WEAK
    # Accepted for rqlite compatibility. With replication, a follower answers 301 to the leader instead of
    # forwarding the write; today every node serves its own database, so there is nothing to redirect to.
    redirect: bool = False
    # Per-statement time limit asked for by the client (``db_timeout``); never above the node's limit.
    db_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class DbRequest:
    statements: tuple[Statement, ...]
    flags: Flags


@dataclass(frozen=True, slots=True)
class WriteCommand:
    """A write, made deterministic: executing it twice on equal databases gives equal databases.

    ``time_ns`` (wall-clock nanoseconds since the epoch, UTC) answers every ``'now'``; ``seed`` drives
    ``random()`` and ``randomblob()``. Both are chosen once, where the write is accepted, and travel with it.
    """

    statements: tuple[Statement, ...]
    transaction: bool
    time_ns: int
    seed: int

    @property
    def now_text(self) -> str:
        """The timestamp as SQLite's date functions read it: ``YYYY-MM-DD HH:MM:SS.SSS`` (UTC)."""
        return utc_text(self.time_ns)


def utc_text(time_ns: int) -> str:
    """Nanoseconds since the epoch as ``YYYY-MM-DD HH:MM:SS.SSS`` UTC (ms truncated), by calendar arithmetic.

    Days to a civil date with the proleptic Gregorian calendar in 400-year eras (no clock, no time zone).
    """
    ms = time_ns // 1_000_000
    days, ms_of_day = divmod(ms, 86_400_000)
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    seconds, millis = divmod(ms_of_day, 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{year:04d}-{month:02d}-{day:02d} {hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


def stamp_write(request: DbRequest, *, time_ns: int, seed: int) -> WriteCommand:
    """Turn an accepted request into a write command carrying one time and one seed.

    The SQL is rewritten here, once, so that the command that travels is the one every copy executes.
    """
    statements = tuple(Statement(rewrite_time_keywords(s.sql), s.params) for s in request.statements)
    return WriteCommand(statements, request.flags.transaction, time_ns, seed & INT64_MAX)


# --- flags ---------------------------------------------------------------------------------------------------

_FALSE = frozenset({"false", "0", "no", "off"})
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _flag(query: Mapping[str, str], name: str) -> bool:
    """Presence flags need no value (``?transaction``); ``=false``/``=0`` turns one off explicitly."""
    if name not in query:
        return False
    return query[name].strip().lower() not in _FALSE


def parse_duration(text: str, name: str) -> float:
    """Go-style durations as rqlite takes them (``1s``, ``500ms``, ``1m30s``); a bare number is seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pos, total = 0, 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise errors.BadRequest(f"{name} is not a valid duration") from None
        value = total
    if not 0 < value < 1e9:
        raise errors.BadRequest(f"{name} is not a valid duration")
    return value


def parse_flags(query: Mapping[str, str]) -> Flags:
    raw_level = query.get("level", "").strip().lower()
    try:
        level = Level(raw_level)
    except ValueError:
        level = Level.WEAK  # rqlite: unknown or empty means weak
    db_timeout = query.get("db_timeout")
    return Flags(
        transaction=_flag(query, "transaction"),
        timings=_flag(query, "timings"),
        associative=_flag(query, "associative"),
        pretty=_flag(query, "pretty"),
        blob_array=_flag(query, "blob_array"),
        level=level,
        redirect=_flag(query, "redirect"),
        db_timeout_s=None if db_timeout is None else parse_duration(db_timeout, "db_timeout"),
    )


# --- bodies --------------------------------------------------------------------------------------------------

_HEX_LITERAL = re.compile(r"[xX]'((?:[0-9a-fA-F]{2})*)'")


def _value(raw: Any, where: str) -> Value:
    if raw is None or isinstance(raw, str | float):
        if isinstance(raw, str):
            match = _HEX_LITERAL.fullmatch(raw)
            if match:
                return binascii.unhexlify(match.group(1))
        return raw
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int):
        if not INT64_MIN <= raw <= INT64_MAX:
            raise errors.BadRequest(f"{where}: integer {raw} does not fit in 64 bits")
        return raw
    if isinstance(raw, list):
        if all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw):
            return bytes(raw)
        raise errors.BadRequest(f"{where}: an array value must be bytes (integers 0-255), a BLOB")
    raise errors.BadRequest(f"{where}: unsupported type {type(raw).__name__}")


def _statement(raw: Any, index: int) -> Statement:
    where = f"statement {index}"
    if isinstance(raw, str):
        return Statement(_sql(raw, where))
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise errors.BadRequest(
            f"invalid request: {where} must be an SQL string or an array [sql, values...]"
        )
    sql = _sql(raw[0], where)
    rest = raw[1:]
    if not rest:
        return Statement(sql)
    if len(rest) == 1 and isinstance(rest[0], dict):
        named = {}
        for key, value in rest[0].items():
            name = key[1:] if key[:1] in (":", "@", "$") else key
            if not name:
                raise errors.BadRequest(f"{where}: empty parameter name")
            named[name] = _value(value, f"{where} parameter {key!r}")
        return Statement(sql, MappingProxyType(named))
    if any(isinstance(v, dict) for v in rest):
        raise errors.BadRequest(f"{where}: named values must be the only element after the SQL")
    return Statement(sql, tuple(_value(v, f"{where} value {i + 1}") for i, v in enumerate(rest)))


def _sql(sql: str, where: str) -> str:
    if not sql.strip():
        raise errors.BadRequest(f"{where}: empty SQL statement")
    if "\x00" in sql:
        raise errors.BadRequest(f"{where}: SQL contains a NUL character")
    return sql


def parse_statements(body: Any, *, max_statements: int) -> tuple[Statement, ...]:
    """A decoded JSON body to statements; 400 for the wrong shape, 413 past ``max_statements``."""
    if not isinstance(body, list):
        raise errors.BadRequest("invalid request: the body must be a JSON array of statements")
    if not body:
        raise errors.BadRequest("no statements")
    if len(body) > max_statements:
        raise errors.PayloadTooLarge(
            f"too many statements: {len(body)} in one request, at most {max_statements}",
            limit=max_statements,
        )
    return tuple(_statement(raw, i) for i, raw in enumerate(body))


def parse_text_statement(text: str) -> tuple[Statement, ...]:
    """A ``text/plain`` body or a ``q=`` query parameter: one statement."""
    return (Statement(_sql(text, "statement 0")),)


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.BadRequest("body is not UTF-8 text") from None


# --- results -------------------------------------------------------------------------------------------------


def encode_value(value: Value, *, blob_array: bool) -> Any:
    """A result value to JSON: BLOBs as standard base64 (rqlite's default) or an array of byte values."""
    if isinstance(value, bytes):
        return list(value) if blob_array else base64.b64encode(value).decode("ascii")
    return value


# --- time keywords -------------------------------------------------------------------------------------------

_TIME_KEYWORDS = {
    "CURRENT_TIMESTAMP": "(datetime('now'))",
    "CURRENT_DATE": "(date('now'))",
    "CURRENT_TIME": "(time('now'))",
}


def rewrite_time_keywords(sql: str) -> str:
    """Replace the keywords CURRENT_TIMESTAMP/_DATE/_TIME outside literals, identifiers and comments.

    They read SQLite's clock, which no function can override; ``(datetime('now'))`` and friends give the
    same text and can be. The parentheses keep the result valid where SQLite wants an expression in
    parentheses (``DEFAULT (datetime('now'))`` in a column definition).
    """
    if "current_" not in sql.lower():
        return sql
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            end = i + 1
            while end < n:
                if sql[end] == ch:
                    if end + 1 < n and sql[end + 1] == ch:  # doubled quote inside the literal
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1])
            i = end + 1
        elif ch == "[":
            end = sql.find("]", i + 1)
            end = n - 1 if end < 0 else end
            out.append(sql[i : end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end])
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end])
            i = end
        elif ch.isalnum() or ch in "_$" or ord(ch) > 127:
            end = i + 1
            while end < n and (sql[end].isalnum() or sql[end] in "_$" or ord(sql[end]) > 127):
                end += 1
            word = sql[i:end]
            out.append(_TIME_KEYWORDS.get(word.upper(), word))
            i = end
        else:
            out.append(ch)
            i += 1
    return "".join(out)
