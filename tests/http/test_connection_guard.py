"""The node's HTTP server in process (HttpApi with its own accept loop and RequestHandler), over raw sockets.

What a client can send before, around and after routing: every answer is JSON with a 4xx status (or 503
busy when the node is full), a real bug is still a logged 500, slow and silent clients are dropped, and
large responses stay within the response budget.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import socket
import zlib

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.http import server as http_server
from node.http.common import (
    STREAM_THRESHOLD_BYTES,
    ResponseBudget,
    error_body,
    is_client_input_error,
    json_response,
    read_body,
    send_json,
)
from node.http.server import (
    FD_RESERVE,
    ConnectionGuard,
    EventCounter,
    GuardedRequestHandler,
    HttpApi,
    HttpLimits,
    connection_limits,
)
from tests.support.wait import wait_until


class RecordingLog:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        def log(event: str, **fields) -> None:
            self.records.append((level, event, fields))

        return log

    def events(self, name: str) -> list[dict]:
        return [f for _, e, f in self.records if e == name]


# --- an in-process node HTTP server -------------------------------------------------------------------------


class Served:
    def __init__(self, api: HttpApi, log: RecordingLog) -> None:
        self.api = api
        self.log = log
        self.cancelled: list[str] = []
        self.started: list[str] = []
        self.release = asyncio.Event()

    @property
    def port(self) -> int:
        return self.api.port

    async def exchange(self, raw: bytes, *, read_timeout_s: float = 5.0, max_bytes: int = 1 << 20) -> bytes:
        """Send ``raw``, read until the node closes (or the timeout); the reply's bytes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(raw)
            await writer.drain()
            data = bytearray()
            async with asyncio.timeout(read_timeout_s):
                while chunk := await reader.read(65536):
                    data += chunk
                    if len(data) > max_bytes:
                        break
            return bytes(data)
        except (TimeoutError, ConnectionResetError):
            return bytes(data)
        finally:
            writer.close()


def parse_reply(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def json_reply(reply: bytes) -> tuple[int, dict]:
    status, headers, body = parse_reply(reply)
    assert headers.get("content-type", "").startswith("application/json"), reply[:400]
    length = int(headers.get("content-length", len(body)))
    parsed = orjson.loads(body[:length])
    assert isinstance(parsed.get("error"), str) and parsed["error"], parsed
    assert isinstance(parsed.get("code"), str) and parsed["code"], parsed
    return status, parsed


async def start_api(limits: HttpLimits, *, fd_limit=None) -> Served:
    log = RecordingLog()
    api = HttpApi(host="127.0.0.1", port=0, log=log, limits=limits, fd_limit=lambda: fd_limit)
    served = Served(api, log)

    async def echo(request: web.Request) -> web.Response:
        body = await read_body(request, limit=1 << 20, timeout_s=2.0)
        return json_response({"bytes": len(body)})

    async def accessors(request: web.Request) -> web.Response:
        # What handlers may read; a malformed header must make this a 400, not a 500.
        seen = (
            request.url,
            request.host,
            request.query,
            request.content_type,
            request.charset,
            request.if_modified_since,
            request.if_unmodified_since,
            request.if_range,
            request.cookies,
            request.if_match,
            request.if_none_match,
            request.forwarded,
            request.path,
            request.remote,
        )
        return json_response({"ok": len(seen)})

    async def text(request: web.Request) -> web.Response:
        # aiohttp's own body accessors: the charset and the JSON come from the client.
        body = await request.text()
        return json_response({"json": await request.json() if body.strip() else None})

    async def bug(request: web.Request) -> web.Response:
        return json_response({"n": int(request.query.get("n", "not a number"))})  # ValueError: our bug

    async def big(request: web.Request) -> web.Response:
        size = int(request.query["size"])
        return json_response({"rows": ["x" * 1000] * (size // 1000)})

    async def big_send(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        return await send_json(request, {"rows": ["y" * 1000] * (size // 1000)})

    async def wait(request: web.Request) -> web.Response:
        served.started.append(request.path)
        try:
            await served.release.wait()
        except asyncio.CancelledError:
            served.cancelled.append(request.path)
            raise
        return json_response({"ok": True})

    api.app.router.add_post("/echo", echo)
    api.app.router.add_get("/accessors", accessors)
    api.app.router.add_get("/bug", bug)
    api.app.router.add_post("/text", text)
    api.app.router.add_get("/big", big)
    api.app.router.add_get("/big-send", big_send)
    api.app.router.add_get("/wait", wait)
    await api.start()
    return served


@pytest.fixture
async def node_http():
    served = await start_api(
        HttpLimits(
            header_read_timeout_s=1.0, response_write_timeout_s=0.5, max_buffered_response_bytes=6 << 20
        )
    )
    try:
        yield served
    finally:
        await served.api.stop()


def request(path: str, headers: str = "", body: bytes = b"", method: str = "GET") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}{length}Connection: close\r\n\r\n"
    ).encode("latin-1") + body


# --- the aiohttp hooks this server relies on ----------------------------------------------------------------


def test_the_aiohttp_hooks_the_server_overrides_still_exist_with_their_signatures():
    """An aiohttp upgrade that renames or reshapes these must fail here, not silently drop a guard."""
    base = web.RequestHandler
    assert list(inspect.signature(base.finish_response).parameters) == [
        "self",
        "request",
        "resp",
        "start_time",
    ]
    assert list(inspect.signature(base.handle_error).parameters) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ]
    assert list(inspect.signature(base.shutdown).parameters) == ["self", "timeout"]  # the fast path waits
    assert inspect.iscoroutinefunction(base.shutdown)
    for name in (
        "connection_made",
        "connection_lost",
        "data_received",
        "pause_writing",
        "resume_writing",
        "force_close",
        "keep_alive",
    ):
        assert callable(getattr(base, name)), name
    assert "handler_cancellation" in inspect.signature(web.Server).parameters
    assert issubclass(GuardedRequestHandler, base)


# --- limits -------------------------------------------------------------------------------------------------


@given(
    soft=st.one_of(st.none(), st.integers(0, 1 << 21)),
    configured=st.one_of(st.none(), st.integers(1, 1 << 20)),
)
def test_connection_limits_fit_the_descriptor_limit(soft, configured):
    limits = connection_limits(soft, configured)
    assert limits.clients >= 1 and limits.privileged >= 1
    if soft is not None and soft >= FD_RESERVE + 2:
        assert limits.total <= soft - FD_RESERVE  # accept() never runs out of descriptors for connections
    if configured is not None:
        assert limits.clients <= configured
        assert limits.clamped == (limits.clients < configured)
    else:
        assert limits.clients <= http_server.DEFAULT_CLIENT_CAP and not limits.clamped


def test_peers_and_loopback_get_the_reserved_slice_and_others_do_not():
    guard = ConnectionGuard(connection_limits(None, 2), lambda ip: ip == "10.0.0.7", RecordingLog())
    guard.active = 2
    assert not guard.admit("10.0.0.99")
    assert guard.admit("127.0.0.1") and guard.admit("::1") and guard.admit("10.0.0.7")
    guard.active = guard.limits.total
    assert not guard.admit("127.0.0.1")


def test_a_broken_peer_lookup_does_not_admit_and_does_not_raise():
    def broken(ip: str) -> bool:
        raise RuntimeError("no view")

    guard = ConnectionGuard(connection_limits(None, 1), broken, RecordingLog())
    guard.active = 1
    assert not guard.admit("10.0.0.7")


@given(hits=st.lists(st.floats(0, 0.05), min_size=1, max_size=200))
@settings(deadline=None, max_examples=20)
def test_event_counter_logs_every_event_once_and_at_most_once_per_interval(hits):
    async def run() -> RecordingLog:
        log = RecordingLog()
        counter = EventCounter("connections_refused", log, "warning", interval_s=0.02)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for gap in hits[:50]:
            counter.hit()
            if gap > 0.04:
                await asyncio.sleep(0.001)
        counter.close()
        elapsed = loop.time() - started
        lines = log.events("connections_refused")
        assert sum(f["count"] for f in lines) == len(hits[:50])
        assert len(lines) <= 2 + elapsed / 0.02
        return log

    asyncio.run(run())


# --- answers before routing are JSON ------------------------------------------------------------------------


PRE_ROUTING = {
    "garbage": (b"\x00\xff\xfe garbage\r\n\r\n", 400),
    "bad-request-line": (b"GET\r\n\r\n", 400),
    "bad-content-length": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    "two-content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),
    "header-too-long": (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", 400),
    "brotli": (request("/echo", "Content-Encoding: br\r\n", b"abc", "POST"), 400),
    "expect": (request("/echo", "Expect: 999-foo\r\n", b"abc", "POST"), 417),
    "bad-version": (b"POST /echo HTTP/9.9\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", PRE_ROUTING)
async def test_requests_rejected_before_routing_get_a_json_error(node_http, case):
    raw, expected = PRE_ROUTING[case]
    status, body = json_reply(await node_http.exchange(raw))
    assert status == expected, body
    if case == "brotli":
        assert "Content-Encoding" in body["error"] and "Brotli" not in body["error"]
    assert node_http.log.events("request_failed") == []


@given(garbage=st.binary(min_size=1, max_size=300))
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_any_bytes_get_json_or_nothing_never_a_5xx(node_http, garbage):
    reply = await node_http.exchange(garbage + b"\r\n\r\n", read_timeout_s=3.0)
    if reply:  # a partial request line waits for more and is closed by the header timer: then the 408
        status, _ = json_reply(reply)
        assert 400 <= status < 500
    assert node_http.log.events("request_failed") == []


# --- bodies that do not decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_compressed_as_declared_is_a_400_naming_the_encoding(node_http, encoding):
    raw = request("/echo", f"Content-Encoding: {encoding}\r\n", b'{"not": "compressed"}' * 10, "POST")
    status, body = json_reply(await node_http.exchange(raw))
    assert status == 400 and body["code"] == "bad_request"
    assert encoding in body["error"]
    assert node_http.log.events("request_failed") == []


@given(
    body=st.binary(min_size=1, max_size=2000),
    encoding=st.sampled_from(["gzip", "deflate"]),
    compress=st.booleans(),
    cut=st.integers(0, 100),
)
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_any_body_under_any_content_encoding_is_answered_4xx_or_read(
    node_http, body, encoding, compress, cut
):
    if compress:  # a real stream, maybe truncated
        wbits = 31 if encoding == "gzip" else 15
        packer = zlib.compressobj(wbits=wbits)
        body = packer.compress(body) + packer.flush()
        body = body[: max(1, len(body) - cut)]
    reply = await node_http.exchange(request("/echo", f"Content-Encoding: {encoding}\r\n", body, "POST"))
    if parse_reply(reply)[0] != 200:  # it decoded (aiohttp is lenient with a few short inputs)
        status, parsed = json_reply(reply)
        assert status == 400, parsed
    assert node_http.log.events("request_failed") == []


# --- accessors on malformed headers; a real bug ---------------------------------------------------------------

HEADER_NAMES = ["Host", "Cookie", "Content-Type", "If-Modified-Since", "If-Range", "If-Match", "Forwarded"]


@given(
    name=st.sampled_from(HEADER_NAMES),
    value=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
    ),
    query=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="# "), max_size=30
    ),
)
@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_malformed_headers_and_queries_never_make_a_5xx(node_http, name, value, query):
    host = "" if name == "Host" else "Host: 127.0.0.1\r\n"
    raw = (
        f"GET /accessors?{query} HTTP/1.1\r\n{host}{name}: {value.strip()}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    reply = await node_http.exchange(raw)
    if parse_reply(reply)[0] != 200:
        status, _ = json_reply(reply)
        assert status == 400
    assert node_http.log.events("request_failed") == []


@given(
    charset=st.one_of(
        st.from_regex(r"\A[a-z0-9_-]{1,12}\Z"), st.sampled_from(["utf-8", "latin-1", "utf-16"])
    ),
    body=st.one_of(st.binary(max_size=100), st.sampled_from([b'{"a": 1}', b"[1, 2", "é".encode("latin-1")])),
)
@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_bodies_read_through_aiohttps_accessors_never_make_a_5xx(node_http, charset, body):
    raw = request("/text", f"Content-Type: application/json; charset={charset}\r\n", body, "POST")
    reply = await node_http.exchange(raw)
    if parse_reply(reply)[0] != 200:
        status, _ = json_reply(reply)
        assert status == 400
    assert node_http.log.events("request_failed") == []


async def test_a_malformed_host_is_a_400_not_a_500(node_http):
    raw = b"GET /accessors HTTP/1.1\r\nHost: a:b:c\r\nConnection: close\r\n\r\n"
    status, body = json_reply(await node_http.exchange(raw))
    assert status == 400 and body["code"] == "bad_request"


async def test_a_real_bug_is_still_a_logged_500(node_http):
    status, body = json_reply(await node_http.exchange(request("/bug")))
    assert status == 500 and body["code"] == "internal_error"
    assert len(node_http.log.events("request_failed")) == 1


def test_client_input_errors_are_told_apart_from_bugs():
    from yarl import URL

    with pytest.raises(ValueError) as from_yarl:
        URL("http://a:b:c/").port  # noqa: B018
    assert is_client_input_error(from_yarl.value)
    assert not is_client_input_error(ValueError("raised by the node"))
    assert not is_client_input_error(KeyError("x"))
    with pytest.raises(LookupError) as codec:
        b"x".decode("no-such-charset")
    assert not is_client_input_error(codec.value)  # raised by the node's own call: a bug
    # (through aiohttp's request.text() the same error is the client's: see the charset test above)
    assert is_client_input_error(zlib.error("bad"))


def test_error_body_has_the_documented_shape_for_every_status():
    for status in (400, 404, 408, 413, 417, 431, 500, 503, 504, 599):
        body = error_body(status)
        assert set(body) == {"error", "code"} and body["error"] and body["code"].isidentifier()


# --- slow clients -------------------------------------------------------------------------------------------


async def test_a_silent_connection_is_closed_after_the_header_timeout(node_http):
    reader, writer = await asyncio.open_connection("127.0.0.1", node_http.port)
    try:
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # nothing sent, nothing answered: just closed
    finally:
        writer.close()


async def test_a_kept_alive_connection_gets_the_header_timeout_after_each_response(node_http):
    reader, writer = await asyncio.open_connection("127.0.0.1", node_http.port)
    try:
        for _ in range(3):
            writer.write(b"GET /accessors HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(
                next(
                    line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
                ).split(b":")[1]
            )
            await reader.readexactly(length)
        writer.write(b"GET /accessors HTTP/1.1\r\nHo")  # and then nothing more
        async with asyncio.timeout(10):
            rest = await reader.read()
        status, body = json_reply(rest)
        assert status == 408 and body["code"] == "request_timeout"
    finally:
        writer.close()


async def _one_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /accessors HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    await reader.readexactly(length)


async def test_the_header_timer_counts_from_the_last_response_not_from_the_first(node_http):
    """The header timer is re-armed lazily (one handle per connection): a connection busy for longer than
    the header timeout is never cut, and an idle one is closed a full timeout after its last response."""
    timeout_s = node_http.api.limits.header_read_timeout_s
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", node_http.port)
    try:
        started = loop.time()
        for _ in range(200):  # bounded; about 2.5 timeouts of steady requests on one connection
            if loop.time() - started > 2.5 * timeout_s:
                break
            await _one_exchange(reader, writer)
            await asyncio.sleep(timeout_s / 5)
        await _one_exchange(reader, writer)
        last_answer = loop.time()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # idle: closed, with nothing sent
        assert loop.time() - last_answer >= timeout_s * 0.9
    finally:
        writer.close()


def non_reading_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("path", ["/big", "/big-send"])
async def test_a_client_that_never_reads_a_large_response_is_dropped_and_its_memory_released(node_http, path):
    size = 16 << 20
    sock = non_reading_socket(node_http.port)
    try:
        sock.send(request(f"{path}?size={size}"))
        budget = node_http.api.budget
        await asyncio.to_thread(
            wait_until,
            lambda: budget.in_use_bytes > 0 or budget.peak_bytes > 0,
            10,
            0.02,
            what="the response to be sent",
        )
        await asyncio.to_thread(
            wait_until,
            lambda: node_http.api.guard.slow_readers.total >= 1,
            10,
            0.05,
            what="the silent reader to be dropped",
        )
        await asyncio.to_thread(
            wait_until, lambda: budget.in_use_bytes == 0, 10, 0.05, what="the budget freed"
        )
        await asyncio.to_thread(
            wait_until, lambda: node_http.api.guard.active == 0, 10, 0.05, what="the connection to be gone"
        )
    finally:
        sock.close()


async def test_large_responses_beyond_the_budget_answer_503_busy(node_http):
    size = 4 << 20  # budget is 6 MiB: one fits, a second does not while the first is held
    holder = non_reading_socket(node_http.port)
    try:
        holder.send(request(f"/big?size={size}"))
        budget = node_http.api.budget
        await asyncio.to_thread(wait_until, lambda: budget.in_use_bytes > 0, 10, 0.02, what="a held response")
        status, headers, body = parse_reply(await node_http.exchange(request(f"/big-send?size={size}")))
        assert status == 503 and headers.get("retry-after") == "1"
        assert orjson.loads(body)["code"] == "busy"
        small = await node_http.exchange(request(f"/big?size={STREAM_THRESHOLD_BYTES // 2}"))
        assert parse_reply(small)[0] == 200  # small answers are not held back
    finally:
        holder.close()


@given(sizes=st.lists(st.integers(1, 5 << 20), min_size=1, max_size=30))
def test_the_budget_never_holds_more_than_its_limit_unless_one_response_alone_is_larger(sizes):
    budget = ResponseBudget(6 << 20)
    held = []
    for size in sizes:
        if budget.try_reserve(size):
            held.append(size)
        assert budget.in_use_bytes == sum(held)
        assert budget.in_use_bytes <= max(budget.limit_bytes, max(held, default=0))
        if len(held) > 2:
            budget.release(held.pop(0))
    for size in held:
        budget.release(size)
    assert budget.in_use_bytes == 0


# --- connection cap and handler cancellation -----------------------------------------------------------------


async def test_connections_over_the_cap_are_refused_with_a_json_503_and_counted():
    served = await start_api(HttpLimits(header_read_timeout_s=5.0, max_client_connections=3))
    held: list[socket.socket] = []
    try:
        guard = served.api.guard
        for _ in range(3):
            s = socket.socket()
            s.bind(("127.0.0.9", 0))  # not loopback's 127.0.0.1: an ordinary client
            s.connect(("127.0.0.1", served.port))
            held.append(s)
        await asyncio.to_thread(wait_until, lambda: guard.active == 3, 5, 0.02, what="three connections")
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port, local_addr=("127.0.0.9", 0))
        try:
            async with asyncio.timeout(5):
                reply = await reader.read()
        finally:
            writer.close()
        status, body = json_reply(reply)
        assert status == 503 and body["code"] == "busy"
        assert guard.refused.total == 1 and guard.active == 3
        # loopback still gets in, in the reserved slice
        assert parse_reply(await served.exchange(request("/accessors")))[0] == 200
    finally:
        for s in held:
            s.close()
        await served.api.stop()
    assert served.log.events("connections_refused")[0]["count"] == 1


async def test_a_client_that_disconnects_cancels_its_handler(node_http):
    reader, writer = await asyncio.open_connection("127.0.0.1", node_http.port)
    writer.write(request("/wait"))
    await writer.drain()
    await asyncio.to_thread(wait_until, lambda: node_http.started == ["/wait"], 5, 0.02, what="the handler")
    writer.close()
    await asyncio.to_thread(
        wait_until, lambda: node_http.cancelled == ["/wait"], 5, 0.02, what="the handler to be cancelled"
    )


async def test_an_unknown_path_is_a_json_404(node_http):
    status, body = json_reply(await node_http.exchange(request("/nowhere")))
    assert status == 404 and body["code"] == "not_found"


@pytest.mark.parametrize("path", ["/big", "/big-send"])
async def test_a_reading_client_gets_the_whole_streamed_body_intact(node_http, path):
    size = 2 << 20
    status, headers, body = parse_reply(
        await node_http.exchange(request(f"{path}?size={size}"), read_timeout_s=20, max_bytes=4 << 20)
    )
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    assert len(orjson.loads(body)["rows"]) == size // 1000
    assert node_http.api.budget.in_use_bytes == 0 and node_http.api.budget.peak_bytes >= len(body)


def test_ipv4_clients_of_a_dual_stack_socket_are_recognised_as_loopback_or_peers():
    guard = ConnectionGuard(connection_limits(None, 1), lambda ip: ip == "10.0.0.7", RecordingLog())
    guard.active = 1
    assert guard.admit("::ffff:127.0.0.1") and guard.admit("::ffff:10.0.0.7")
    assert not guard.admit("::ffff:10.0.0.8") and not guard.admit("::ffff:zz")


async def test_expect_100_continue_still_works(node_http):
    reader, writer = await asyncio.open_connection("127.0.0.1", node_http.port)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
            writer.write(b"abc")
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()


async def test_accept_failures_are_counted_and_logged_once_per_interval_not_per_attempt(monkeypatch):
    monkeypatch.setattr(http_server, "ACCEPT_RETRY_S", 0.001)
    loop = asyncio.get_running_loop()
    failures = 50
    calls = 0
    blocked = asyncio.Event()

    async def exhausted(sock):
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise OSError(errno.EMFILE, "Too many open files")
        blocked.set()
        await asyncio.Event().wait()  # then no more clients

    monkeypatch.setattr(loop, "sock_accept", exhausted)
    served = await start_api(HttpLimits())
    try:
        async with asyncio.timeout(10):
            await blocked.wait()
        assert served.api.guard.accept_failed.total == failures
        assert len(served.log.events("accept_failed")) == 1  # the rest are counted into the next line
    finally:
        await served.api.stop()
    lines = served.log.events("accept_failed")
    assert len(lines) == 2 and sum(line["count"] for line in lines) == failures


def test_the_connection_settings_are_read_from_the_environment_and_validated():
    from node.config import Config, ConfigError

    env = {
        "JWT_SECRET": "x" * 32,
        "HEADER_READ_TIMEOUT": "2.5",
        "MAX_CLIENT_CONNECTIONS": "100",
        "RESPONSE_WRITE_TIMEOUT": "7",
        "MAX_BUFFERED_RESPONSE_BYTES": "1048576",
    }
    config = Config.from_env(env)
    limits = HttpLimits.from_config(config)
    assert limits == HttpLimits(2.5, 100, 7.0, 1 << 20)
    assert Config.from_env({"JWT_SECRET": "x" * 32}).max_client_connections is None
    with pytest.raises(ConfigError) as bad:
        Config.from_env({**env, "HEADER_READ_TIMEOUT": "0", "MAX_CLIENT_CONNECTIONS": "-1"})
    assert len(bad.value.problems) == 2
