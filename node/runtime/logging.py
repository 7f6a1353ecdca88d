"""Structured logs: one JSON object per line on stdout, nothing else there, and nothing secret anywhere.

Every line has ``timestamp`` (ISO 8601, UTC), ``level``, ``event`` (a fixed name per kind of fact, listed in
the README) and ``node_id`` (bound by the node at start).

Writing to stdout can block (a full pipe to a slow log driver), and the event loop must never block, so
lines go through a bounded queue to a writer thread. When the queue is full the line is dropped and counted;
the next line that gets through carries ``log_lines_dropped`` so the gap is visible.

Why the pipeline looks the way it does (a hostile client could make a handler fail on purpose):

- **Exceptions** are rendered by :func:`describe_exception`: type, message and a short list of
  ``file:line:function`` frames. Never frame locals (a traceback renderer that shows them printed
  JWT_SECRET out of ``auth.verify_jwt``), never source lines (reading them is file I/O on the event loop),
  and bounded in size (:data:`MAX_FRAMES`, :data:`MAX_MESSAGE_CHARS`, :data:`MAX_EXCEPTIONS`).
- **Redaction** (:class:`Redactor`) runs on every value of every line, nested ones included, as the last
  step before rendering: the configured secret and the keys derived from it, anything shaped like a JWT or a
  compact credential, and ``Authorization`` / ``X-TalentNest-Peer`` header values become ``[redacted]``.
  A few substring tests per string value decide whether the full pattern runs, so lines with nothing to
  hide cost little.
- **Other libraries** (aiohttp, asyncio, warnings) log through the standard library; :class:`StdlibBridge`
  turns their records into the same JSON lines, and interpreter hooks do the same for uncaught exceptions
  (main thread, other threads, ``__del__``), so stdout carries JSON only and stderr stays empty.
  :class:`RateLimiter` writes each kind of record at most once per :data:`RATE_WINDOW_S` with a
  ``suppressed`` count, so a flood (``accept()`` failing on EMFILE thousands of times a second) costs one
  line per window; the same holds for a repeated error with the same exception from the same place (a
  client that can trigger a bug must not be able to fill the log with it). Errors a client causes (a reset
  connection, a malformed HTTP message or body) are logged at debug, without a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import IO, Any

import orjson
import structlog

_QUEUE_LINES = 10_000

REDACTED = "[redacted]"
# Caps on what one line may carry, so a hostile input cannot make one log line huge.
MAX_VALUE_CHARS = 4096
MAX_ITEMS = 256
MAX_DEPTH = 8
# Caps on a rendered exception: frames kept (the innermost ones), characters of its message, and how many
# exceptions (the one raised, its causes, members of an exception group) one line describes.
MAX_FRAMES = 20
MAX_NESTED_FRAMES = 5
MAX_MESSAGE_CHARS = 500
MAX_EXCEPTIONS = 8
# Repeated records of one kind are written at most once per window; the next one written says how many were
# not. Keys are bounded: past RATE_MAX_KEYS distinct kinds, new kinds share one overflow key.
RATE_WINDOW_S = 10.0
RATE_MAX_KEYS = 1024


# --- redaction -----------------------------------------------------------------------------------------------

_B64URL = r"[A-Za-z0-9_\-]"
# Shapes that are secret whatever the configured secret is. Named groups keep a prefix that tells the reader
# what was there ("Authorization: [redacted]").
_SHAPES = (
    # A JWT: base64url JSON header (always starts ``eyJ``), payload, and a signature (possibly empty).
    rf"eyJ{_B64URL}+\.{_B64URL}+(?:\.{_B64URL}*)?",
    # A compact credential (auth.COMPACT_PREFIX + base64url); shorter runs than a whole one are redacted too.
    r"tn1\.[A-Za-z0-9_\-=]{8,}",
    # A header value, as it appears in a header block, a dict repr or key=value text.
    r"(?P<header>(?ai:authorization|x-talentnest-peer|proxy-authorization)['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n]+",
    # A credential after its scheme name, without the header name.
    r"(?P<scheme>\b(?ai:bearer|basic)\s+)[A-Za-z0-9+/=._~\-]{8,}",
    # The HMAC of a peer message (peerauth: ``t=<time>,sig=<hex>``).
    r"(?P<sig>\bsig=)[0-9A-Fa-f]{16,}",
)
# What each shape must contain, for the cheap pre-check (Redactor._might_hold); keep in step with _SHAPES.
_TRIGGERS = ("eyJ", "tn1.", "sig=")
_TRIGGERS_ANY_CASE = ("authorization", "x-talentnest-peer", "bearer", "basic")
# Keys whose value is secret whatever it looks like (compared lower-case).
_SECRET_KEYS = frozenset(
    {"authorization", "x-talentnest-peer", "proxy-authorization", "jwt_secret", "secret"}
)
# Shortest hex/base64 spelling of the secret that is matched (see secret_forms).
_MIN_ENCODED_CHARS = 12
# Values that can hold no text (exact types: a subclass may carry anything in its repr).
_PLAIN_TYPES = frozenset({int, float, bool, type(None)})
# Standard keys the pipeline itself fills from fixed vocabularies: not data, never redacted.
_FIXED_KEYS = frozenset({"timestamp", "level"})


def secret_forms(secret: str) -> set[str]:
    """Every spelling of ``secret`` and of the keys derived from it that could end up in a log line.

    The literal text, its escaped forms (repr, JSON), hex and base64 of its bytes; for the peer-message key
    (:func:`node.core.peerauth.derive_key`) hex, base64, the characters of the raw bytes and their escaped
    ``bytes`` repr.
    """
    if not secret:
        return set()
    forms = {secret, repr(secret)[1:-1], _json_escaped(secret), _utf8_safe(secret)}
    # Encodings of a short secret are short strings that would erase ordinary text (a 2-letter base64).
    encoded = _byte_forms(secret.encode("utf-8", "surrogateescape"))
    forms |= {form for form in encoded if len(form) >= _MIN_ENCODED_CHARS}
    from node.core import peerauth  # imported here: the logging module must not depend on the core at import

    try:
        key = peerauth.derive_key(secret)
    except (UnicodeError, ValueError):
        key = None
    if key is not None:
        forms |= _byte_forms(key)
        forms |= {key.decode("latin-1"), key.decode("utf-8", "surrogateescape"), repr(key)[2:-1]}
    return {form for form in forms if form}


def _byte_forms(raw: bytes) -> set[str]:
    return {
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }


def _json_escaped(text: str) -> str:
    try:
        return orjson.dumps(text).decode()[1:-1]
    except TypeError:  # lone surrogates: orjson refuses them; the other forms cover such a secret
        return text


class Redactor:
    """Replaces secrets in text by ``[redacted]``. A string with nothing to replace costs a few substring
    tests (:meth:`_might_hold`); only one that may hold something is searched with the full pattern."""

    def __init__(self, secret: str = "", extra: Iterable[str] = ()) -> None:
        # Longest first, so a form that contains another is replaced whole.
        self._needles = tuple(sorted(secret_forms(secret) | {e for e in extra if e}, key=len, reverse=True))
        self._pattern = re.compile("|".join([*(re.escape(n) for n in self._needles), *_SHAPES]))
        self._shortest = min(len(t) for t in (*self._needles, *_TRIGGERS, *_TRIGGERS_ANY_CASE))

    def text(self, text: str) -> str:
        if not self._might_hold(text):
            return text
        return self._pattern.sub(_replacement, text)

    def _might_hold(self, text: str) -> bool:
        """Substring tests (C speed, no regex) that every match of the full pattern passes: a line with
        nothing to hide costs a few of them per string, not a regex search with a dozen alternatives."""
        if len(text) < self._shortest:
            return False
        for needle in self._needles:
            if needle in text:
                return True
        for trigger in _TRIGGERS:
            if trigger in text:
                return True
        lowered = text.lower()
        for trigger in _TRIGGERS_ANY_CASE:
            if trigger in lowered:
                return True
        return False

    def value(self, value: Any, depth: int = 0) -> Any:
        """``value`` with every string inside redacted, made JSON-safe (only str, numbers, bool, None, dict
        and list remain: anything else is rendered with repr first, so that text is redacted too), and
        bounded (:data:`MAX_VALUE_CHARS` per string, :data:`MAX_ITEMS` per container, :data:`MAX_DEPTH`)."""
        kind = type(value)
        if kind is str:
            return _bounded(self.text(_utf8_safe(value)))
        if kind in _PLAIN_TYPES:
            return value
        if isinstance(value, str):
            return _bounded(self.text(_utf8_safe(str(value))))
        if isinstance(value, bool | int | float):
            return value
        if depth >= MAX_DEPTH:
            return "[too deep]"
        if isinstance(value, dict):
            out = {}
            for i, (k, v) in enumerate(value.items()):
                if i >= MAX_ITEMS:
                    out["[truncated]"] = f"{len(value) - MAX_ITEMS} more items"
                    break
                key = self.value(k, depth + 1) if isinstance(k, str) else self.text(_safe_repr(k))
                out[key] = REDACTED if _is_secret_key(k) and v else self.value(v, depth + 1)
            return out
        if isinstance(value, list | tuple | set | frozenset):
            items = [self.value(v, depth + 1) for _, v in zip(range(MAX_ITEMS), value, strict=False)]
            if len(value) > MAX_ITEMS:
                items.append(f"[truncated: {len(value) - MAX_ITEMS} more items]")
            return items
        if isinstance(value, enum.Enum):
            return self.value(value.value, depth + 1)
        return _bounded(self.text(_utf8_safe(_safe_repr(value))))

    def event(self, event_dict: dict[str, Any]) -> dict[str, Any]:
        """A whole event: every value but the fixed keys; top-level keys are names chosen by the code."""
        out = {}
        for key, v in event_dict.items():
            kind = type(v)
            if kind in _PLAIN_TYPES or (key in _FIXED_KEYS and kind is str):
                out[key] = v  # the common case first: numbers and the pipeline's own fields
            elif v and _is_secret_key(key):
                out[key] = REDACTED
            else:
                out[key] = self.value(v, 1)
        return out


def _replacement(match: re.Match[str]) -> str:
    prefix = match.group("header") or match.group("scheme") or match.group("sig") or ""
    return prefix + REDACTED


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in _SECRET_KEYS


def _utf8_safe(text: str) -> str:
    """orjson refuses lone surrogates (aiohttp decodes undecodable header bytes to them): escape those.

    Runs before redaction, which therefore also knows the secret in this escaped spelling."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _bounded(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not take the log line (or the caller) down
        return f"<{type(value).__name__} object (repr failed)>"


# --- exceptions ----------------------------------------------------------------------------------------------


def describe_exception(exc: BaseException, *, max_frames: int = MAX_FRAMES) -> dict[str, Any]:
    """Type, message and innermost frames (``file:line:function``) of ``exc``, with its cause or context and
    the members of an exception group, at most :data:`MAX_EXCEPTIONS` exceptions in all. No locals, no
    source lines."""
    budget = [MAX_EXCEPTIONS]
    return _describe(exc, max_frames, budget, seen=set())


def _describe(exc: BaseException, max_frames: int, budget: list[int], seen: set[int]) -> dict[str, Any]:
    budget[0] -= 1
    seen.add(id(exc))
    out: dict[str, Any] = {"type": _type_name(type(exc)), "message": _exception_message(exc)}
    frames = [
        f"{_short_path(frame.f_code.co_filename)}:{lineno}:{frame.f_code.co_name}"
        for frame, lineno in _walk_tb(exc.__traceback__)
    ]
    if len(frames) > max_frames:
        out["frames_omitted"] = len(frames) - max_frames
        frames = frames[-max_frames:]
    out["frames"] = frames
    if isinstance(exc, BaseExceptionGroup):
        members = []
        for member in exc.exceptions:
            if budget[0] <= 0 or id(member) in seen:
                break
            members.append(_describe(member, MAX_NESTED_FRAMES, budget, seen))
        if len(members) < len(exc.exceptions):
            out["exceptions_omitted"] = len(exc.exceptions) - len(members)
        out["exceptions"] = members
    cause = (
        exc.__cause__
        if exc.__cause__ is not None
        else (None if exc.__suppress_context__ else exc.__context__)
    )
    if cause is not None and id(cause) not in seen:
        if budget[0] > 0:
            out["cause"] = _describe(cause, MAX_NESTED_FRAMES, budget, seen)
        else:
            out["cause"] = {"type": _type_name(type(cause)), "omitted": True}
    return out


def _walk_tb(tb: Any, limit: int = 10_000) -> Iterable[tuple[Any, int]]:
    """(frame, line) pairs of a traceback, bounded in count (a recursion error has ~1000)."""
    for _ in range(limit):
        if tb is None:
            return
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", "")
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in ("builtins", "", None) else f"{module}.{name}"


def _exception_message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not stop the line
        text = "<message unavailable>"
    return _bounded(text, MAX_MESSAGE_CHARS)


def _short_path(filename: str) -> str:
    """The last two components (``node/auth.py``, ``aiohttp/web_protocol.py``): enough to find the file, and
    no install paths or home directories in the log."""
    return "/".join(filename.replace("\\", "/").rsplit("/", 2)[-2:])


def _exception_from(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and isinstance(exc_info[1], BaseException):
        return exc_info[1]
    if exc_info is True:
        return sys.exc_info()[1]
    return None


def _render_exception(_: Any, level: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """``exc_info`` (from ``log.exception`` or ``exc_info=``) becomes a compact ``exception`` field.

    An error whose exception repeats (same event, type and raising frame) is written once per
    :data:`RATE_WINDOW_S`, with ``suppressed`` counting the ones held back: a client that can trigger a bug
    must not be able to fill the log with its tracebacks.
    """
    event_dict.pop("stack_info", None)
    exc = _exception_from(event_dict.pop("exc_info", None))
    if exc is None:
        return event_dict
    try:
        exception = describe_exception(exc)
    except Exception:  # noqa: BLE001 - never lose the line because its exception could not be described
        exception = {"type": _type_name(type(exc)), "message": "<not renderable>", "frames": []}
    if level in ("error", "critical", "exception", "fatal"):
        frames = exception.get("frames") or [""]
        held = _limiter.admit(("event", event_dict.get("event"), exception["type"], frames[-1]))
        if held is None:
            raise structlog.DropEvent
        if held:
            event_dict["suppressed"] = held
    event_dict["exception"] = exception
    return event_dict


# --- rate limiting -------------------------------------------------------------------------------------------

_OVERFLOW_KEY = ("*", "more kinds than the limiter tracks")


class RateLimiter:
    """At most one record per key per window; the next one admitted learns how many were held back.

    Thread-safe (records arrive from the event loop, executor threads and the interpreter's hooks). Memory is
    bounded: at most ``max_keys`` keys; when full, keys whose window has passed with nothing held back are
    forgotten, and if none can be, new kinds share a single overflow key (so they are limited together).
    """

    def __init__(
        self,
        window_s: float = RATE_WINDOW_S,
        max_keys: int = RATE_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [start of the current window, records held back in it]
        self._slots: dict[Hashable, list[float | int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """None: hold this record back. A number: write it, saying that many were held back before it."""
        with self._lock:
            now = self._clock()
            slot = self._slots.get(key)
            if slot is None:
                own_keys = self._max_keys - 1  # one slot stays free for the overflow key
                if len(self._slots) >= own_keys:
                    self._forget_idle(now)
                if len(self._slots) >= own_keys:
                    key = _OVERFLOW_KEY
                    slot = self._slots.get(key)
                if slot is None:
                    self._slots[key] = [now, 0]
                    return 0
            if now - slot[0] >= self._window_s:
                held, slot[0], slot[1] = int(slot[1]), now, 0
                return held
            slot[1] += 1
            return None

    def held_back(self) -> list[tuple[Hashable, int]]:
        """Keys with records held back since their last written one (reported at exit), and reset them."""
        with self._lock:
            out = [(key, int(slot[1])) for key, slot in self._slots.items() if slot[1]]
            for slot in self._slots.values():
                slot[1] = 0
            return out

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, (start, held) in self._slots.items() if not held and now - start >= self._window_s]
        for key in idle:
            del self._slots[key]


# --- standard library logging -------------------------------------------------------------------------------

# Logger name (or its first component) -> the source part of the event name.
_SOURCES = {
    "aiohttp.access": "aiohttp_access",
    "aiohttp.server": "aiohttp_server",
    "aiohttp.web": "aiohttp_web",
    "aiohttp.client": "aiohttp_client",
    "aiohttp.internal": "aiohttp_internal",
    "aiohttp.websocket": "aiohttp_websocket",
    "asyncio": "asyncio",
    "py.warnings": "python_warning",
    "threading": "thread",
    "unraisable": "unraisable",
}


def _client_caused() -> tuple[type[BaseException], ...]:
    """Exceptions a client causes (it hung up, it sent a malformed message): not the node's error."""
    classes: list[type[BaseException]] = [
        ConnectionResetError,
        ConnectionAbortedError,
        BrokenPipeError,
        asyncio.CancelledError,
    ]
    try:
        from aiohttp import ClientConnectionResetError, http_exceptions, web_protocol

        # HttpProcessingError: a malformed request line, header or body encoding; RequestPayloadError: a body
        # that cannot be read (its cause is the HttpProcessingError).
        classes += [
            ClientConnectionResetError,
            http_exceptions.HttpProcessingError,
            web_protocol.RequestPayloadError,
        ]
    except ImportError:  # pragma: no cover - aiohttp is a dependency; the bridge works without it
        pass
    return tuple(classes)


_CLIENT_CAUSED = _client_caused()


def _client_caused_error(exc: BaseException | None) -> bool:
    """``exc`` or one of its first explicit causes is something a client did (aiohttp wraps them). Only
    ``__cause__``: a bug raised while handling a client's hang-up is still a bug."""
    for _ in range(3):
        if exc is None:
            return False
        if isinstance(exc, _CLIENT_CAUSED):
            return True
        exc = exc.__cause__
    return False


def _level_name(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


def stdlib_event_name(logger_name: str, levelno: int) -> str:
    """``<source>_<error|warning|log>``: a fixed vocabulary (``asyncio_error``, ``aiohttp_server_error``…)."""
    source = _SOURCES.get(logger_name) or _SOURCES.get(logger_name.split(".", 1)[0]) or "library"
    kind = "error" if levelno >= logging.ERROR else "warning" if levelno >= logging.WARNING else "log"
    return f"{source}_{kind}"


def _record_message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a record whose arguments do not fit its template
        return _safe_repr(record.msg)


def _template(record: logging.LogRecord) -> str:
    """The part of a record that names its kind: the unformatted template's first line (asyncio puts the
    kind there and the varying context after it)."""
    return str(record.msg).split("\n", 1)[0][:200]


class StdlibBridge(logging.Handler):
    """A stdlib ``logging`` handler that writes records as the node's JSON lines (rate-limited)."""

    def __init__(self, limiter: RateLimiter, level: int = logging.INFO) -> None:
        super().__init__(logging.NOTSET)
        self.limiter = limiter
        self.min_level = level

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit(record)
        except Exception:  # noqa: BLE001 - logging must never raise into (or print from) the caller
            pass

    def _emit(self, record: logging.LogRecord) -> None:
        levelno = record.levelno
        exc = record.exc_info[1] if record.exc_info else None
        client_caused = _client_caused_error(exc)
        if client_caused:
            levelno = logging.DEBUG
        if levelno < self.min_level:
            return
        held = self.limiter.admit((record.name, _template(record)))
        if held is None:
            return
        fields: dict[str, Any] = {"logger": record.name, "message": _record_message(record)}
        if exc is not None:
            if client_caused:
                fields["exception"] = {"type": _type_name(type(exc)), "message": _exception_message(exc)}
            else:
                fields["exception"] = describe_exception(exc)
        if held:
            fields["suppressed"] = held
        logger = structlog.get_logger()
        getattr(logger, _level_name(levelno))(stdlib_event_name(record.name, levelno), **fields)


# --- the pipeline --------------------------------------------------------------------------------------------


class _ThreadedLineWriter:
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_LINES)
        self.dropped = 0
        self.closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        if self.closed:
            # After close (the interpreter is exiting: an uncaught exception, a late warning) the thread is
            # gone; write directly, the event loop is no longer running.
            self._write_now(line)
            return
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 1.0) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _write_now(self, line: bytes) -> None:
        try:
            self._stream.write(line + b"\n")
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1

    def _run(self) -> None:
        while (line := self._queue.get()) is not None:
            try:
                self._stream.write(line + b"\n")
                if self._queue.empty():
                    self._stream.flush()
            except (OSError, ValueError):
                self.dropped += 1


class _Logger:
    """structlog logger that hands rendered bytes to the writer thread."""

    def __init__(self, writer: _ThreadedLineWriter) -> None:
        self._writer = writer

    def msg(self, message: bytes) -> None:
        self._writer.write(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_writer: _ThreadedLineWriter | None = None
_redactor = Redactor()
_defaults: dict[str, Any] = {"node_id": None}
_limiter = RateLimiter()
_bridge: StdlibBridge | None = None
_saved_hooks: dict[str, Any] = {}


def _add_defaults(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Standard keys every line carries even when the caller did not bind them (library records)."""
    for key, value in _defaults.items():
        event_dict.setdefault(key, value)
    return event_dict


def _count_drops(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if _writer is not None and _writer.dropped:
        event_dict["log_lines_dropped"] = _writer.dropped
        _writer.dropped = 0
    return event_dict


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    try:
        return _redactor.event(event_dict)
    except Exception:  # noqa: BLE001 - if redaction cannot run, write almost nothing rather than the raw line
        return {
            "timestamp": event_dict.get("timestamp"),
            "level": event_dict.get("level"),
            "event": "log_redaction_failed",
            "node_id": event_dict.get("node_id"),
        }


_FIRST_KEYS = ("timestamp", "level", "event", "node_id")


def _order_keys(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Put the standard keys first so a line reads well even without jq."""
    ordered = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


def _render_json(_: Any, __: str, event_dict: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(event_dict, default=_safe_repr)
    except Exception:  # noqa: BLE001 - a line that cannot be rendered is replaced, never raised to the caller
        fallback = {k: event_dict.get(k) for k in _FIRST_KEYS if isinstance(event_dict.get(k), str | int)}
        fallback["log_render_failed"] = True
        return orjson.dumps(fallback)


def configure(
    level: str = "info",
    stream: IO[bytes] | None = None,
    *,
    secret: str = "",
    window_s: float = RATE_WINDOW_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Route structlog, the standard library's logging, warnings and uncaught exceptions to JSON lines on
    ``stream`` (default: stdout), redacting ``secret`` (JWT_SECRET) and what is derived from it.
    ``window_s`` and ``clock`` drive the rate limiter (tests pass a fake clock)."""
    global _writer, _redactor, _limiter, _bridge
    if _writer is not None:
        _writer.close()
    _writer = _ThreadedLineWriter(stream or sys.stdout.buffer)
    _redactor = Redactor(secret)
    _limiter = RateLimiter(window_s, clock=clock)
    writer = _writer
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            _add_defaults,
            _render_exception,
            _count_drops,
            _redact,
            _order_keys,
            _render_json,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _Logger(writer),
        cache_logger_on_first_use=True,
    )
    _install_stdlib_bridge(logging.getLevelNamesMapping().get(level.upper(), logging.INFO))
    _install_hooks()


def set_node_id(node_id: int | None) -> None:
    """The ``node_id`` of lines whose logger did not bind one (library records, hooks)."""
    _defaults["node_id"] = node_id


def _install_stdlib_bridge(levelno: int) -> None:
    global _bridge
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    _bridge = StdlibBridge(_limiter, levelno)
    root.addHandler(_bridge)
    root.setLevel(levelno)
    # Loggers configured elsewhere with their own level or handlers still reach the bridge through the root.
    for name in _SOURCES:
        lib = logging.getLogger(name)
        lib.setLevel(logging.NOTSET)
        lib.propagate = True
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
    logging.captureWarnings(True)
    # A handler that fails must not print to stderr (the default); the bridge swallows its own failures.
    _saved_hooks.setdefault("raise_exceptions", logging.raiseExceptions)
    logging.raiseExceptions = False


def _install_hooks() -> None:
    """Uncaught exceptions (main thread, other threads, ``__del__``) as JSON lines instead of stderr text."""
    if "excepthook" not in _saved_hooks:
        _saved_hooks.update(
            excepthook=sys.excepthook, threading=threading.excepthook, unraisable=sys.unraisablehook
        )
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook


def _excepthook(cls: type[BaseException], exc: BaseException, tb: Any) -> None:
    # The interpreter exits next and the writer thread is a daemon: write the line out before it goes.
    structlog.get_logger().critical("uncaught_exception", exc_info=exc)
    flush()


def _thread_excepthook(args: Any) -> None:
    if args.exc_value is None or isinstance(args.exc_value, SystemExit):
        return
    thread = args.thread.name if args.thread is not None else None
    structlog.get_logger().error("thread_failed", thread=thread, exc_info=args.exc_value)


def _unraisablehook(args: Any) -> None:
    record = logging.LogRecord(
        "unraisable",
        logging.WARNING,
        __file__,
        0,
        "%s: %s",
        (args.err_msg or "Exception ignored in", _safe_repr(args.object)),
        (type(args.exc_value), args.exc_value, args.exc_traceback) if args.exc_value is not None else None,
    )
    if _bridge is not None:
        _bridge.handle(record)


def flush() -> None:
    """Report what the rate limiter held back, then write out every queued line (called once, at exit)."""
    global _writer
    if _writer is not None:
        log = structlog.get_logger()
        for key, held in _limiter.held_back():
            log.info("log_suppressed", kind=[str(part) for part in key], suppressed=held)
        _writer.close()
        _writer = None


def reset() -> None:
    """Undo :func:`configure` (tests): structlog defaults, no bridge, the interpreter's own hooks."""
    global _bridge, _redactor
    flush()
    structlog.reset_defaults()
    if _bridge is not None:
        logging.getLogger().removeHandler(_bridge)
        _bridge = None
    logging.captureWarnings(False)
    if "excepthook" in _saved_hooks:
        sys.excepthook = _saved_hooks.pop("excepthook")
        threading.excepthook = _saved_hooks.pop("threading")
        sys.unraisablehook = _saved_hooks.pop("unraisable")
    if "raise_exceptions" in _saved_hooks:
        logging.raiseExceptions = _saved_hooks.pop("raise_exceptions")
    _redactor = Redactor()
    _defaults["node_id"] = None


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger().bind(**bound)
