"""SQL dumps split into statements: streamed from a file in chunks, in time linear in the text.

Pure text work (no database): the writer thread runs it while loading a dump, never the event loop.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import apsw
import orjson

from node import errors

# Bytes of a dump read at a time when splitting it into statements.
DUMP_CHUNK_CHARS = 1 << 20
# A replicated /db/load ships its dump as log entries of whole statements: each chunk's statements take at
# most this many bytes as JSON (the entry's payload adds well under LOAD_ENVELOPE_BYTES), so an entry is about
# one core Append batch (max_batch_bytes, 1 MiB) and heartbeats never queue behind a large one.
LOAD_CHUNK_BYTES = (1 << 20) - 4096
LOAD_ENVELOPE_BYTES = 4096
# One statement longer than a chunk travels alone in its entry, up to this size as JSON (else 400).
MAX_LOAD_STATEMENT_BYTES = 8 << 20


# A statement that rolls back, after any whitespace and comments. A load is one transaction of its own (a
# dump's BEGIN and COMMIT are skipped), so a ROLLBACK cannot be honoured in place; and sqlite3's .dump ends
# with "ROLLBACK; -- due to errors" when it met errors, so such a dump is not a consistent copy. Each
# comment can match in one way only (a line comment runs to its newline, a block comment stops at its first
# "*/"), so a failed match costs time linear in the text, never a backtracking search.
_ROLLBACK = re.compile(r"\s*(?:(?:--[^\n]*(?:\n|\Z)|/\*(?:[^*]|\*(?!/))*\*/)\s*)*ROLLBACK\b", re.IGNORECASE)


def dump_statements(source: Path, max_statement_chars: int) -> Iterator[str]:
    """The complete statements of a dump file, read in chunks (never the whole text in memory). A dump that
    rolls back (``ROLLBACK``, ``ROLLBACK TO``) is a 400: see ``_ROLLBACK``."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    splitter = StatementSplitter(max_statement_chars)
    with open(source, "rb") as f:
        while True:
            raw = f.read(DUMP_CHUNK_CHARS)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError:
                raise errors.BadRequest("the dump is not UTF-8 text") from None
            if "\x00" in text:
                raise errors.BadRequest("the dump contains a NUL character")
            yield from _refusing_rollback(splitter.feed(text))
            if not raw:
                break
    yield from _refusing_rollback(splitter.finish())


def _refusing_rollback(statements: Iterable[str]) -> Iterator[str]:
    for sql in statements:
        if _ROLLBACK.match(sql):
            raise errors.BadRequest(
                "the dump rolls back (ROLLBACK): sqlite3's .dump writes one when it met errors, so it is not a "
                "consistent copy, and a load is one transaction; nothing was loaded"
            )
        yield sql


_STOPS = re.compile(r"[;'\"`\[]|--|/\*")
_CLOSERS = {"'": "'", '"': '"', "`": "`", "[": "]", "--": "\n", "/*": "*/"}
_TRIGGER_START = re.compile(r"\s*CREATE\s+(?:TEMP\s+|TEMPORARY\s+)?TRIGGER\b", re.IGNORECASE)
_ENDS_WITH_END = re.compile(r"\bEND\s*;$", re.IGNORECASE)
# A trigger candidate longer than this is tested with apsw.complete only when it ends with END;.
_TRIGGER_PROBE_CHARS = 1 << 16


class StatementSplitter:
    """Split SQL text fed in pieces into complete statements, in time linear in the text.

    Quotes, identifiers and comments are skipped by a small scanner (a ``;`` inside them never costs a
    check); at a ``;`` outside them SQLite's own ``apsw.complete`` decides (it knows trigger bodies). A
    statement longer than ``max_chars`` is a 400 rather than an ever-growing buffer.
    """

    def __init__(self, max_chars: int = 1 << 30) -> None:
        self._text = ""
        self._start = 0
        self._pos = 0
        self._close: str | None = None
        self._max = max_chars

    def feed(self, chunk: str) -> list[str]:
        text = self._text = self._text[self._start :] + chunk
        self._pos -= self._start
        self._start = 0
        out: list[str] = []
        while True:
            if self._close is not None:
                end = text.find(self._close, self._pos)
                if end < 0:
                    self._pos = max(self._pos, len(text) - len(self._close) + 1)
                    break
                self._pos = end + len(self._close)
                self._close = None
                continue
            match = _STOPS.search(text, self._pos)
            if match is None:
                # A trailing '-' or '/' may start a comment that the next piece completes.
                self._pos = max(self._pos, len(text) - 1 if text.endswith(("-", "/")) else len(text))
                break
            token = match.group()
            self._pos = match.end()
            if token != ";":
                self._close = _CLOSERS[token]
                continue
            candidate = text[self._start : self._pos]
            if len(candidate) > self._max:
                break  # refused below
            if _complete(candidate):
                if candidate.strip(" \t\r\n;"):
                    out.append(candidate)
                self._start = self._pos
        if len(text) - self._start > self._max:
            raise errors.BadRequest(f"a statement of the dump is longer than {self._max} characters")
        return out

    def finish(self) -> list[str]:
        tail = self._text[self._start :]
        self._text, self._start, self._pos, self._close = "", 0, 0, None
        return [tail] if tail.strip() else []


def _complete(candidate: str) -> bool:
    if (
        len(candidate) > _TRIGGER_PROBE_CHARS
        and _TRIGGER_START.match(candidate)
        and not _ENDS_WITH_END.search(candidate)
    ):
        return False
    return apsw.complete(candidate)


def split_sql(script: str) -> Iterator[str]:
    """Split a script into complete statements (semicolons inside literals and triggers stay put)."""
    splitter = StatementSplitter()
    yield from splitter.feed(script)
    yield from splitter.finish()


def encoded_size(sql: str) -> int:
    """Bytes ``sql`` takes as a JSON string inside a chunk's list (its comma included)."""
    return len(orjson.dumps(sql)) + 1


def chunk_statements(
    statements: Iterable[str],
    max_chunk_bytes: int = LOAD_CHUNK_BYTES,
    max_statement_bytes: int = MAX_LOAD_STATEMENT_BYTES,
) -> Iterator[list[str]]:
    """Pack whole statements, in order, into chunks whose JSON list takes at most ``max_chunk_bytes``.

    A statement is never split; one that alone exceeds the bound gets a chunk of its own, and one above
    ``max_statement_bytes`` is a 400 (it would hold up replication as one huge entry). Lazy: one chunk in
    memory at a time.
    """
    chunk: list[str] = []
    size = 1  # the brackets, less the comma the first statement does not need: exact for a non-empty chunk
    for sql in statements:
        n = encoded_size(sql)
        if n > max_statement_bytes:
            raise errors.BadRequest(
                f"a statement of the dump takes {n} bytes; a replicated load takes at most {max_statement_bytes}"
            )
        if chunk and size + n > max_chunk_bytes:
            yield chunk
            chunk, size = [], 1
        chunk.append(sql)
        size += n
    if chunk:
        yield chunk
