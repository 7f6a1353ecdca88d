"""HttpApi actor: serves the aiohttp application, behind a guard on connections, until told to stop.

aiohttp alone lets a client hold a connection for ever before it finishes its request headers, accepts as
many connections as the kernel hands over (until ``accept()`` fails with EMFILE, which asyncio then logs as
a traceback per attempt), and answers errors found before routing in plain text. Three small pieces,
all in this module, close those gaps without patching aiohttp:

* :class:`GuardedSite` is a ``web.BaseSite`` (public API) with its own accept loop instead of
  ``loop.create_server``: it sees the peer address *before* a transport exists, so a connection over the
  cap is closed at once (after a tiny 503 JSON) and costs one file descriptor for a moment, and accept
  errors are counted, logged once per interval and retried after a pause, never a traceback each.
  ``loop.create_server`` gives no such hook, and closing refused connections from ``connection_made``
  lets several accept batches of descriptors pile up before the first is closed.
* :class:`GuardedRequestHandler` subclasses ``web.RequestHandler`` (exported by ``aiohttp.web``) and is
  made by the site's protocol factory. It overrides only asyncio's protocol callbacks (``connection_made``,
  ``connection_lost``, ``data_received``, ``pause_writing``, ``resume_writing``) and three public,
  long-standing methods of the handler: ``finish_response`` (the end of each response), ``handle_error``
  (the answer to a request aiohttp's parser rejected) and ``shutdown`` (which first lets a fast-path
  answer in flight finish). No private attribute is read or written. It also carries the write fast path
  (:mod:`node.http.fastpath`): a connection's plain ``POST /db/execute`` requests are answered without
  aiohttp's request machinery until its first request the fast path does not take; from then on every
  byte goes to aiohttp, which therefore always starts at a request boundary.
  tests/http/test_connection_guard.py pins the signatures, so an aiohttp upgrade that changes them fails
  the tests rather than silently dropping a guard.
* :func:`_head_complete`, run first by the node's one middleware (the error middleware), tells the
  handler that aiohttp has parsed a complete request head and handed it over: that is where the header
  timer stops. A middleware runs for every routed request, including 404s and 405s.

Timers on each connection:

* header timer, ``header_read_timeout_s``: armed when the connection opens and when a response has been
  written; stopped when a request head is complete. When it fires the connection is closed, after a 408
  JSON if part of a request had arrived. It also bounds idle keep-alive connections.
* write-stall timer, ``response_write_timeout_s``: armed while the transport's buffer is over its
  high-water mark (the client is not reading); stopped when it drains. When it fires the transport is
  aborted: its buffer is freed and, with ``handler_cancellation``, the handler is cancelled.

Connection slots: ``limits.clients`` for anyone, plus ``limits.privileged`` more that only loopback
(127.0.0.1, ::1: the container health check) and known peers (``is_peer``) may use, so a flood of client
connections cannot make this node unreachable to its cluster. Both come from :func:`connection_limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import http_exceptions, web, web_app

from node import errors
from node.http.common import (
    RESPONSE_BUDGET,
    STREAM_THRESHOLD_BYTES,
    WRITE_TIMEOUT_S,
    InnerLayer,
    ResponseBudget,
    budget_full,
    error_body,
    json_response,
    make_error_middleware,
    release_response,
    unexpected_error,
)
from node.http.fastpath import FastRequest, FastRoute, HttpDate, parse_request, response_bytes

# Cap on request bodies for endpoints that do not set their own (the cluster endpoints take tiny JSON).
DEFAULT_MAX_BODY_BYTES = 1 << 20

# File descriptors kept back from the open-file limit for everything that is not a client connection: the
# database (file, WAL, shm, backups and loads), stdout, DNS sockets, the event loop's own, and outgoing peer
# connections (the transport pools at most 64).
FD_RESERVE = 128
# Connections on top of the client cap that only loopback and known peers may use.
PRIVILEGED_SLOTS = 64
# Client cap when MAX_CLIENT_CONNECTIONS is not set and the descriptor limit is generous. An idle
# connection costs a few kilobytes; this keeps their total far below the container's memory limit.
DEFAULT_CLIENT_CAP = 4096
# Backlog of the listening socket (aiohttp's default).
LISTEN_BACKLOG = 128
# Connections accepted in one go before the accept loop lets other work run.
ACCEPT_BATCH = 64
# Pause after accept() failed for lack of descriptors or memory (asyncio waits 1 s in the same case).
ACCEPT_RETRY_S = 0.25
# Connection events (refused, timed out, dropped) are logged at most once per interval, with a count.
EVENT_LOG_INTERVAL_S = 10.0
# aiohttp's own keep-alive close, a backstop behind the header timer (which closes idle connections first).
KEEPALIVE_BACKSTOP_S = 5.0
# Bytes a fast-path connection may send ahead while its request is answered (pipelining) before this node
# stops reading from it until the answer is out.
FAST_PENDING_BYTES = 256 << 10

LOOPBACK = frozenset({"127.0.0.1", "::1"})


def _raw_json_response(status: int, reason: str, body: dict[str, str], extra: str = "") -> bytes:
    """A complete HTTP/1.1 response, for the two places that answer without aiohttp (refusal, header timeout)."""
    payload = orjson.dumps(body)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


_REFUSED_RESPONSE = _raw_json_response(
    503,
    "Service Unavailable",
    {"error": "too many connections; retry shortly", "code": "busy"},
    "Retry-After: 1\r\n",
)
_TIMEOUT_RESPONSE = _raw_json_response(
    408, "Request Timeout", {"error": "request headers not received in time", "code": "request_timeout"}
)


# --- limits ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The connection and response settings of :class:`HttpApi` (see node/config.py for each)."""

    header_read_timeout_s: float = 10.0
    max_client_connections: int | None = None
    response_write_timeout_s: float = 30.0
    max_buffered_response_bytes: int = 64 << 20
    fast_path: bool = True

    @classmethod
    def from_config(cls, config: Any) -> HttpLimits:
        return cls(
            header_read_timeout_s=config.header_read_timeout_s,
            max_client_connections=config.max_client_connections,
            response_write_timeout_s=config.response_write_timeout_s,
            max_buffered_response_bytes=config.max_buffered_response_bytes,
            fast_path=config.http_fast_path,
        )


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    clients: int  # connections anyone may hold
    privileged: int  # further connections only loopback and known peers may hold
    clamped: bool = False  # the configured client cap was lowered to fit the descriptor limit

    @property
    def total(self) -> int:
        return self.clients + self.privileged


def connection_limits(soft_fd_limit: int | None, configured: int | None) -> ConnectionLimits:
    """Connection slots that fit in ``soft_fd_limit`` descriptors (None: unlimited) after :data:`FD_RESERVE`.

    Every connection holds a descriptor; if connections take them all, ``accept()`` fails, the database
    cannot open a file and peers cannot be probed. So the total is kept below the limit minus the reserve
    whenever the limit leaves any room at all, and a configured cap that does not fit is lowered.
    """
    usable = (1 << 31) if soft_fd_limit is None or soft_fd_limit < 0 else soft_fd_limit - FD_RESERVE
    privileged = min(PRIVILEGED_SLOTS, max(1, usable // 4))
    fitting = max(1, usable - privileged)
    if configured is None:
        return ConnectionLimits(min(DEFAULT_CLIENT_CAP, fitting), privileged)
    return ConnectionLimits(min(configured, fitting), privileged, clamped=configured > fitting)


def soft_fd_limit() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def view_hosts(views: Any) -> Callable[[str], bool]:
    """``is_peer`` for :class:`HttpApi`: is ``ip`` the address of a member of the latest membership view?

    Cached per view version: it is asked once per accepted connection.
    """
    cache: dict[str, Any] = {"version": None, "hosts": frozenset()}

    def is_peer(ip: str) -> bool:
        view = views.get()
        if view is None:
            return False
        if cache["version"] != view.version:
            cache["hosts"] = frozenset(m.endpoint.host for m in view.members if not m.is_self)
            cache["version"] = view.version
        return ip in cache["hosts"]

    return is_peer


# --- counted events ----------------------------------------------------------------------------------------


class EventCounter:
    """Counts one kind of event and logs it at most once per interval, with the count, never once per event.

    The first event after a quiet interval is logged at once; later ones are summed and logged when the
    interval ends (one timer, owned here and cancelled by :meth:`close`).
    """

    def __init__(self, event: str, log: Any, level: str = "info", interval_s: float = EVENT_LOG_INTERVAL_S):
        self.event = event
        self.total = 0
        self._log = log
        self._level = level
        self._interval_s = interval_s
        self._pending = 0
        self._last_s = float("-inf")
        self._handle: asyncio.TimerHandle | None = None

    def hit(self, **fields: Any) -> None:
        self.total += 1
        self._pending += 1
        if self._handle is not None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_s >= self._interval_s:
            self._flush(**fields)
        else:
            self._handle = loop.call_at(self._last_s + self._interval_s, self._flush)

    def _flush(self, **fields: Any) -> None:
        self._handle = None
        if self._pending:
            getattr(self._log, self._level)(
                self.event, count=self._pending, interval_s=self._interval_s, **fields
            )
            self._pending = 0
            self._last_s = asyncio.get_running_loop().time()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._flush()


# --- the guard ---------------------------------------------------------------------------------------------


class ConnectionGuard:
    """Counts open connections and decides, from the peer address alone, whether one more may open."""

    def __init__(self, limits: ConnectionLimits, is_peer: Callable[[str], bool], log: Any) -> None:
        self.limits = limits
        self._is_peer = is_peer
        self._log = log
        self.active = 0
        self.refused = EventCounter("connections_refused", log, "warning")
        self.accept_failed = EventCounter("accept_failed", log, "error")
        self.header_timeouts = EventCounter("header_timeouts", log)
        self.slow_readers = EventCounter("slow_readers_dropped", log)
        # Requests answered by the write fast path, and connections it gave to aiohttp (node.http.fastpath).
        self.fast_requests = 0
        self.fast_handoffs = 0

    def privileged(self, ip: str) -> bool:
        if ip.startswith("::ffff:"):  # an IPv4 client of a dual-stack socket (HOST=::)
            with contextlib.suppress(ValueError):
                mapped = ipaddress.IPv6Address(ip).ipv4_mapped
                ip = str(mapped) if mapped is not None else ip
        if ip in LOOPBACK:
            return True
        try:
            return bool(self._is_peer(ip))
        except Exception:  # noqa: BLE001 - a broken membership lookup must not stop the accept loop
            return False

    def admit(self, ip: str) -> bool:
        if self.active < self.limits.clients:
            return True
        return self.active < self.limits.total and self.privileged(ip)

    def close(self) -> None:
        for counter in (self.refused, self.accept_failed, self.header_timeouts, self.slow_readers):
            counter.close()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol plus the header timer, the write-stall timer, slot accounting and JSON errors."""

    __slots__ = (
        "_guard",
        "_header_timeout_s",
        "_write_timeout_s",
        "_node_log",
        "_head_timer",
        "_head_armed",
        "_head_deadline",
        "_head_timer_at",
        "_stall_timer",
        "_head_bytes",
        "_counted",
        "_fast",
        "_fast_buf",
        "_fast_task",
        "_fast_paused",
        "_fast_stopping",
        "_fast_held",
        "_date",
        "_budget",
    )

    def __init__(
        self,
        manager: Any,
        *,
        guard: ConnectionGuard,
        header_timeout_s: float,
        write_timeout_s: float,
        log: Any,
        date: HttpDate,
        budget: ResponseBudget,
        fast: FastRoute | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        # The write fast path (node.http.fastpath) until the connection's first request it does not take;
        # from then on aiohttp reads everything the connection sends.
        self._fast = fast
        self._fast_buf = b""  # bytes after the request being answered (a pipelining client's next ones)
        self._fast_task: asyncio.Task[None] | None = None  # the fast request being answered, at most one
        self._fast_paused = False  # reading paused: FAST_PENDING_BYTES arrived while a request was answered
        self._fast_stopping = False  # the server shuts down: no fast request is started any more
        self._fast_held = 0  # response budget held by a large fast answer until the transport drains
        self._date = date
        self._budget = budget
        self._guard = guard
        self._header_timeout_s = header_timeout_s
        self._write_timeout_s = write_timeout_s
        self._node_log = log
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_armed = False
        self._head_deadline = 0.0  # loop time at which an armed header timer fires
        self._head_timer_at = 0.0  # the deadline the scheduled _head_timer was scheduled for
        self._stall_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._counted = False

    # --- asyncio protocol callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.active += 1
        self._counted = True
        self._arm_head_timer()
        super().connection_made(transport)
        if self._fast is not None:
            # aiohttp starts its keep-alive timer now, and when it fires it closes a connection on which
            # it has seen no request, however busy the fast path keeps it. The header timer bounds this
            # connection already (armed above, and after every answer); aiohttp starts its own again
            # after its first answer, once it has the connection. keep_alive() is its public switch.
            self.keep_alive(True)

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._stall_timer = None
        self._fast_buf = b""
        if self._fast_task is not None:
            self._fast_task.cancel()  # as aiohttp cancels its handler (handler_cancellation)
        self._release_held()
        if self._counted:
            self._counted = False
            self._guard.active -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_armed:
            self._head_bytes += len(data)
        if self._fast is None:
            super().data_received(data)
        elif self._fast_task is not None or self._fast_stopping:
            self._fast_queue(data)
        else:
            self._fast_take(self._fast_buf + data if self._fast_buf else data)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None and self.transport is not None:
            self._stall_timer = asyncio.get_running_loop().call_later(
                self._write_timeout_s, self._stalled, self.transport
            )

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._release_held()
        super().resume_writing()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """aiohttp's graceful close, after the fast request being answered (if any) got its answer, within
        the same timeout; bytes sent after it are not read, as aiohttp reads no request after a shutdown."""
        self._fast_stopping = True
        task = self._fast_task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
        await super().shutdown(timeout)

    # --- the write fast path (node.http.fastpath) ---------------------------------------------------------

    def _fast_take(self, buf: bytes) -> None:
        """Answer the request at the start of ``buf`` on the fast path, or give ``buf`` and the rest of the
        connection to aiohttp (a request not taken, not whole yet, or not this node's to answer)."""
        fast = self._fast
        request = parse_request(buf) if fast is not None else None
        if fast is None or request is None or not fast.claim(request):
            self._guard.fast_handoffs += 1
            self._fast_off(buf)
            return
        self._guard.fast_requests += 1
        self._head_armed = False  # a whole head arrived: what head_complete does for aiohttp's requests
        self._fast_buf = buf[request.size :]
        self._fast_task = asyncio.get_running_loop().create_task(self._fast_answer(fast, request))

    def _fast_queue(self, data: bytes) -> None:
        """Keep bytes that came while a fast request is answered; past FAST_PENDING_BYTES stop reading."""
        if self._fast_stopping:
            return
        self._fast_buf += data
        transport = self.transport
        if len(self._fast_buf) > FAST_PENDING_BYTES and not self._fast_paused and transport is not None:
            self._fast_paused = True
            transport.pause_reading()

    def _fast_off(self, buf: bytes) -> None:
        self._fast = None
        self._fast_buf = b""
        self._fast_resume_reading()
        if buf:
            super().data_received(buf)

    def _fast_resume_reading(self) -> None:
        if self._fast_paused:
            self._fast_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    async def _fast_answer(self, fast: FastRoute, request: FastRequest) -> None:
        """The task of one fast request, owned by this connection (cancelled when it goes, awaited by
        :meth:`shutdown`). It ends with no exception but a cancellation: whatever fails after the answer was
        chosen (writing it, taking the next request) is logged here and closes the connection."""
        try:
            try:
                status, headers, body = await fast.answer(request)
            except errors.NodeError as exc:
                status, headers, body = exc.status, exc.headers(), orjson.dumps(exc.body())
            except (ConnectionResetError, TimeoutError) as exc:
                self._node_log.debug("request_aborted", path="/db/execute", reason=type(exc).__name__)
                self.force_close()  # what aiohttp does with a handler that raises them
                return
            except Exception as exc:  # noqa: BLE001 - as the error middleware: a 500, never a dead node
                error = unexpected_error(exc, self._node_log, method="POST", path="/db/execute")
                status, headers, body = error.status, error.headers(), orjson.dumps(error.body())
            self._fast_write(status, headers, body)
            if self._fast_stopping or self.transport is None:
                return
            buf, self._fast_buf = self._fast_buf, b""
            self._fast_resume_reading()
            if buf:
                self._head_bytes += len(buf)  # part of a next request came: a header timeout answers 408
                self._fast_take(buf)
        except Exception:  # noqa: BLE001 - nobody awaits this task: its failure is observed here
            self._node_log.exception("request_failed", method="POST", path="/db/execute")
            self.force_close()
        finally:
            if self._fast_task is asyncio.current_task():  # not the next request's task, taken above
                self._fast_task = None

    def _fast_write(self, status: int, headers: dict[str, str] | None, body: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        large = len(body) > STREAM_THRESHOLD_BYTES
        if large and not self._budget.try_reserve(len(body)):
            error = budget_full()  # as the aiohttp path answers a large body the budget cannot hold
            status, headers, body = error.status, error.headers(), orjson.dumps(error.body())
            large = False
        content_type = "application/json"
        if headers and "Content-Type" in headers:  # a forwarded answer's own (node.http.forwarder)
            headers = dict(headers)
            content_type = headers.pop("Content-Type")
        transport.write(response_bytes(status, headers, body, self._date(), content_type=content_type))
        if large:
            # Held while the body waits in the transport's buffer beyond its high-water mark (the client is
            # slow to read): released when it drains (resume_writing) or the connection goes.
            self._fast_held += len(body)
            if self._stall_timer is None:
                self._release_held()
        self._arm_head_timer()

    def _release_held(self) -> None:
        held, self._fast_held = self._fast_held, 0
        if held:
            release_response(self._budget, held)

    # --- hooks --------------------------------------------------------------------------------------------

    def head_complete(self) -> None:
        """A request head has been parsed and handed to the application: stop the header timer.

        Disarmed, not cancelled: the scheduled handle stays and does nothing when it fires (or is moved to
        the next deadline if the timer was armed again meanwhile). Cancelling and scheduling a handle per
        request cost more than the rest of the guard (see :meth:`_arm_head_timer`)."""
        self._head_armed = False

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if resp.status >= 400 and isinstance(resp, web.HTTPException) and not resp.prepared:
            # Raised before the middleware could see it (an Expect the route does not take, 417).
            resp = json_response(
                error_body(resp.status, message=resp.reason), status=resp.status, headers=_kept_headers(resp)
            )
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self.transport is not None:
                self._arm_head_timer()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """JSON instead of aiohttp's text/plain; no traceback on stderr for what a client sent."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if isinstance(exc, ConnectionError):
            self._node_log.debug("request_aborted", reason=type(exc).__name__)
        elif status >= 500:
            self._node_log.error(
                "request_failed", method=request.method, path=request.path, status=status, exc_info=exc
            )
        else:
            self._node_log.debug("http_request_rejected", status=status, reason=str(message or exc)[:200])
        if isinstance(exc, http_exceptions.ContentEncodingError):
            message = "unsupported Content-Encoding; send the body uncompressed, gzip or deflate"
        resp = json_response(error_body(status, exc=exc, message=message), status=status)
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's own error reports (e.g. a body that failed to decode, met again while discarding it).

        They come from what a client sent, so they must not print a traceback to stderr per request.
        """
        exc = kwargs.get("exc_info")
        reason = type(exc).__name__ if isinstance(exc, BaseException) else str(args[0] if args else "")
        self._node_log.debug("http_protocol_error", reason=reason, detail=str(exc)[:200] if exc else None)

    # --- timers -------------------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        """Start the header timer: it fires ``header_timeout_s`` from now unless :meth:`head_complete` runs.

        One handle per connection at a time: a new one is scheduled only when none is pending; a pending
        one scheduled for an earlier deadline moves itself on when it fires (:meth:`_head_timer_fired`).
        On a keep-alive connection this replaces a cancel and a call_later per request by two assignments."""
        self._head_bytes = 0
        self._head_armed = True
        loop = asyncio.get_running_loop()
        self._head_deadline = loop.time() + self._header_timeout_s
        if self._head_timer is None:
            self._head_timer_at = self._head_deadline
            self._head_timer = loop.call_at(self._head_deadline, self._head_timer_fired)

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        if not self._head_armed:
            return  # a head arrived since: nothing to time out until the timer is armed again
        if self._head_deadline > self._head_timer_at:  # armed again after this handle was scheduled
            self._head_timer_at = self._head_deadline
            self._head_timer = asyncio.get_running_loop().call_at(self._head_deadline, self._head_timer_fired)
            return
        self._head_timed_out()

    def _head_timed_out(self) -> None:
        self._head_armed = False
        transport = self.transport
        if transport is None:
            return
        if self._head_bytes:
            self._guard.header_timeouts.hit(timeout_s=self._header_timeout_s)
            with contextlib.suppress(OSError, RuntimeError):
                transport.write(_TIMEOUT_RESPONSE)
        self.force_close()
        # close() waits until the buffer is sent; a client that reads nothing (say, the tail of its last
        # response) would hold the descriptor and its slot for ever. Give it the write timeout, then abort.
        if self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(self._write_timeout_s, transport.abort)

    def _stalled(self, transport: asyncio.Transport) -> None:
        # The transport, not self.transport: aiohttp forgets it when it starts closing, but a close waits
        # for the buffer to drain, which is exactly what a client that reads nothing never lets happen.
        self._stall_timer = None
        self._guard.slow_readers.hit(timeout_s=self._write_timeout_s)
        transport.abort()


def _kept_headers(resp: web.StreamResponse) -> dict[str, str]:
    return {
        k: v for k, v in resp.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")
    }


def _head_complete(request: web.BaseRequest) -> None:
    """Run first by the node's middleware, for every routed request (404s and 405s included)."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.head_complete()


# --- the site: our own accept loop -------------------------------------------------------------------------


_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN}


class GuardedSite(web.BaseSite):
    """Listens on ``host:port`` and admits connections through a :class:`ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        protocol_factory: Callable[[], asyncio.Protocol],
        guard: ConnectionGuard,
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._factory = protocol_factory
        self._guard = guard
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock is not None else self._port

    async def start(self) -> None:
        await super().start()
        family = socket.AF_INET6 if ipaddress.ip_address(self._host).version == 6 else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family, backlog=self._backlog)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(self._accept_loop(sock), name="http-accept")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sock is not None:
            self._sock.close()
        await super().stop()

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for _ in range(ACCEPT_BATCH):  # bounded, then let the rest of the node run
                try:
                    conn, addr = await loop.sock_accept(sock)
                except OSError as exc:
                    if exc.errno in _CLIENT_GONE:
                        continue  # that client left before we took it; nothing wrong here
                    # Out of descriptors or memory (or worse): wait instead of spinning, say so once in a while.
                    self._guard.accept_failed.hit(reason=exc.strerror, open_connections=self._guard.active)
                    await asyncio.sleep(ACCEPT_RETRY_S)
                    continue
                await self._admit(loop, conn, addr[0])
            await asyncio.sleep(0)

    async def _admit(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, ip: str) -> None:
        if not self._guard.admit(ip):
            self._guard.refused.hit(
                open_connections=self._guard.active, max_client_connections=self._guard.limits.clients
            )
            with contextlib.suppress(OSError):
                conn.send(_REFUSED_RESPONSE)  # non-blocking; a fresh socket's buffer takes it
            conn.close()
            return
        try:
            await loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()


# --- the actor ---------------------------------------------------------------------------------------------


class HttpApi:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        log: Any,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        limits: HttpLimits | None = None,
        is_peer: Callable[[str], bool] = lambda ip: False,
        fd_limit: Callable[[], int | None] = soft_fd_limit,
    ):
        self._host = host
        self._port = port
        self._log = log
        self.limits = limits or HttpLimits()
        self.connection_limits = connection_limits(fd_limit(), self.limits.max_client_connections)
        self.guard = ConnectionGuard(self.connection_limits, is_peer, log)
        self.budget = ResponseBudget(self.limits.max_buffered_response_bytes)
        self._inner = InnerLayer()
        self.app = web.Application(
            # One middleware: head complete, errors and (with replication) forwarding in one coroutine.
            middlewares=[make_error_middleware(log, first=_head_complete, inner=self._inner)],
            client_max_size=max_body_bytes,
            handler_args={},
        )
        self.app[RESPONSE_BUDGET] = self.budget
        self.app[WRITE_TIMEOUT_S] = self.limits.response_write_timeout_s
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None
        self._fast: FastRoute | None = None
        self.ready = asyncio.Event()

    @property
    def port(self) -> int:
        return self._site.port if self._site is not None else self._port

    def route_through(self, around: Callable[[web.Request, Any], Any]) -> None:
        """Run ``around(request, handler)`` inside the error handling, around every handler (the forwarding
        of node.http.replication): what an innermost middleware would do, without a coroutine of its own.
        Before :meth:`start` only, once."""
        if self._inner.around is not None or self._runner is not None:
            raise RuntimeError("route_through must be called once, before the server starts")
        self._inner.around = around

    def fast_path(self, route: FastRoute) -> None:
        """Answer whole, plain ``POST /db/execute`` requests through ``route`` without aiohttp's request
        machinery (node.http.fastpath), unless HTTP_FAST_PATH is off. Before :meth:`start` only."""
        if self._runner is not None:
            raise RuntimeError("fast_path must be called before the server starts")
        if self.limits.fast_path:
            self._fast = route

    async def start(self) -> None:
        """Bind and start serving; raises OSError if the address is taken."""
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True
        )
        await runner.setup()
        self._runner = runner
        server = runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        limits = self.limits
        date = HttpDate()

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(
                server,
                loop=loop,
                guard=self.guard,
                header_timeout_s=limits.header_read_timeout_s,
                write_timeout_s=limits.response_write_timeout_s,
                log=self._log,
                fast=self._fast,
                date=date,
                budget=self.budget,
                keepalive_timeout=limits.header_read_timeout_s + KEEPALIVE_BACKSTOP_S,
                access_log=None,
            )

        self._site = GuardedSite(runner, self._host, self._port, protocol_factory=protocol, guard=self.guard)
        await self._site.start()
        self.ready.set()
        cl = self.connection_limits
        if cl.clamped:
            self._log.warning(
                "max_client_connections_lowered",
                configured=limits.max_client_connections,
                used=cl.clients,
                reason="RLIMIT_NOFILE leaves no room for more; raise `ulimit -n` to allow more",
            )
        self._log.info(
            "http_listening",
            host=self._host,
            port=self.port,
            max_client_connections=cl.clients,
            reserved_for_peers=cl.privileged,
            header_read_timeout_s=limits.header_read_timeout_s,
            response_write_timeout_s=limits.response_write_timeout_s,
            max_buffered_response_bytes=limits.max_buffered_response_bytes,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            self._site = None
        self.guard.close()
        _forget_middleware_chains()


def _forget_middleware_chains() -> None:
    """aiohttp keeps each handler's middleware chain in a process-wide cache (an LRU of 1024) keyed by the
    bound handler, so a stopped app's routes, and through them the whole Node (its replication state, its
    closed database objects), stay in memory. A node restarted in the same process after a failure
    (node.runtime.restart) must not carry the failed Nodes along: forget them. The next requests build the
    chains again (one call per route). Private to aiohttp, hence looked up defensively."""
    cache = getattr(web_app, "_cached_build_middleware", None)
    clear = getattr(cache, "cache_clear", None)
    if clear is not None:
        clear()
