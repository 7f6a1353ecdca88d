"""A follower's writes to its leader over raw keep-alive HTTP/1.1 connections: the write fast path's other half.

Why: a write sent to a follower cost that follower about three times the CPU of following one (0.32 against
0.10 ms per write at 32 clients, ``bench/replication_profile.py --via follower``), nearly all of it aiohttp
on both sides of the relay: the request machinery that took the client's request, then a client session,
request and response objects and a watch task for the request it sent on. The fast path already reads the
client's request without them (``node.http.fastpath``); this sends it on the same way.

What it does, and nothing else: one request at a time per connection (no pipelining), a request of bytes
built whole by the caller, an answer read by its ``Content-Length`` (what every answer of the leader's
``/db/execute`` carries, on its fast path or through aiohttp). Anything else in an answer (no or two
``Content-Length``, chunks, a 1xx, bytes after the answer, a head over ``MAX_RESPONSE_HEAD_BYTES``) breaks
that connection and the request ends as "outcome unknown", as does a connection that closes before the
whole answer came: the request may have been applied.

Connections are kept per leader, most recently used first, at most ``MAX_IDLE_CONNECTIONS`` idle, each for
at most ``IDLE_S`` (well under any keep-alive the leader allows, so a connection it closed is seldom picked;
one it closed is known closed by then and skipped). At most ``MAX_BUSY`` requests are under way at once:
:meth:`Forwarder.has_room` is false beyond, and the caller leaves the request to aiohttp's path. Idle
connections to another endpoint than the one asked for (a former leader) are closed on the next request.

Timing: a request's answer is awaited until ``timeout_s``, and every ``watch_s`` the caller's
``still_leader`` is asked; once it says no the request ends as "outcome unknown" at once (a leader killed
mid-request sends no RST). One timer per request, re-armed while it waits: no task of its own.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from node.core.ids import Endpoint

IDLE_S = 2.0
MAX_IDLE_CONNECTIONS = 64
MAX_BUSY = 256
MAX_RESPONSE_HEAD_BYTES = 16 << 10
MAX_RESPONSE_BODY_BYTES = 64 << 20

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([2-5][0-9][0-9])(?: [\t -~]*)?\r\n")


class Broken(Exception):
    """The connection broke, or the answer was not one this module reads, before the whole answer came."""


class LeaderLost(Exception):
    """``still_leader`` said no while the answer was awaited."""


class NoAnswer(Exception):
    """No whole answer within the timeout."""


class Unreachable(Exception):
    """No connection could be opened (nothing was sent)."""


def parse_response_head(buf: bytes) -> tuple[int, dict[str, str], int] | None:
    """(status, headers with lower-cased names, head length) of the answer at the start of ``buf``; None
    while its head is still arriving. Raises :class:`Broken` for a head this module does not read: a status
    line it does not know, a malformed header line, a ``Transfer-Encoding``, no ``Content-Length`` or two.
    A header sent twice otherwise keeps its first value."""
    end = buf.find(b"\r\n\r\n", 0, MAX_RESPONSE_HEAD_BYTES + 4)
    if end < 0:
        if len(buf) >= MAX_RESPONSE_HEAD_BYTES + 4:
            raise Broken("the answer's head is too long")
        return None
    status_line = _STATUS_LINE.match(buf, 0, end + 2)
    if status_line is None:
        raise Broken("the answer's status line is not one of HTTP/1.x 200-599")
    headers: dict[str, str] = {}
    block = buf[status_line.end() : end]
    for line in block.split(b"\r\n") if block else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or not name.isascii() or name.strip() != name or b" " in name:
            raise Broken("a malformed header line in the answer")
        key = name.decode("ascii").lower()
        if key in headers:
            if key == "content-length":
                raise Broken("two Content-Length headers in the answer")
            continue
        headers[key] = value.strip(b" \t").decode("latin-1")
    if "transfer-encoding" in headers:
        raise Broken("a chunked answer")
    length = headers.get("content-length")
    if length is None or not length.isdigit() or not length.isascii():
        raise Broken("an answer without a Content-Length")
    if int(length) > MAX_RESPONSE_BODY_BYTES:
        raise Broken("the answer is too large to relay")
    return int(status_line.group(1)), headers, end + 4


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a leader; ``waiter`` is the answer of the request under way, if any."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: tuple[int, dict[str, str], int] | None = None
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.closed = False
        self.keep = True
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, and it calls this a loop step after
        # create_connection returns: exchange() takes the transport from there.)
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection's next answer could not be trusted
            return
        self.buf += data
        try:
            if self.head is None:
                self.head = parse_response_head(self.buf)
                if self.head is None:
                    return
            status, headers, head_len = self.head
            end = head_len + int(headers["content-length"])
            if len(self.buf) < end:
                return
            if len(self.buf) > end:
                raise Broken("bytes after the answer")
        except Broken as exc:
            waiter.set_exception(exc)
            self.close()
            return
        body = bytes(self.buf[head_len:end])
        self.buf.clear()
        self.head = None
        self.keep = headers.get("connection", "").lower() != "close"
        waiter.set_result((status, headers, body))

    def eof_received(self) -> bool:
        self.closed = True
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            reason = f"the connection broke ({exc!r})" if exc else "the leader closed the connection"
            waiter.set_exception(Broken(reason))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Forwarder:
    """Sends whole requests to a leader and reads their answers (see the module docstring)."""

    def __init__(self, *, timeout_s: float, watch_s: float) -> None:
        self._timeout_s = timeout_s
        self._watch_s = watch_s
        self._idle: dict[Endpoint, list[_Connection]] = {}
        self._busy = 0
        self._closed = False

    def has_room(self) -> bool:
        return not self._closed and self._busy < MAX_BUSY

    @property
    def idle_connections(self) -> int:
        return sum(len(pool) for pool in self._idle.values())

    def close(self) -> None:
        """Close every idle connection; a busy one closes when its request ends (its task is cancelled)."""
        self._closed = True
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()

    async def exchange(
        self, leader: Endpoint, request: bytes, still_leader: Callable[[], bool]
    ) -> tuple[int, dict[str, str], bytes]:
        """Send ``request`` (a whole HTTP/1.1 request) to ``leader``; its answer as (status, headers with
        lower-cased names, body). Raises :class:`Unreachable` (nothing sent), :class:`NoAnswer`,
        :class:`LeaderLost` or :class:`Broken`; a cancellation closes the connection (its answer, if it
        comes, belongs to nobody)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        self._busy += 1  # from here: a connection being opened counts as one under way
        try:
            conn = self._take_idle(leader, loop.time())
            if conn is None:
                conn = await self._connect(leader, still_leader, deadline)
            return await self._send(leader, conn, request, still_leader, deadline)
        finally:
            self._busy -= 1

    async def _connect(
        self, leader: Endpoint, still_leader: Callable[[], bool], deadline: float
    ) -> _Connection:
        """A new connection to ``leader``, watched as an answer is: a leader that is lost (a SYN nobody
        answers, after a kill or a cut) ends the attempt at failure-detection speed, not at the timeout."""
        loop = asyncio.get_running_loop()
        lost = False
        timer: asyncio.TimerHandle | None = None
        try:
            async with asyncio.timeout_at(deadline) as limit:

                def watch() -> None:
                    nonlocal timer, lost
                    if not still_leader():
                        lost = True
                        limit.reschedule(loop.time())  # the attempt ends as a timeout, at once
                    else:
                        timer = loop.call_later(self._watch_s, watch)

                timer = loop.call_later(self._watch_s, watch)
                transport, conn = await loop.create_connection(_Connection, leader.host, leader.port)
        except TimeoutError:  # (an OSError too: first)
            reason = "the leader was lost before a connection was made" if lost else "no connection in time"
            raise Unreachable(reason) from None
        except OSError as exc:
            raise Unreachable(str(exc) or type(exc).__name__) from None
        finally:
            if timer is not None:
                timer.cancel()
        conn.transport = transport  # type: ignore[assignment]
        return conn

    async def _send(
        self,
        leader: Endpoint,
        conn: _Connection,
        request: bytes,
        still_leader: Callable[[], bool],
        deadline: float,
    ) -> tuple[int, dict[str, str], bytes]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] = loop.create_future()
        conn.waiter = waiter

        def watch() -> None:
            nonlocal timer
            if waiter.done():
                return
            if not still_leader():
                waiter.set_exception(LeaderLost())
            elif loop.time() >= deadline:
                waiter.set_exception(NoAnswer())
            else:
                timer = loop.call_later(self._watch_s, watch)

        timer = loop.call_later(self._watch_s, watch)
        answered = False
        try:
            conn.transport.write(request)  # type: ignore[union-attr]
            answer = await waiter
            answered = True
            return answer
        finally:
            timer.cancel()
            conn.waiter = None
            if answered and conn.keep and not conn.closed and not self._closed:
                self._keep_idle(leader, conn, loop.time())
            else:
                conn.close()

    def _take_idle(self, leader: Endpoint, now: float) -> _Connection | None:
        if len(self._idle) > 1 or (self._idle and leader not in self._idle):
            for endpoint in [e for e in self._idle if e != leader]:  # a former leader's: not used again
                for conn in self._idle.pop(endpoint):
                    conn.close()
        pool = self._idle.get(leader)
        while pool:
            conn = pool.pop()
            if not conn.closed and now - conn.idle_since <= IDLE_S:
                return conn
            conn.close()
        return None

    def _keep_idle(self, leader: Endpoint, conn: _Connection, now: float) -> None:
        pool = self._idle.setdefault(leader, [])
        if len(pool) >= MAX_IDLE_CONNECTIONS:
            conn.close()
            return
        conn.idle_since = now
        pool.append(conn)
