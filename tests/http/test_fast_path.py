"""The write fast path (node/http/fastpath.py): which requests it takes, and that its answers are aiohttp's.

The differential tests run two real servers (HttpApi with the forwarding layer, over a real database each):
one with the fast path, one without, and send both the same raw bytes. Status, headers (but ``Date``) and
body must be equal, and the fast server's counters must show that each request went the way the case says
(taken by the fast path or given to aiohttp), so a fast path that silently stopped taking requests fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import auth
from node.core.ids import Endpoint
from node.http import server as server_module
from node.http.db import DbRoutes, ExecuteFastRoute
from node.http.fastpath import MAX_BODY_BYTES, HttpDate, parse_request
from node.http.replication import ForwardingMiddleware
from node.http.server import HttpApi, HttpLimits
from node.replication.service import ANSWERED_EPOCH
from node.runtime.mailbox import LatestCell
from node.service import LocalDataService, WriteOutcome
from node.storage.results import StatementResult
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import QuietLog
from tests.support.wait import until

SECRET = "a-test-secret-that-is-long-enough-0123456789"
MAX_BODY = 16 << 10
WRITE = "Bearer " + auth.mint_jwt(SECRET, auth.Role.WRITE, now=time.time(), ttl_s=86_400)
READ = "Bearer " + auth.mint_jwt(SECRET, auth.Role.READ, now=time.time(), ttl_s=86_400)
EXPIRED = "Bearer " + auth.mint_jwt(SECRET, auth.Role.WRITE, now=time.time() - 7200, ttl_s=60)


def request(
    body: bytes | str,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
    auth_header: str | None = WRITE,
    line: str | None = None,
) -> bytes:
    """Raw bytes of one request: ``POST /db/execute`` unless ``line`` says otherwise."""
    data = body.encode() if isinstance(body, str) else body
    out = [line or f"POST /db/execute{query} HTTP/1.1", "Host: node"]
    if auth_header is not None:
        out.append(f"Authorization: {auth_header}")
    hdrs = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    out += [f"{k}: {v}" for k, v in hdrs.items() if v is not None]
    return ("\r\n".join(out) + "\r\n\r\n").encode() + data


# --- parsing ----------------------------------------------------------------------------------------------


def test_a_plain_write_is_taken_with_its_query_headers_and_body():
    raw = request('["CREATE TABLE t(x)"]', query="?timings&level=strong", headers={"X-Request-Id": " r1 "})
    parsed = parse_request(raw + b"GET /next")
    assert parsed is not None
    assert parsed.query_string == "timings&level=strong"
    assert parsed.headers["authorization"] == WRITE
    assert parsed.headers["x-request-id"] == "r1"  # stripped, as aiohttp strips
    assert parsed.body == b'["CREATE TABLE t(x)"]'
    assert parsed.size == len(raw) and parsed.text is False
    text = parse_request(request("CREATE TABLE t(x)", headers={"Content-Type": "text/plain"}))
    assert text is not None and text.text is True
    bare = parse_request(request("[]", headers={"Content-Type": None}))
    assert bare is not None and bare.text is False  # no Content-Type: JSON, as aiohttp's path reads it


@pytest.mark.parametrize(
    "raw",
    [
        request("[]", line="GET /db/execute HTTP/1.1"),
        request("[]", line="POST /db/query HTTP/1.1"),
        request("[]", line="POST /db/executes HTTP/1.1"),
        request("[]", line="POST /db/execute/ HTTP/1.1"),
        request("[]", line="POST /db/execute HTTP/1.0"),
        request("[]", line="POST /db/execute?a#frag HTTP/1.1"),
        request("[]", line="POST /db/execute?a b HTTP/1.1"),
        request("[]", line="post /db/execute HTTP/1.1"),
        request("[]", headers={"Transfer-Encoding": "chunked"}),
        request("[]", headers={"Content-Encoding": "gzip"}),
        request("[]", headers={"Expect": "100-continue"}),
        request("[]", headers={"Connection": "close"}),
        request("[]", headers={"Upgrade": "websocket"}),
        request("[]", headers={"Content-Length": None}),
        request("[]", headers={"Content-Length": "+2"}),
        request("[]", headers={"Content-Length": str(MAX_BODY_BYTES + 1)}),
        request("[]", headers={"Content-Type": "application/json; charset=utf-8"}),
        request("[]", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        request("[]", headers={"X-Odd": "a\x01b"}),
        request("[]", headers={"Bad Name": "x"}),
        request("[]")[:-1],  # the body is not whole yet
        request("[]").replace(b"\r\n\r\n", b"\r\n"),  # the head is not whole yet
        request("[]").replace(b"Host: node", b"Host: node\r\n folded"),
        request("[]").replace(b"Host: node", b"Authorization: Bearer x"),  # twice
        request("[]").replace(b"Host: node", b"content-length: 2"),  # twice, in another case
        request("[]").replace(b"Host: node", "X-Name: caf\u00e9".encode()),
    ],
)
def test_anything_unusual_is_left_to_aiohttp(raw):
    assert parse_request(raw) is None


def test_a_head_longer_than_the_limit_is_left_to_aiohttp():
    from node.http.fastpath import MAX_HEAD_BYTES

    def with_header(size: int) -> bytes:
        return request("[]", headers={"X-Pad": "p" * size})

    fits = next(n for n in range(MAX_HEAD_BYTES, 0, -1) if len(with_header(n)) - 2 <= MAX_HEAD_BYTES)
    assert parse_request(with_header(fits)) is not None
    assert parse_request(with_header(fits + 1)) is None


def test_every_prefix_of_a_request_is_not_taken_and_the_whole_is():
    raw = request('[["INSERT INTO t VALUES(?)", 1]]', query="?pretty")
    for cut in range(len(raw)):
        assert parse_request(raw[:cut]) is None
    assert parse_request(raw) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=200))
def test_any_bytes_give_a_request_or_none_and_never_raise(head, tail):
    for raw in (head, b"POST /db/execute" + head, request(head) + tail):
        parsed = parse_request(raw)
        if parsed is not None:
            assert parsed.size <= len(raw)
            assert raw[parsed.size - len(parsed.body) : parsed.size] == parsed.body


def test_the_date_header_is_aiohttps_and_formatted_once_a_second():
    now = [1_800_000_000.2]
    date = HttpDate(lambda: now[0])
    first = date()
    assert first == "Fri, 15 Jan 2027 08:00:00 GMT"
    now[0] += 0.5
    assert date() is first
    now[0] += 1
    assert date() == "Fri, 15 Jan 2027 08:00:01 GMT"


# --- two servers, one with the fast path ------------------------------------------------------------------


class Replicator:
    """The forwarding layer's view of replication: this node leads unless ``leader`` names another."""

    def __init__(self) -> None:
        self.leader: Endpoint | None = None

    def leader_endpoint(self) -> Endpoint | None:
        return self.leader

    def is_leader(self) -> bool:
        return self.leader is None


class EpochService:
    """A real local service that says which epoch answered, as the replicated one does."""

    def __init__(self, database: Database, gate: asyncio.Event | None = None) -> None:
        self.inner = LocalDataService(database)
        self.database = database
        self.gate = gate
        self.cancelled = 0

    async def submit(self, write: Any, client: str) -> WriteOutcome:
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        outcome = await self.inner.submit(write, client)
        ANSWERED_EPOCH.set(4)
        return outcome

    async def read(self, *args: Any) -> Any:
        return await self.inner.read(*args)


class Server:
    def __init__(self, api: HttpApi, database: Database, service: Any, replicator: Replicator) -> None:
        self.api, self.database, self.service, self.replicator = api, database, service, replicator

    @property
    def port(self) -> int:
        return self.api.port


@contextlib.asynccontextmanager
async def serving(
    tmp_path, name: str, *, fast: bool, service_factory=EpochService, limits: HttpLimits | None = None
) -> AsyncIterator[Server]:
    """A started server (HttpApi, the forwarding layer, a real database), stopped and closed on exit."""
    database = Database(tmp_path / name, limits=Limits(max_result_rows=50), queue_size=8)
    await database.open()
    service = service_factory(database)
    replicator = Replicator()
    limits = limits or HttpLimits()
    api = HttpApi(
        host="127.0.0.1",
        port=0,
        log=QuietLog(),
        limits=HttpLimits(
            header_read_timeout_s=limits.header_read_timeout_s,
            response_write_timeout_s=limits.response_write_timeout_s,
            max_buffered_response_bytes=limits.max_buffered_response_bytes,
            fast_path=fast,
        ),
    )
    decisions: LatestCell = LatestCell()
    decisions.publish(object())
    routes = DbRoutes(
        service=service, jwt_secret=SECRET, decisions=decisions, max_body_bytes=MAX_BODY,
        max_load_bytes=1 << 20, max_statements=20, body_read_timeout_s=2,
    )  # fmt: skip
    routes.add_to(api.app)
    forwarding = ForwardingMiddleware(
        replicator=replicator, me=Endpoint("127.0.0.1", 1), jwt_secret=SECRET, max_body_bytes=MAX_BODY,
        body_read_timeout_s=2,
    )  # fmt: skip
    api.route_through(forwarding.handle)
    api.fast_path(forwarding.fast_route(ExecuteFastRoute(routes)))  # as node.supervisor wires it
    try:
        await api.start()
        yield Server(api, database, service, replicator)
    finally:
        await api.stop()
        await forwarding.close()
        await database.close()


@pytest.fixture
async def pair(tmp_path):
    async with serving(tmp_path, "fast", fast=True) as fast, serving(tmp_path, "slow", fast=False) as slow:
        yield fast, slow


class Connection:
    """A raw keep-alive client connection that reads whole responses (Content-Length framed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(10):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def comparable(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, str], Any]:
    """An answer without what may differ between two equal answers: the Date, and timings' values."""
    status, headers, body = answer
    headers = {k: v for k, v in headers.items() if k != "date"}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, headers, body
    if isinstance(parsed, dict):
        if "time" in parsed:
            parsed["time"] = "t"
        for result in parsed.get("results") or ():
            if isinstance(result, dict) and "time" in result:
                result["time"] = "t"
    headers.pop("content-length", None)  # a timing's digits change the length
    return status, headers, parsed


# (request, taken by the fast path). In order: later cases use the table the first creates.
CASES: list[tuple[bytes, bool]] = [
    (request('["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)"]'), True),
    (request('[["INSERT INTO t(v, n) VALUES(?, ?)", "a", 1], ["INSERT INTO t(v) VALUES(:v)", {"v": "b"}]]'), True),
    (request('["INSERT INTO t(v) VALUES(\'c\')"]', query="?timings"), True),
    (request('["INSERT INTO t(v) VALUES(\'d\')"]', query="?pretty&transaction"), True),
    (request('["INSERT INTO t(v) VALUES(\'e\')"]', query="?redirect"), True),
    (request('["INSERT INTO t(v) VALUES(\'f\')"]', query="?level=strong&x=%20y+z&&="), True),
    (request('["INSERT INTO nope VALUES(1)", "INSERT INTO t(v) VALUES(\'g\')"]'), True),
    (request('["INSERT INTO nope VALUES(1)", "INSERT INTO t(v) VALUES(\'h\')"]', query="?transaction"), True),
    (request("INSERT INTO t(v) VALUES('i')", headers={"Content-Type": "text/plain"}), True),
    (request('["UPDATE t SET n = 7 RETURNING id, n"]'), True),
    (request('["INSERT INTO t(v) VALUES(\'j\')"]', headers={"X-Request-Id": "req-1"}), True),
    (request('["INSERT INTO t(v) VALUES(\'j\')"]', headers={"X-Request-Id": "req-1"}), True),  # deduplicated
    (request('["INSERT INTO t(v) VALUES(1)"]', headers={"X-Request-Id": "bad id"}), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', auth_header=None), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', auth_header="Bearer nonsense"), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', auth_header=READ), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', auth_header=EXPIRED), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', query="?db_timeout=soon"), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', query="?db_timeout=soon", auth_header=None), True),
    (request("[not json"), True),
    (request(""), True),
    (request("{}"), True),
    (request('["INSERT INTO t(v) VALUES(?)", 1]'), True),
    (request('[["INSERT INTO t(v) VALUES(?)"]]'), True),
    (request(orjson.dumps(["SELECT 1"] * 21)), True),
    (request(orjson.dumps([["INSERT INTO t(v) VALUES(?)", "x" * (MAX_BODY)]])), True),
    (request('[["INSERT INTO t(n) VALUES(?)", 99999999999999999999]]'), True),
    (request(b'["INSERT INTO t(v) VALUES(\'\xff\')"]'), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', headers={"Content-Type": "application/json; charset=utf-8"}), False),
    (request('["INSERT INTO t(v) VALUES(1)"]', headers={"Connection": "close"}), False),
]


@pytest.mark.parametrize("index", range(len(CASES)))
async def test_each_request_gets_aiohttps_answer_on_a_fresh_connection(pair, index):
    fast, slow = pair
    for raw, _ in CASES[:index]:  # the same state on both servers first
        for server in pair:
            conn = await Connection.open(server.port)
            await conn.send(raw)
            await conn.response()
            await conn.close()
    raw, taken = CASES[index]
    answers = []
    before = (fast.api.guard.fast_requests, fast.api.guard.fast_handoffs)
    for server in pair:
        conn = await Connection.open(server.port)
        await conn.send(raw)
        answers.append(await conn.response())
        await conn.close()
    assert comparable(answers[0]) == comparable(answers[1])
    after = (fast.api.guard.fast_requests, fast.api.guard.fast_handoffs)
    assert (after[0] - before[0], after[1] - before[1]) == ((1, 0) if taken else (0, 1))
    assert slow.api.guard.fast_requests == 0


async def test_one_keep_alive_connection_gets_the_same_answers_in_order(pair):
    fast, slow = pair
    answers: dict[int, list] = {}
    for server in pair:
        conn = await Connection.open(server.port)
        got = []
        for raw, _ in CASES:
            if b"Connection: close" in raw:
                continue
            await conn.send(raw)
            got.append(comparable(await conn.response()))
        await conn.close()
        answers[server.port] = got
    assert answers[fast.port] == answers[slow.port]
    # Taken up to the first request the fast path leaves to aiohttp; aiohttp's from then on.
    first_left = next(i for i, (_, taken) in enumerate(CASES) if not taken)
    assert fast.api.guard.fast_requests == first_left
    assert fast.api.guard.fast_handoffs == 1


async def test_pipelined_requests_are_answered_in_order_across_the_handoff(pair):
    raws = [
        request('["CREATE TABLE p (v)"]'),
        request('["INSERT INTO p VALUES(1)"]'),
        request('["INSERT INTO p VALUES(2)"]', query="?pretty"),
        b"GET /readyz?noleader HTTP/1.1\r\nHost: node\r\n\r\n",
        request('["INSERT INTO p VALUES(3)"]'),
    ]
    answers: dict[int, list] = {}
    for server in pair:
        conn = await Connection.open(server.port)
        await conn.send(b"".join(raws))  # all at once: the server reads several requests in one go
        answers[server.port] = [comparable(await conn.response()) for _ in raws]
        await conn.close()
    fast, slow = pair
    assert answers[fast.port] == answers[slow.port]
    assert [a[0] for a in answers[fast.port]] == [200] * 5
    assert fast.api.guard.fast_requests == 3 and fast.api.guard.fast_handoffs == 1


async def test_a_follower_leaves_redirects_to_aiohttp(pair):
    """(Writes a follower forwards: tests/http/test_fast_forward.py.)"""
    fast, slow = pair
    for server in pair:
        server.replicator.leader = Endpoint("127.0.0.9", 4001)
    raw = request('["CREATE TABLE f (v)"]', query="?redirect")
    answers = []
    for server in pair:
        conn = await Connection.open(server.port)
        await conn.send(raw)
        answers.append(comparable(await conn.response()))
        await conn.close()
    assert answers[0] == answers[1]
    assert answers[0][0] == 301 and answers[0][1]["location"] == "http://127.0.0.9:4001/db/execute?redirect"
    assert fast.api.guard.fast_requests == 0 and fast.api.guard.fast_handoffs == 1
    # Forwarded to this node by a follower: answered here, on the fast path.
    conn = await Connection.open(fast.port)
    await conn.send(request('["CREATE TABLE f (v)"]', headers={"X-TalentNest-Forwarded": "127.0.0.2:3000"}))
    status, headers, _ = await conn.response()
    await conn.close()
    assert status == 200 and headers["x-talentnest-node"] == "1" and headers["x-talentnest-epoch"] == "4"
    assert fast.api.guard.fast_requests == 1


# --- the connection around a fast request -----------------------------------------------------------------


async def test_an_idle_connection_after_a_fast_answer_is_closed_by_the_header_timer(tmp_path):
    async with serving(tmp_path, "idle", fast=True, limits=HttpLimits(header_read_timeout_s=0.3)) as server:
        conn = await Connection.open(server.port)
        await conn.send(request('["CREATE TABLE i (v)"]'))
        assert (await conn.response())[0] == 200
        async with asyncio.timeout(10):
            assert await conn.reader.read() == b""  # closed by the node, nothing more sent
        assert server.api.guard.fast_requests == 1
        await conn.close()


async def test_a_busy_fast_connection_outlives_aiohttps_keep_alive_timer(tmp_path, monkeypatch):
    """aiohttp arms a keep-alive timer when a connection opens and closes the connection when it fires if
    it has seen no request: on a connection the fast path keeps busy it must not fire."""
    monkeypatch.setattr(server_module, "KEEPALIVE_BACKSTOP_S", 0.0)  # aiohttp's timer = the header timeout
    async with serving(tmp_path, "busy", fast=True, limits=HttpLimits(header_read_timeout_s=0.3)) as server:
        conn = await Connection.open(server.port)
        await conn.send(request('["CREATE TABLE b (v)"]'))
        assert (await conn.response())[0] == 200
        ends = time.monotonic() + 1.5  # five header timeouts, bounded in count too
        for n in range(10_000):
            if time.monotonic() > ends:
                break
            await conn.send(request(f'["INSERT INTO b VALUES({n})"]'))
            assert (await conn.response())[0] == 200, n
        assert server.api.guard.fast_requests > 1 and server.api.guard.fast_handoffs == 0
        await conn.close()


def gated(gate: asyncio.Event):
    return lambda database: EpochService(database, gate)


async def test_a_client_that_goes_away_cancels_its_fast_request(tmp_path):
    gate = asyncio.Event()
    async with serving(tmp_path, "gone", fast=True, service_factory=gated(gate)) as server:
        try:
            conn = await Connection.open(server.port)
            await conn.send(request('["CREATE TABLE g (v)"]'))
            await until(lambda: server.api.guard.fast_requests == 1, "the request is taken")
            await conn.close()
            await until(lambda: server.service.cancelled == 1, "the waiting write is cancelled")
            await until(lambda: server.api.guard.active == 0, "the connection is gone")
        finally:
            gate.set()


async def test_shutdown_lets_the_fast_request_in_flight_answer(tmp_path):
    gate = asyncio.Event()
    async with serving(tmp_path, "stop", fast=True, service_factory=gated(gate)) as server:
        try:
            conn = await Connection.open(server.port)
            await conn.send(request('["CREATE TABLE s (v)"]'))
            await until(lambda: server.api.guard.fast_requests == 1, "the request is taken")
            stopping = asyncio.create_task(server.api.stop())
            await asyncio.sleep(0)
            gate.set()
            status, _, body = await conn.response()
            assert status == 200 and orjson.loads(body) == {"results": [{}]}
            await stopping
            await conn.close()
        finally:
            gate.set()


class BigAnswerService:
    """Answers every write with one error result larger than the streaming threshold."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def submit(self, write: Any, client: str) -> WriteOutcome:
        return WriteOutcome((StatementResult(error="e" * (300 << 10)),), 1, 1)


async def test_a_large_fast_answer_holds_the_response_budget_until_written(tmp_path):
    async with serving(
        tmp_path, "big", fast=True, service_factory=BigAnswerService,
        limits=HttpLimits(max_buffered_response_bytes=400 << 10),
    ) as server:  # fmt: skip
        reader_conn = await Connection.open(server.port)
        await reader_conn.send(request('["SELECT 1"]'))
        status, _, body = await reader_conn.response()
        assert status == 200 and len(body) > 300 << 10
        await until(lambda: server.api.budget.in_use_bytes == 0, "the budget is given back")
        # A client that reads nothing holds its answer's bytes; a second large answer does not fit: 503.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        stuck = Connection(*await asyncio.open_connection(sock=sock))
        await stuck.send(request('["SELECT 1"]') * 30)  # more answer bytes than the sockets' buffers take
        await until(lambda: server.api.budget.in_use_bytes > 0, "a large answer is held")
        await reader_conn.send(request('["SELECT 1"]'))
        status, headers, body = await reader_conn.response()
        assert status == 503 and headers["retry-after"] and orjson.loads(body)["code"] == "busy"
        await stuck.close()
        await until(lambda: server.api.budget.in_use_bytes == 0, "a closed connection gives its bytes back")
        await reader_conn.close()
