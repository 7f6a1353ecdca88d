"""Data API requests as values: parsing and validation of bodies and query flags, and write commands.

Everything here is pure. The HTTP layer hands in the decoded JSON body (or a text statement) and the query
string; it gets back frozen values or a :class:`node.errors.NodeError` saying what is wrong (400, or 413
for too many statements). The storage layer executes the values.

Shapes follow rqlite's HTTP API (see the README's "Data API"):

* ``["CREATE TABLE ...", "INSERT ..."]``                               plain statements
* ``[["INSERT ... VALUES(?, ?)", "fiona", 20]]``                       positional parameters
* ``[["INSERT ... VALUES(:name, :age)", {"name": "fiona", "age": 20}]]`` named parameters

Values: JSON integers (64-bit), floats, strings, booleans (as 1/0), null, an array of 0-255 integers (a
BLOB) and a string that is an SQLite hex literal ``x'0a1b'`` (a BLOB, as rqlite does). An integer outside
64 bits is refused (400), however it is written; JSON has no NaN or infinity.

**Parameters are checked before anything runs.** Each statement's SQL is scanned for the parameters SQLite
will find (``?``, ``?NNN``, ``:name``, ``@name``, ``$name``; outside literals, quoted identifiers and
comments) and the values must match exactly: every named parameter has a value and every value a
parameter; an array holds as many values as the SQL numbers (``?NNN`` counts as NNN); named values never go
with positional parameters nor the other way round. Otherwise the whole request is a 400 naming the
statement, and no statement of it has run: a client that retries does not repeat a write. A string holding
several statements (``"INSERT ...; INSERT ..."``) shares its values as SQLite binds them: an object serves
every statement, an array is consumed statement by statement.

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
import functools
import json
import math
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
    # rqlite's bounded staleness for ``level=none`` reads: fail unless this node heard from the leader within
    # ``freshness`` (and, with ``freshness_strict``, has applied what that leader had committed then).
    freshness_s: float | None = None
    freshness_strict: bool = False


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
    statements = tuple(_stamped(s) for s in request.statements)
    return WriteCommand(statements, request.flags.transaction, time_ns, seed & INT64_MAX)


def _stamped(statement: Statement) -> Statement:
    """The statement with its time keywords rewritten: the same (immutable) value when it has none."""
    sql = rewrite_time_keywords(statement.sql)
    return statement if sql is statement.sql else Statement(sql, statement.params)


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
    freshness = query.get("freshness")
    return Flags(
        transaction=_flag(query, "transaction"),
        timings=_flag(query, "timings"),
        associative=_flag(query, "associative"),
        pretty=_flag(query, "pretty"),
        blob_array=_flag(query, "blob_array"),
        level=level,
        redirect=_flag(query, "redirect"),
        db_timeout_s=None if db_timeout is None else parse_duration(db_timeout, "db_timeout"),
        freshness_s=None if freshness is None else parse_duration(freshness, "freshness"),
        freshness_strict=_flag(query, "freshness_strict"),
    )


# --- bodies --------------------------------------------------------------------------------------------------

_HEX_LITERAL = re.compile(r"[xX]'((?:[0-9a-fA-F]{2})*)'")
_TWO_63 = float(1 << 63)
_HEX_PREFIXES = ("x'", "X'")  # a string that may be an SQLite hex literal (a BLOB)
_NAME_PREFIXES = (":", "@", "$")


class _HugeFloat(Exception):
    """A float of 2^63 or more: maybe an integer literal the fast JSON parser could not keep exact."""


def _value(raw: Any, where: str, huge_floats: bool) -> Value:
    if raw is None:
        return None
    if isinstance(raw, str):
        match = _HEX_LITERAL.fullmatch(raw)
        return binascii.unhexlify(match.group(1)) if match else raw
    if isinstance(raw, float):
        if not huge_floats and abs(raw) >= _TWO_63:
            raise _HugeFloat
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


def _statement(raw: Any, index: int, huge_floats: bool) -> Statement:
    where = f"statement {index}"
    if isinstance(raw, str):
        return check_parameters(Statement(_sql(raw, where)), where)
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise errors.BadRequest(
            f"invalid request: {where} must be an SQL string or an array [sql, values...]"
        )
    sql = _sql(raw[0], where)
    rest = raw[1:]
    if not rest:
        return check_parameters(Statement(sql), where)
    if len(rest) == 1 and isinstance(rest[0], dict):
        named: dict[str, Value] = {}
        for key, value in rest[0].items():
            name = key[1:] if key[:1] in (":", "@", "$") else key
            if not name:
                raise errors.BadRequest(f"{where}: empty parameter name")
            if name in named:
                raise errors.BadRequest(
                    f"{where}: two values for parameter {name!r} (with and without prefix)"
                )
            named[name] = _value(value, f"{where} parameter {key!r}", huge_floats)
        return check_parameters(Statement(sql, MappingProxyType(named)), where)
    if any(isinstance(v, dict) for v in rest):
        raise errors.BadRequest(f"{where}: named values must be the only element after the SQL")
    values = tuple(_value(v, f"{where} value {i + 1}", huge_floats) for i, v in enumerate(rest))
    return check_parameters(Statement(sql, values), where)


def _sql(sql: str, where: str) -> str:
    if not sql.strip():
        raise errors.BadRequest(f"{where}: empty SQL statement")
    if "\x00" in sql:
        raise errors.BadRequest(f"{where}: SQL contains a NUL character")
    return sql


def parse_statements(body: Any, *, max_statements: int, raw: bytes | None = None) -> tuple[Statement, ...]:
    """A decoded JSON body to statements; 400 for the wrong shape or values, 413 past ``max_statements``.

    ``raw`` is the JSON text ``body`` was decoded from. The fast decoder turns an integer literal beyond
    64 bits into a float; when a value of 2^63 or more shows up, the text is decoded again exactly, so that
    such an integer is refused (400) instead of stored as a REAL, whatever its size. Requests without such
    a value pay nothing for it.
    """
    if type(body) is list and 0 < len(body) <= max_statements:
        fast = _fast_statements(body)
        if fast is not None:
            return fast
    if raw is not None:
        try:
            return _statements(body, max_statements, huge_floats=False)
        except _HugeFloat:
            body = exact_json(raw)
    return _statements(body, max_statements, huge_floats=True)


def _plain(raw: Any) -> bool:
    """True for a value :func:`_value` takes as it is, without a conversion or an error: a string that is
    no hex literal, an integer within 64 bits, a float below 2^63 in size (not NaN), null."""
    kind = type(raw)
    if kind is str:
        return raw[:2] not in _HEX_PREFIXES
    if kind is int:
        return INT64_MIN <= raw <= INT64_MAX
    if kind is float:
        return -_TWO_63 < raw < _TWO_63
    return raw is None


def _checked_parameters(sql: str) -> Parameters:
    """:func:`sql_parameters`, remembered by SQL text for the fast path (a dict lookup instead of a regex
    search and an LRU call): at most :data:`_FAST_CACHE_ENTRIES` texts of up to ``_CACHED_SQL_CHARS``."""
    found = _fast_parameters.get(sql)
    if found is None:
        found = sql_parameters(sql)
        if len(sql) <= _CACHED_SQL_CHARS:
            if len(_fast_parameters) >= _FAST_CACHE_ENTRIES:
                _fast_parameters.clear()
            _fast_parameters[sql] = found
    return found


def _fast_statement(item: Any) -> Statement | None:
    """One statement of the common shapes, checked exactly as :func:`_statement` checks it; None whenever
    the general path might answer otherwise (it then gives the value or the error, with its wording)."""
    if type(item) is str:
        sql = item
        rest: list[Any] = []
    elif type(item) is list and item and type(item[0]) is str:
        sql = item[0]
        rest = item[1:]
    else:
        return None
    if "\x00" in sql or not sql.strip():
        return None
    found = _checked_parameters(sql)
    if found.unsupported:
        return None
    if not rest:
        return None if found.count else Statement(sql)
    if len(rest) == 1 and type(rest[0]) is dict:
        if found.positional:
            return None
        named: dict[str, Value] = {}
        for key, raw in rest[0].items():
            if type(key) is not str or not _plain(raw):
                return None
            name = key[1:] if key[:1] in _NAME_PREFIXES else key
            if not name or name in named:
                return None
            named[name] = raw
        return Statement(sql, MappingProxyType(named)) if found.names == named.keys() else None
    if found.named or len(rest) != found.count:
        return None
    for raw in rest:
        kind = type(raw)
        if kind is str:
            if raw[:2] in _HEX_PREFIXES:
                return None
        elif kind is int:
            if not INT64_MIN <= raw <= INT64_MAX:
                return None
        elif kind is float:
            if not -_TWO_63 < raw < _TWO_63:
                return None
        elif raw is not None:
            return None
    return Statement(sql, tuple(rest))


def _fast_statements(body: list[Any]) -> tuple[Statement, ...] | None:
    """The statements of a body made only of the common shapes (SQL strings; [sql, values...] and
    [sql, {name: value}] with plain values that fit their parameters), or None to take the general path.

    Writes are almost always of these shapes, and the general path spends most of its time formatting the
    positions it would name in an error that does not come. This path formats nothing and never raises:
    anything unusual or wrong goes to the general path, so the results and the errors are the same
    (tests/core/test_sqlreq_fast.py checks that on generated bodies)."""
    statements = []
    for item in body:
        statement = _fast_statement(item)
        if statement is None:
            return None
        statements.append(statement)
    return tuple(statements)


def _statements(body: Any, max_statements: int, *, huge_floats: bool) -> tuple[Statement, ...]:
    if not isinstance(body, list):
        raise errors.BadRequest("invalid request: the body must be a JSON array of statements")
    if not body:
        raise errors.BadRequest("no statements")
    if len(body) > max_statements:
        raise errors.PayloadTooLarge(
            f"too many statements: {len(body)} in one request, at most {max_statements}",
            limit=max_statements,
        )
    return tuple(_statement(item, i, huge_floats) for i, item in enumerate(body))


def exact_json(raw: bytes) -> Any:
    """JSON with integers kept exact (any size) and every number finite; each failure is a 400."""

    def finite(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):
            raise errors.BadRequest(f"invalid JSON body: number {text[:40]} is out of range")
        return number

    def constant(text: str) -> Any:
        raise errors.BadRequest(f"invalid JSON body: {text} is not a JSON value")

    try:
        return json.loads(raw, parse_float=finite, parse_constant=constant)
    except (ValueError, RecursionError) as exc:  # malformed, too deeply nested, or digits past int's limit
        raise errors.BadRequest(f"invalid JSON body: {exc}") from None


def parse_text_statement(text: str, *, check: bool = True) -> tuple[Statement, ...]:
    """A ``text/plain`` body or a ``q=`` query parameter: one statement, which has no values.

    ``check=False`` skips the parameter scan, for SQL dumps: they can be very large, and a dump that
    uses a parameter fails as a whole anyway (the load is one transaction).
    """
    statement = Statement(_sql(text, "statement 0"))
    return (check_parameters(statement, "statement 0") if check else statement,)


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

    def replace(match: re.Match[str]) -> str:
        word = match.group()
        return _TIME_KEYWORDS.get(word.upper(), word) if match.lastgroup == "word" else word

    return _SQL_TOKEN.sub(replace, sql)


# --- parameters ----------------------------------------------------------------------------------------------

# SQLite's identifier characters (its IdChar): ASCII letters and digits, '_', '$' and every non-ASCII
# character (each byte of its UTF-8 form is >= 0x80). Digits are ASCII only: no str.isdigit() here.
_ID_CHARS = "A-Za-z0-9_$\x80-\U0010ffff"
# The tokens of SQLite's tokenizer that matter here, in its order of precedence. Everything else (blanks,
# operators, parentheses) is skipped. Unterminated literals and comments run to the end, as in SQLite.
_QUOTED = (
    r"(?P<quoted>'[^']*(?:''[^']*)*'?"  # 'string' ('' inside)
    r'|"[^"]*(?:""[^"]*)*"?'  # "identifier"
    r"|`[^`]*(?:``[^`]*)*`?"  # `identifier`
    r"|\[[^\]]*\]?)"  # [identifier] (no escape: ends at the first ])
)
_COMMENT = r"(?P<comment>--[^\n]*|/\*(?s:.*?)(?:\*/|\Z))"
_NUMBERED = r"(?P<number>\?[0-9]*)"  # ? and ?NNN
_END = r"(?P<end>;)"
# For the keyword rewrite: whole words (identifiers, keywords, numbers; a '$' inside one is part of it).
_SQL_TOKEN = re.compile(
    "|".join(
        (
            _QUOTED,
            _COMMENT,
            rf"(?P<word>[{_ID_CHARS.replace('$', '')}][{_ID_CHARS}]*)",
            _NUMBERED,
            rf"(?P<named>[:@$#][{_ID_CHARS}]*)",
            _END,
        )
    )
)
# For parameters, one match per parameter: everything before it (other text, literals, comments) is
# consumed inside the regex engine, possessively (no backtracking), and the last match runs to the end.
# A '$' right after a name character is inside a word ('a$b'), not a parameter. (The one case this reads
# differently from SQLite, '?1$a', is two parameters in a row, which SQLite refuses on prepare.)
_SKIP = (
    r"(?>[^'\"`\[\-/?:@$#;]+"
    r"|'[^']*(?:''[^']*)*'?"
    r'|"[^"]*(?:""[^"]*)*"?'
    r"|`[^`]*(?:``[^`]*)*`?"
    r"|\[[^\]]*\]?"
    r"|--[^\n]*"
    r"|/\*(?s:.*?)(?:\*/|\Z)"
    r"|[-/]"
    rf"|(?<=[{_ID_CHARS}])\$)*+"
)
_PARAMETER_TOKEN = re.compile(rf"{_SKIP}(?:{_NUMBERED}|(?P<named>[:@$#][{_ID_CHARS}]*)|{_END}|\Z)")
# SQLite's SQLITE_MAX_VARIABLE_NUMBER (the default, and what the bundled library is built with).
MAX_PARAMETER_NUMBER = 32766
_PARAMETER_CHARS = re.compile(r"[?:@$#]")
# How far SQLite reads a Tcl-style parameter: names, '::' separators, then '(' up to a blank or ')'.
_TCL_PARAMETER = re.compile(rf"[:@$#](?:[{_ID_CHARS}]|::)*(?:\([^ \t\n\f\r)]*\)?)?")


@dataclass(frozen=True, slots=True)
class Parameters:
    """The parameters SQLite finds in one statement entry's SQL, over every statement the string holds.

    ``count`` is how many values an array must hold: SQLite numbers the parameters of each statement from 1
    (``?`` takes the next number, ``?NNN`` is number NNN, a name its first number) and binds an array
    statement after statement, so it is each statement's highest number, summed.
    """

    count: int = 0
    # Named parameters as written (':a', '@b', '$c'), each once, in order of appearance.
    named: tuple[str, ...] = ()
    # Positional parameters as written ('?', '?3').
    positional: tuple[str, ...] = ()
    # Tokens SQLite would take as parameters that this API refuses to bind: Tcl forms ($a::b, $a(x)),
    # '#name' (undocumented), and ?NNN outside 1..MAX_PARAMETER_NUMBER.
    unsupported: tuple[str, ...] = ()
    # The keys an object of values must have: the names without their prefix (as apsw binds them).
    names: frozenset[str] = frozenset()


_NO_PARAMETERS = Parameters()


# SQL up to this length has its scan remembered: clients send the same few statements again and again.
_CACHED_SQL_CHARS = 2048
# Texts the fast path remembers the scan of (see _checked_parameters); emptied when full: at most ~2 MiB of keys
# at _CACHED_SQL_CHARS each, and clients send a few statements again and again.
_FAST_CACHE_ENTRIES = 1024
_fast_parameters: dict[str, Parameters] = {}


def sql_parameters(sql: str) -> Parameters:
    """Scan SQL as SQLite's tokenizer does for parameters outside literals, quoted identifiers, comments."""
    if not _PARAMETER_CHARS.search(sql):
        return _NO_PARAMETERS
    return _scan_cached(sql) if len(sql) <= _CACHED_SQL_CHARS else _scan(sql)


@functools.lru_cache(maxsize=1024)
def _scan_cached(sql: str) -> Parameters:
    return _scan(sql)


def _scan(sql: str) -> Parameters:
    count = highest = 0
    numbers: dict[str, int] = {}  # named token -> its number, within the current statement
    named: dict[str, None] = {}
    positional: list[str] = []
    unsupported: list[str] = []
    illegal_at = -1  # where a name that follows an illegal lone ':' starts (a cast like '1'::int)
    for match in _PARAMETER_TOKEN.finditer(sql):
        kind = match.lastgroup
        if kind is None:
            continue  # the text after the last parameter
        token = match.group(kind)
        if kind == "end":
            count, highest = count + highest, 0
            numbers.clear()
        elif kind == "number":
            positional.append(token)
            if len(token) == 1:
                highest += 1
            elif len(token) > 6 or not 1 <= int(token[1:]) <= MAX_PARAMETER_NUMBER:
                unsupported.append(token)
            else:
                highest = max(highest, int(token[1:]))
        elif kind == "named":
            start = match.start(kind)
            after = sql[match.end() : match.end() + 2]
            if after == "::" or (len(token) > 1 and after[:1] == "("):
                # A Tcl form ($a::b, $a(x)): SQLite reads on; which name it binds is not ours to guess.
                tcl = _TCL_PARAMETER.match(sql, start)
                unsupported.append(tcl.group() if tcl else token)
            elif len(token) == 1:
                # A lone ':' or '@' is no parameter: SQLite refuses the token on prepare. In '::int' (a
                # PostgreSQL cast) the name after it is no parameter to ask values for either.
                illegal_at = match.end() if after[:1] == ":" else -1
            elif start == illegal_at:
                continue
            elif token[0] == "#":
                unsupported.append(token)
            elif token not in numbers:
                highest += 1
                numbers[token] = highest
                named[token] = None
    return Parameters(
        count + highest, tuple(named), tuple(positional), tuple(unsupported), frozenset(n[1:] for n in named)
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def check_parameters(statement: Statement, where: str) -> Statement:
    """The statement if its values fit its parameters exactly (see the module docstring); else a 400.

    Extra named values are refused too: SQLite would ignore them, but a key that matches no parameter is
    almost always a misspelt or stale name in the client, and the write would silently store NULLs.
    """
    params = statement.params
    found = sql_parameters(statement.sql)
    if found.unsupported:
        raise errors.BadRequest(
            f"{where}: unsupported parameter {found.unsupported[0]!r}; use ?, ?NNN (1 to "
            f"{MAX_PARAMETER_NUMBER}), :name, @name or $name"
        )
    if params is None:
        if found.count:
            raise errors.BadRequest(f"{where} has {_plural(found.count, 'parameter')} but no values")
        return statement
    if isinstance(params, Mapping):
        if found.positional:
            raise errors.BadRequest(
                f"{where}: named values given, but the SQL has positional parameter {found.positional[0]}; "
                "use :name parameters, or an array of values"
            )
        if found.names == params.keys():
            return statement
        missing = [token for token in found.named if token[1:] not in params]
        if missing:
            raise errors.BadRequest(f"{where}: no value for parameter {', '.join(missing)}")
        extra = sorted(params.keys() - found.names)
        if extra:
            raise errors.BadRequest(
                f"{where}: {'values' if len(extra) > 1 else 'value'} for {', '.join(map(repr, extra))} "
                f"{'match' if len(extra) > 1 else 'matches'} no parameter of the SQL "
                "(almost surely a misspelt or stale key in the client)"
            )
        return statement
    if found.named:
        raise errors.BadRequest(
            f"{where}: an array of values given, but the SQL has named parameter {found.named[0]}; "
            "pass the values as an object"
        )
    if len(params) != found.count:
        raise errors.BadRequest(
            f"{where} has {_plural(found.count, 'parameter')} but {_plural(len(params), 'value')} were given"
        )
    return statement
