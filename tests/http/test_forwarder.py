"""The fast path's forwarder (node/http/forwarder.py): its answer parser, and its connections against scripted
leaders (raw asyncio servers that answer what each test says), so every way an exchange can end is seen."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core.ids import Endpoint
from node.http import forwarder as fw
from node.http.forwarder import Broken, Forwarder, parse_response_head
from tests.support.wait import until

ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{"results":[]}'
REQUEST = b"POST /db/execute HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]"


# --- the answer's head ------------------------------------------------------------------------------------


def test_a_plain_answer_is_read():
    status, headers, head_len = parse_response_head(ANSWER)
    assert status == 200 and headers == {"content-type": "application/json", "content-length": "14"}
    assert ANSWER[head_len:] == b'{"results":[]}'


def test_a_head_in_a_bytearray_reads_the_same():  # the connection's buffer is one
    assert parse_response_head(bytearray(ANSWER)) == parse_response_head(ANSWER)


def test_every_prefix_of_the_head_is_still_arriving():
    end = ANSWER.index(b"\r\n\r\n") + 4
    for cut in range(end):
        assert parse_response_head(ANSWER[:cut]) is None
    assert parse_response_head(ANSWER[:end]) is not None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",  # no Content-Length
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n Content-Length: 0\r\n\r\n",  # a folded line
        b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa1\r\n\r\n",  # a non-ASCII digit
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (fw.MAX_RESPONSE_BODY_BYTES + 1),
    ],
)
def test_an_answer_this_module_does_not_read_breaks(head):
    with pytest.raises(Broken):
        parse_response_head(head)


def test_a_head_too_long_breaks_rather_than_waits():
    with pytest.raises(Broken):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX: " + b"a" * fw.MAX_RESPONSE_HEAD_BYTES)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_head_none_or_broken(data):
    try:
        got = parse_response_head(data)
    except Broken:
        with pytest.raises(Broken):
            parse_response_head(bytearray(data))
        return
    assert got is None or (200 <= got[0] <= 599 and got[2] <= len(data))
    assert parse_response_head(bytearray(data)) == got


# --- scripted leaders -------------------------------------------------------------------------------------


class Leader:
    """A raw server: ``script(reader, writer)`` runs for each connection; counts connections and requests."""

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
        self.script = script
        self.connections = 0
        self.closed = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()

    @property
    def endpoint(self) -> Endpoint:
        assert self.server is not None
        return Endpoint("127.0.0.1", self.server.sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def leader(script) -> AsyncIterator[Leader]:
    lead = Leader(script)
    lead.server = await asyncio.start_server(lead._handle, "127.0.0.1", 0)
    try:
        yield lead
    finally:
        lead.server.close()
        await lead.server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


async def answer_each(reader, writer, answer: bytes = ANSWER) -> None:
    while True:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()


def always() -> bool:
    return True


async def test_an_answer_comes_back_and_the_connection_is_used_again():
    async with leader(answer_each) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        for _ in range(3):
            status, headers, body = await forwarder.exchange(lead.endpoint, REQUEST, always)
            assert (status, body) == (200, b'{"results":[]}') and headers[
                "content-type"
            ] == "application/json"
        assert lead.connections == 1 and forwarder.idle_connections == 1
        forwarder.close()
        assert forwarder.idle_connections == 0 and not forwarder.has_room()


async def test_concurrent_requests_use_a_connection_each_and_keep_them():
    async with leader(answer_each) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        answers = await asyncio.gather(
            *(forwarder.exchange(lead.endpoint, REQUEST, always) for _ in range(5))
        )
        assert [a[0] for a in answers] == [200] * 5
        assert lead.connections == 5 and forwarder.idle_connections == 5
        forwarder.close()


async def test_an_answer_with_connection_close_is_not_kept():
    close_answer = ANSWER.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    async with leader(lambda r, w: answer_each(r, w, close_answer)) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        for _ in range(2):
            assert (await forwarder.exchange(lead.endpoint, REQUEST, always))[0] == 200
        assert lead.connections == 2 and forwarder.idle_connections == 0


def reply_once(answer: bytes):
    """A script that answers one request with ``answer`` and closes the connection."""

    async def script(reader, writer) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    return script


async def test_a_connection_the_leader_closed_while_idle_is_not_used():
    async with leader(reply_once(ANSWER)) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        assert (await forwarder.exchange(lead.endpoint, REQUEST, always))[0] == 200
        await until(lambda: lead.closed == 1)
        await until(lambda: all(c.closed for pool in forwarder._idle.values() for c in pool))
        assert (await forwarder.exchange(lead.endpoint, REQUEST, always))[0] == 200  # a new connection
        assert lead.connections == 2


async def test_a_connection_idle_too_long_is_replaced(monkeypatch):
    monkeypatch.setattr(fw, "IDLE_S", 0.0)
    async with leader(answer_each) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        for _ in range(2):
            assert (await forwarder.exchange(lead.endpoint, REQUEST, always))[0] == 200
            await asyncio.sleep(0.01)  # idle for longer than IDLE_S (0)
        assert lead.connections == 2
        await until(lambda: lead.closed == 1)  # the stale one was closed, not left open
        forwarder.close()


async def test_idle_connections_to_a_former_leader_are_closed_on_the_next_request():
    async with leader(answer_each) as old, leader(answer_each) as new:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        await forwarder.exchange(old.endpoint, REQUEST, always)
        await forwarder.exchange(new.endpoint, REQUEST, always)
        await until(lambda: old.closed == 1)
        assert list(forwarder._idle) == [new.endpoint]
        forwarder.close()


async def test_a_large_answer_in_many_pieces_is_read_whole():
    body = b"x" * (3 << 20)
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    async def dribble(reader, writer):
        while True:
            await read_request(reader)
            for start in range(0, len(big), 65536):
                writer.write(big[start : start + 65536])
                await writer.drain()

    async with leader(dribble) as lead:
        forwarder = Forwarder(timeout_s=10, watch_s=0.05)
        for _ in range(2):
            status, _, got = await forwarder.exchange(lead.endpoint, REQUEST, always)
            assert status == 200 and got == body
        assert lead.connections == 1
        forwarder.close()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (ANSWER[:40], "the leader closed the connection"),  # closed mid-head
        (ANSWER[:-3], "the leader closed the connection"),  # closed mid-body
        (ANSWER + b"HTTP/1.1 200 OK", "bytes after the answer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "a chunked answer"),
        (b"garbage\r\n\r\n", "status line"),
    ],
)
async def test_an_answer_cut_or_unreadable_breaks_the_exchange_and_the_connection(answer, reason):
    async with leader(reply_once(answer)) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        with pytest.raises(Broken, match=reason):
            await forwarder.exchange(lead.endpoint, REQUEST, always)
        assert forwarder.idle_connections == 0


async def test_a_leader_that_never_answers_ends_in_no_answer_at_the_timeout():
    async def silent(reader, writer):
        await read_request(reader)
        await reader.read(1)  # no answer; returns when the forwarder closes the connection

    async with leader(silent) as lead:
        forwarder = Forwarder(timeout_s=0.3, watch_s=0.05)
        with pytest.raises(fw.NoAnswer):
            await asyncio.wait_for(forwarder.exchange(lead.endpoint, REQUEST, always), 10)
        assert forwarder.idle_connections == 0
        await until(lambda: lead.closed == 1)  # the connection was closed, not left to answer later


async def _leader_lost_once(
    forwarder: Forwarder, endpoint: Endpoint, reached: asyncio.Event
) -> asyncio.Future:
    """An exchange with ``endpoint`` that is followed as leader until ``reached`` is set, and not after."""
    followed = [True]
    exchange = asyncio.ensure_future(forwarder.exchange(endpoint, REQUEST, lambda: followed[0]))
    await asyncio.wait_for(reached.wait(), 5)
    followed[0] = False
    return exchange


async def test_a_leader_no_longer_followed_ends_the_wait_as_leader_lost():
    arrived = asyncio.Event()

    async def silent(reader, writer):
        await read_request(reader)
        arrived.set()
        await reader.read(1)

    async with leader(silent) as lead:
        forwarder = Forwarder(timeout_s=30, watch_s=0.05)
        exchange = await _leader_lost_once(forwarder, lead.endpoint, arrived)
        with pytest.raises(fw.LeaderLost):
            await asyncio.wait_for(exchange, 5)  # liveness: long before the 30 s timeout
        await until(lambda: lead.closed == 1)  # its connection is not kept for another request
        assert forwarder.idle_connections == 0


async def test_an_unreachable_leader_is_unreachable_and_nothing_is_kept():
    with socket_closed_port() as port:
        forwarder = Forwarder(timeout_s=2, watch_s=0.05)
        with pytest.raises(fw.Unreachable):
            await forwarder.exchange(Endpoint("127.0.0.1", port), REQUEST, always)
        assert forwarder.idle_connections == 0 and forwarder.has_room()


async def test_a_connection_attempt_to_a_lost_leader_ends_when_it_is_no_longer_followed(monkeypatch):
    """A SYN nobody answers (a leader killed or cut off) must not hold the request for the whole timeout:
    the attempt is watched as the answer is."""
    started = asyncio.Event()

    async def never_connects(*args, **kwargs):
        started.set()
        await asyncio.sleep(30)

    forwarder = Forwarder(timeout_s=30, watch_s=0.05)
    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", never_connects)
    exchange = await _leader_lost_once(forwarder, Endpoint("127.0.0.1", 9), started)
    with pytest.raises(fw.Unreachable, match="lost before a connection"):
        await asyncio.wait_for(exchange, 5)  # liveness: long before the 30 s timeout
    assert forwarder.has_room() and forwarder._busy == 0


async def test_a_connection_attempt_ends_at_the_timeout(monkeypatch):
    async def never_connects(*args, **kwargs):
        await asyncio.sleep(30)

    forwarder = Forwarder(timeout_s=0.2, watch_s=0.05)
    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", never_connects)
    with pytest.raises(fw.Unreachable, match="no connection in time"):
        await asyncio.wait_for(forwarder.exchange(Endpoint("127.0.0.1", 9), REQUEST, always), 5)
    assert forwarder._busy == 0


async def test_a_cancelled_exchange_closes_its_connection():
    arrived = asyncio.Event()

    async def late(reader, writer):
        await read_request(reader)
        arrived.set()
        await asyncio.sleep(0.3)
        writer.write(ANSWER)  # the answer of a request nobody waits for any more
        await writer.drain()
        await answer_each(reader, writer)

    async with leader(late) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        exchange = asyncio.ensure_future(forwarder.exchange(lead.endpoint, REQUEST, always))
        await asyncio.wait_for(arrived.wait(), 5)
        exchange.cancel()
        with pytest.raises(asyncio.CancelledError):
            await exchange
        await until(lambda: lead.closed == 1)
        assert forwarder.idle_connections == 0
        # The next request gets its own answer on a new connection, not the late one.
        assert (await forwarder.exchange(lead.endpoint, REQUEST, always))[0] == 200
        assert lead.connections == 2
        forwarder.close()


async def test_busy_requests_are_bounded(monkeypatch):
    monkeypatch.setattr(fw, "MAX_BUSY", 2)
    release = asyncio.Event()

    async def held(reader, writer):
        await read_request(reader)
        await release.wait()
        writer.write(ANSWER)
        await writer.drain()

    async with leader(held) as lead:
        forwarder = Forwarder(timeout_s=5, watch_s=0.05)
        tasks = [asyncio.ensure_future(forwarder.exchange(lead.endpoint, REQUEST, always)) for _ in range(2)]
        await until(lambda: lead.connections == 2)
        assert not forwarder.has_room()
        release.set()
        assert [(await t)[0] for t in tasks] == [200, 200]
        assert forwarder.has_room()
        forwarder.close()


# --- helpers ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def socket_closed_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    yield port
