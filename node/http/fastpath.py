"""The write fast path: ``POST /db/execute`` read, answered and written without aiohttp's request machinery.

Why: on a leader under load, the write's HTTP round (aiohttp's request and response objects, its handler
task, the middleware chain, the router) cost about as much CPU as the rest of the node's own work for the
write, and the leader's one Python thread is what bounds a cluster's writes per second
(``bench/http_layer.py``: 51-55 µs of server CPU per request through aiohttp, 15-17 µs for a bare protocol
that reads a request and writes a response).

What it takes, and nothing else: a connection's next request when it has arrived whole (head and body in
the bytes at hand), is exactly ``POST /db/execute`` (with any query string) over HTTP/1.1, and carries
only headers this module can read without doubt: a ``Content-Length``; no ``Transfer-Encoding``,
``Content-Encoding``, ``Expect``, ``Upgrade`` or ``Connection``; no header that matters here twice; a
``Content-Type`` absent, ``application/json`` or ``text/plain``; printable ASCII only. And the route
must take it (:class:`FastRoute` ``claim``: the node answers it itself, it is not forwarded). Anything
else, from the first byte of a request that does not qualify, goes to aiohttp for the rest of the
connection's life (:meth:`node.http.server.GuardedRequestHandler`), so the two never interleave on one
connection and aiohttp always starts at a request boundary.

The answers are aiohttp's: the same handler code (``DbRoutes.fast_execute`` shares its body with the
aiohttp handler), the same status, headers and body (``Date`` and ``Server`` as aiohttp writes them).
``tests/http/test_fast_path.py`` sends each request of a corpus through both paths and compares.
Everything in this module is pure except :class:`HttpDate` (which reads the clock it is given).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Protocol

from aiohttp.http import SERVER_SOFTWARE

# A request head longer than this is left to aiohttp (its own limit is 8190 bytes per line).
MAX_HEAD_BYTES = 8 << 10
# Bodies up to this size are taken; larger ones go to aiohttp, which streams and limits them per route.
MAX_BODY_BYTES = 1 << 20

# The head the fast path reads, checked in one pass: the request line, then header lines of a token, a colon
# and a value of printable ASCII, space or tab (RFC 9110 field-vchar; no obsolete line folding), then the
# blank line. The query string is printable ASCII without space and "#" (a fragment has no place in a
# request target). Every part excludes the byte that ends it, so the match is linear in the head's length.
_HEAD = re.compile(
    rb"POST /db/execute(?:\?([!-\"$-~]*))? HTTP/1\.1\r\n((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t -~]*\r\n)*)\r\n"
)
# Headers whose presence means the request needs what only aiohttp does (decoding, chunks, 100-continue,
# protocol switches, connection management): such a request is never taken.
_REFUSED_HEADERS = frozenset(
    {"transfer-encoding", "content-encoding", "expect", "upgrade", "connection", "te", "trailer"}
)
# Headers read here: a second copy of any of them (which aiohttp would resolve by its own rules) is
# never taken.
_SINGLE_HEADERS = frozenset({"content-length", "content-type", "authorization", "x-request-id"})
_TEXT_TYPES = {None: False, "application/json": False, "text/plain": True}


class FastRequest:
    """One whole request the fast path takes: header names lower-cased, values stripped, as aiohttp's."""

    __slots__ = ("query_string", "headers", "body", "text", "size")

    def __init__(self, query_string: str, headers: dict[str, str], body: bytes, text: bool, size: int):
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.text = text  # a text/plain statement rather than a JSON array
        self.size = size  # bytes of the buffer this request took (head and body)


def parse_request(buf: bytes) -> FastRequest | None:
    """The request at the start of ``buf`` if the fast path may take it (see the module's rules), else None.

    None for anything it does not take: a request still arriving, another method, path or version, or a
    head it does not read without doubt. Never raises: any input gives a request or None."""
    head = _HEAD.match(buf, 0, MAX_HEAD_BYTES)
    if head is None:
        return None
    query, lines = head.groups()
    headers: dict[str, str] = {}
    for line in lines.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        key = name.lower().decode("ascii")
        if key in headers:
            if key in _SINGLE_HEADERS:
                return None
            continue  # a header this module only tests for, sent twice: the first is kept (aiohttp's .get())
        if key in _REFUSED_HEADERS:
            return None
        headers[key] = value.strip(b" \t").decode("ascii")
    length_text = headers.get("content-length")
    if length_text is None or not length_text.isdigit():  # ASCII already: digits 0-9 only
        return None
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        return None
    start = head.end()
    if len(buf) < start + length:
        return None  # the body is still arriving
    text_body = _TEXT_TYPES.get(headers.get("content-type"), None)
    if text_body is None:
        return None  # a Content-Type with parameters or another type: aiohttp reads it
    query_string = query.decode("ascii") if query is not None else ""
    return FastRequest(query_string, headers, buf[start : start + length], text_body, start + length)


class FastRoute(Protocol):
    """What the fast path calls: ``claim`` (synchronous, nothing consumed when False) decides whether this
    node answers the request itself; ``answer`` gives the status, headers and body, or raises what the
    aiohttp path's middleware would turn into an error response."""

    def claim(self, request: FastRequest) -> bool: ...

    def answer(self, request: FastRequest) -> Awaitable[tuple[int, dict[str, str] | None, bytes]]: ...


class HttpDate:
    """The ``Date`` header as aiohttp writes it (RFC 9110 IMF-fixdate), formatted once per second."""

    __slots__ = ("_clock", "_second", "_text")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = email.utils.formatdate(second, usegmt=True)
        return self._text


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def response_bytes(
    status: int, headers: dict[str, str] | None, body: bytes, date: str, *, content_type: str
) -> bytes:
    """A whole HTTP/1.1 response with the headers aiohttp sends for a ``web.Response`` of these bytes."""
    parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {content_type}\r\n"]
    if headers:
        for name, value in headers.items():
            parts.append(f"{name}: {value}\r\n")
    parts.append(f"Content-Length: {len(body)}\r\nDate: {date}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n")
    return "".join(parts).encode("latin-1") + body
