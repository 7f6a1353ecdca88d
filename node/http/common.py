"""Shared HTTP plumbing: JSON responses, the error middleware, body reading with limits, bounded sending.

**Memory held for responses.** A JSON body handed to aiohttp whole sits in the transport's buffer until the
client reads it: clients that ask for large results and never read can pin any amount of memory. Large
bodies (over :data:`STREAM_THRESHOLD_BYTES`) are therefore sent in chunks through a ``StreamResponse``,
waiting for each chunk to drain (backpressure), with a stall timeout per chunk after which the connection
is aborted and its buffer freed; and the serialized bytes of all large responses in flight are capped by a
:class:`ResponseBudget` (a response that does not fit answers 503 busy with Retry-After at once, so what the
node holds stays bounded by the budget plus the one body just serialized). The error middleware applies
this to every large ``web.Response`` a handler returns; :func:`send_json` does it for a handler that wants
to send itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from node import errors
from node.core.sqlreq import Flags, parse_flags

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Bodies larger than this are streamed under the response budget; smaller ones go out whole.
STREAM_THRESHOLD_BYTES = 256 << 10
# Bytes per write when streaming: each write waits until the transport drained below its high-water mark.
STREAM_CHUNK_BYTES = 64 << 10
# Defaults when the application does not set its own (tests, tools).
DEFAULT_WRITE_TIMEOUT_S = 30.0
DEFAULT_BUFFERED_RESPONSE_BYTES = 64 << 20

# Headers a middleware asks a streaming handler to send with its answer (set before it prepares it).
EXTRA_HEADERS = "talentnest_extra_headers"
# A request's parsed query flags, kept on the request by the first to ask (the forwarding layer, then the
# handler) when its query string is too long for the cache below: parsing them twice per request was 5% of
# a busy leader's handler time.
FLAGS_KEY = web.RequestKey("talentnest_flags", Flags)
# Parsed flags by query string, for the few query strings clients repeat (usually ""). Only query strings up
# to FLAGS_CACHE_QUERY_CHARS characters are kept, only ones that parsed (a bad one is refused every time),
# and the cache is emptied when it reaches FLAGS_CACHE_ENTRIES: at most ~64 KiB of keys.
FLAGS_CACHE_ENTRIES = 256
FLAGS_CACHE_QUERY_CHARS = 256
_flags_by_query: dict[str, Flags] = {}


class ResponseBudget:
    """Bytes of serialized responses held at once, across all clients; beyond it, callers answer 503.

    A single response larger than the whole budget is still let through when nothing else is held (it
    would never fit otherwise), so the bound is max(limit, largest single response).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self.refused = 0

    def try_reserve(self, size_bytes: int) -> bool:
        if self.in_use_bytes and self.in_use_bytes + size_bytes > self.limit_bytes:
            self.refused += 1
            return False
        self.in_use_bytes += size_bytes
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
        return True

    def release(self, size_bytes: int) -> None:
        self.in_use_bytes -= size_bytes
        assert self.in_use_bytes >= 0, "released more than reserved"


RESPONSE_BUDGET = web.AppKey("response_budget", ResponseBudget)
WRITE_TIMEOUT_S = web.AppKey("response_write_timeout_s", float)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None, *, pretty: bool = False
):
    option = orjson.OPT_INDENT_2 if pretty else 0
    return web.Response(
        body=orjson.dumps(body, option=option),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def request_flags(request: web.Request) -> Flags:
    """:func:`parse_flags` of the request's query: the same value (or the same 400), parsed once per request
    and once per distinct (short) query string."""
    query_string = request.query_string
    flags = _flags_by_query.get(query_string)  # the common case: one dict lookup, nothing kept on the request
    if flags is not None:
        return flags
    if FLAGS_KEY in request:  # a query string too long to cache, parsed once for this request already
        return request[FLAGS_KEY]
    flags = _parse_and_keep(query_string, request.query)
    if len(query_string) > FLAGS_CACHE_QUERY_CHARS:
        request[FLAGS_KEY] = flags
    return flags


def query_flags(query_string: str) -> Flags:
    """:func:`request_flags` for a query string alone (the write fast path, node.http.fastpath), parsed into
    the same multidict aiohttp would give (``URL.build(..., encoded=True).query``)."""
    flags = _flags_by_query.get(query_string)
    if flags is not None:
        return flags
    return _parse_and_keep(query_string, URL.build(path="/", query_string=query_string, encoded=True).query)


def _parse_and_keep(query_string: str, query: Mapping[str, str]) -> Flags:
    flags = parse_flags(query)  # raises for a bad value: never cached
    if len(query_string) <= FLAGS_CACHE_QUERY_CHARS:
        if len(_flags_by_query) >= FLAGS_CACHE_ENTRIES:
            _flags_by_query.clear()
        _flags_by_query[query_string] = flags
    return flags


def error_response(exc: errors.NodeError) -> web.Response:
    return json_response(exc.body(), status=exc.status, headers=exc.headers())


def error_body(
    status: int, *, exc: BaseException | None = None, message: str | None = None
) -> dict[str, str]:
    """The documented error body for a status aiohttp chose: ``code`` is the status phrase in snake case."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    text = message or (str(exc) if exc is not None else "") or phrase
    return {
        "error": text,
        "code": "internal_error" if status == 500 else phrase.lower().replace(" ", "_").replace("-", "_"),
    }


# Modules whose ValueErrors mean "the client sent something malformed" when raised while a handler read the
# request through them (a Host that is not host:port, a bad query string, a malformed cookie or date).
_REQUEST_PARSERS = (
    "aiohttp",
    "yarl",
    "multidict",
    "http.cookies",
    "email",
    "urllib.parse",
    "json",
    "encodings",
)


def is_client_input_error(exc: BaseException) -> bool:
    """True for the errors a client can trigger by what it sends, wherever a handler happened to read it.

    Payload errors (a body that does not decompress, a broken chunked encoding) and aiohttp's parser errors
    always are. A ValueError (UnicodeDecodeError, JSONDecodeError included) or a LookupError (an unknown
    charset) is, when it was raised inside one of the request parsing libraries (:data:`_REQUEST_PARSERS`):
    that is an accessor such as ``request.url``, ``request.cookies`` or ``request.text()`` rejecting what
    the client sent. The same errors raised in the node's own code stay bugs (500, ``request_failed``).
    """
    if isinstance(exc, (RequestPayloadError, http_exceptions.HttpProcessingError, zlib.error)):
        return True
    unknown_charset = type(exc) is LookupError  # what codecs raise; KeyError and IndexError stay bugs
    if not (isinstance(exc, ValueError) or unknown_charset):
        return False
    tb = exc.__traceback__
    module = ""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    return any(module == name or module.startswith(name + ".") for name in _REQUEST_PARSERS)


class InnerLayer:
    """A layer the error middleware runs around the handler in its own coroutine (``around(request,
    handler)``), or none. Settable until the application starts (the node's forwarding is known only once
    replication is wired).

    Each aiohttp middleware is one more coroutine per request, and the node's front (head complete, errors,
    forwarding) ran as three: one layer for all of them is a measurable part of a write's CPU (see
    bench/http_layer.py)."""

    __slots__ = ("around",)

    def __init__(self) -> None:
        self.around: Callable[[web.Request, Handler], Awaitable[web.StreamResponse]] | None = None


def make_error_middleware(
    log: Any,
    *,
    first: Callable[[web.Request], None] | None = None,
    inner: InnerLayer | None = None,
):
    """Every failure becomes a JSON error with the right status; nothing a client sends crashes the node.

    ``first`` is called with every request before anything else (it must not raise); ``inner`` is a layer
    run inside the error handling, around the handler: both in this one coroutine, as if they were the
    middlewares before and after this one."""
    layer = inner if inner is not None else InnerLayer()

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if first is not None:
            first(request)
        try:
            around = layer.around
            response = await (handler(request) if around is None else around(request, handler))
            if _should_stream(response):
                return await _stream_response(request, response)
            return response
        except errors.NodeError as exc:
            return error_response(exc)
        except web.HTTPMethodNotAllowed as exc:
            allowed = sorted(exc.allowed_methods)
            return error_response(
                errors.MethodNotAllowed(
                    f"method {request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
                    allowed,
                )
            )
        except web.HTTPNotFound:
            return error_response(errors.NotFound(f"no such endpoint: {request.path}"))
        except web.HTTPRequestEntityTooLarge as exc:
            return error_response(errors.PayloadTooLarge(f"request body too large: {exc.text}"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_response(error_body(exc.status, message=exc.reason), status=exc.status)
        except (ConnectionResetError, TimeoutError) as exc:
            # The client went away or stalled past a read deadline: nothing to answer, nothing broken.
            log.debug("request_aborted", path=request.path, reason=type(exc).__name__)
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that turns a bug into a 500, not a dead node
            return error_response(unexpected_error(exc, log, method=request.method, path=request.path))

    return error_middleware


def unexpected_error(exc: Exception, log: Any, *, method: str, path: str) -> errors.NodeError:
    """What a handler's exception that is no NodeError answers: a 400 when the client's input caused it
    (:func:`is_client_input_error`), else a 500 with the traceback in the log. Call it in the except block."""
    if is_client_input_error(exc):
        log.debug("request_malformed", path=path, reason=type(exc).__name__)
        return errors.BadRequest(f"malformed request: {_describe(exc)}")
    log.exception("request_failed", method=method, path=path)
    return errors.NodeError("internal error; see the node's log")


def declared_too_large(declared: int, limit: int) -> errors.PayloadTooLarge:
    """The 413 for a body whose announced length (Content-Length) is over ``limit``."""
    return errors.PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}", limit=limit)


def body_at_hand(request: web.Request, *, limit: int) -> bytes | None:
    """The whole body if it has already arrived (with the head, as a small write's does), else None and
    nothing consumed; 413 as :func:`read_body` answers it. Without an await: a caller that gets the body
    here runs no coroutine, timer or iterator for it (together a few microseconds of a small write)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise declared_too_large(declared, limit)
    content = request.content
    if content.is_eof() and content.exception() is None:
        whole = content.read_nowait()
        if len(whole) > limit:
            raise errors.PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", limit=limit)
        return whole
    return None


async def read_body(request: web.Request, *, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes (else 413), within ``timeout_s`` (else 408).

    The time limit is what keeps a client that announces a body and then stalls from holding a handler
    (and a connection) for ever.
    """
    whole = body_at_hand(request, limit=limit)
    if whole is not None:
        return whole
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                if len(body) + len(chunk) > limit:
                    raise errors.PayloadTooLarge(
                        f"request body exceeds the limit of {limit} bytes", limit=limit
                    )
                body += chunk
    except TimeoutError:
        raise errors.RequestTimeout(f"request body not received within {timeout_s:g} s") from None
    except (RequestPayloadError, http_exceptions.HttpProcessingError, zlib.error) as exc:
        raise errors.BadRequest(body_error_message(request, exc)) from None
    return bytes(body)


def body_error_message(request: web.BaseRequest, exc: BaseException) -> str:
    """What went wrong reading a body, naming the encoding when the body did not decode."""
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        return (
            f"request body could not be decoded as Content-Encoding {encoding[:40]!r}: {_describe(exc)}; "
            "send it compressed that way, or uncompressed without the header"
        )
    return f"request body could not be read: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    """An exception's message for a client: one line, bounded, never empty."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# --- sending large bodies under a budget -------------------------------------------------------------------


def _should_stream(response: web.StreamResponse) -> bool:
    if type(response) is not web.Response:
        return False
    body = response.body  # the size first: a small body (every write's answer) needs no other look
    return isinstance(body, bytes) and len(body) > STREAM_THRESHOLD_BYTES and not response.prepared


async def _stream_response(request: web.Request, response: web.Response) -> web.StreamResponse:
    body = response.body
    assert isinstance(body, bytes)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return await send_bytes(request, body, status=response.status, headers=headers)


async def send_json(
    request: web.Request,
    body: Any,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    pretty: bool = False,
) -> web.StreamResponse:
    """Serialize ``body`` and send it under the application's response budget and write timeout.

    Raises :class:`errors.Busy` (503, Retry-After) before anything is sent when the budget is full.
    """
    data = orjson.dumps(body, option=orjson.OPT_INDENT_2 if pretty else 0)
    return await send_bytes(
        request, data, status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


async def send_bytes(
    request: web.Request, data: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    """Send ``data`` in chunks, each awaited until it drains, holding ``len(data)`` of the response budget.

    A chunk that cannot be written within the write timeout (the client stopped reading) aborts the
    connection: its buffers are freed and ConnectionResetError ends the handler.
    """
    budget = request.config_dict.get(RESPONSE_BUDGET)
    timeout_s = request.config_dict.get(WRITE_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S)
    size = len(data)
    if budget is not None and not budget.try_reserve(size):
        raise budget_full()
    try:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = size
        await response.prepare(request)
        view = memoryview(data)
        for start in range(0, size, STREAM_CHUNK_BYTES):
            try:
                async with asyncio.timeout(timeout_s):
                    await response.write(view[start : start + STREAM_CHUNK_BYTES])
            except TimeoutError:
                transport = request.transport
                if transport is not None:
                    transport.abort()
                raise ConnectionResetError(f"client read nothing for {timeout_s:g} s") from None
        await response.write_eof()
        return response
    finally:
        if budget is not None:
            release_response(budget, size)


def budget_full() -> errors.Busy:
    """The 503 (with Retry-After) a large response gets when the response budget cannot hold it."""
    return errors.Busy(
        "the node is holding as many large responses as it may (MAX_BUFFERED_RESPONSE_BYTES); retry shortly"
    )


def release_response(budget: ResponseBudget, size: int) -> None:
    """Give back ``size`` bytes of the response budget once a large body is written out (or abandoned)."""
    budget.release(size)
    if size >= TRIM_AFTER_BYTES:
        _malloc_trim.soon()


def parse_json(raw: bytes, *, expected: str = "JSON") -> Any:
    """Parse a JSON body; an empty or malformed one is a 400 saying what was expected and what is wrong."""
    if not raw.strip():
        raise errors.BadRequest(f"request body is empty; expected {expected}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"invalid JSON body: {exc}") from None


async def read_json(request: web.Request, *, limit: int, timeout_s: float) -> Any:
    """Read (with :func:`read_body`'s limits) and parse a JSON body; every failure is a 4xx saying what."""
    return parse_json(await read_body(request, limit=limit, timeout_s=timeout_s))


# --- returning freed memory to the system ------------------------------------------------------------------

# After a response at least this large is freed, ask glibc to return free heap pages to the system.
TRIM_AFTER_BYTES = 4 << 20
# At most one trim per interval, whatever the traffic.
TRIM_INTERVAL_S = 1.0


class _MallocTrim:
    """glibc's ``malloc_trim(0)`` after large responses are freed, at most once per interval.

    Large responses are freed in many pieces; glibc keeps freed memory in its arenas, so without a trim the
    process's RSS stays near its peak after the clients left (measured with bench/slow_readers.py: 82 MiB
    instead of 52 MiB after 8 slow readers, 142 MiB instead of ~85 MiB after 60). A request within the
    interval of the last trim is deferred to the interval's end rather than dropped, so the last release
    of a burst is always followed by a trim. The call holds the loop for about 10 ms after a large release, under 1 ms otherwise; it is
    a no-op where glibc is absent (musl, macOS).
    """

    def __init__(self) -> None:
        self._last_s = float("-inf")
        self._pending: asyncio.TimerHandle | None = None
        self._fn: Any = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                self._fn = libc.malloc_trim
                self._fn.argtypes = [ctypes.c_size_t]
                self._fn.restype = ctypes.c_int

    def soon(self) -> None:
        if self._fn is None:
            return
        if self._pending is not None and time.monotonic() < self._last_s + 2 * TRIM_INTERVAL_S:
            return  # one is scheduled (a handle left on a loop that closed since is forgotten after 2 s)
        wait_s = self._last_s + TRIM_INTERVAL_S - time.monotonic()
        if wait_s <= 0:
            self._trim()
        else:
            self._pending = asyncio.get_running_loop().call_later(wait_s, self._trim)
            self._last_s = time.monotonic() - TRIM_INTERVAL_S + wait_s  # when it will run

    def _trim(self) -> None:
        self._pending = None
        self._last_s = time.monotonic()
        self._fn(0)


_malloc_trim = _MallocTrim()
