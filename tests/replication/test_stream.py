"""The replication stream (GET /cluster/replication/stream, a WebSocket): opened only with a signature over
its hello, each frame accepted only in order with its own MAC bound to that opening, and anything else
closes the stream (or refuses the opening) without delivering a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import peerauth
from node.core.replication import messages as msg
from node.http import replication as replication_http
from node.http.replication import ReplicationRoutes
from node.http.server import HttpApi
from node.replication import codec
from node.replication.transport import HELLO_HEADER, STREAM_PATH
from node.runtime import logging as nodelog
from tests.replication.test_endpoint import KEY, SECRET, SENDER, FakeReplicator

INCARNATIONS = itertools.count(1000)
HELLO = codec.encode_hello("peer-identity", SENDER)
MESSAGES = [msg.Heartbeat(3, 7, 1), msg.AppendAck(3, 7, 2)]
BATCH = codec.encode_batch("peer-identity", SENDER, MESSAGES, "cluster-a")


@contextlib.asynccontextmanager
async def serving(replicator):
    """A test client of the replication routes in front of ``replicator``."""
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    ReplicationRoutes(
        replicator=replicator, secret=SECRET, log=nodelog.get_logger(), body_read_timeout_s=5
    ).add_to(api.app)
    async with TestClient(TestServer(api.app)) as client:
        yield client, replicator


@pytest.fixture
async def endpoint():
    async with serving(FakeReplicator()) as served:
        yield served


def opening(key: bytes = KEY, hello: bytes = HELLO) -> tuple[dict[str, str], codec.FrameMac]:
    signer = peerauth.Signer(key, SENDER, next(INCARNATIONS))
    header = signer.next_header(STREAM_PATH, 0, hello)
    parsed = peerauth.parse(header)
    assert parsed is not None
    claims = parsed[0]
    return {peerauth.HEADER: header, HELLO_HEADER: hello.decode()}, codec.FrameMac(
        key, SENDER, claims.incarnation, claims.seq
    )


async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
    """Text frames the node sent before it closed the stream (bounded by the frames it may send)."""
    texts = []
    for _ in range(100):
        frame = await ws.receive(timeout=5)
        if frame.type is aiohttp.WSMsgType.TEXT:
            texts.append(frame.data)
            continue
        assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        return texts
    raise AssertionError("the stream never closed")


async def test_frames_in_order_are_delivered_and_the_node_says_who_it_is(endpoint):
    client, replicator = endpoint
    headers, mac = opening()
    ws = await client.ws_connect(STREAM_PATH, headers=headers)
    facts = await ws.receive(timeout=5)
    assert facts.type is aiohttp.WSMsgType.TEXT and '"identity":"me-identity"' in facts.data
    for seq in (1, 2, 3):
        await ws.send_bytes(codec.encode_frame(mac, seq, BATCH))
    await ws.close()
    for _ in range(100):  # the handler may still be finishing the last frame
        if len(replicator.received) == 3:
            break
        await client.get("/nowhere")
    assert [r[2] for r in replicator.received] == [MESSAGES] * 3
    assert {(r[0], r[3]) for r in replicator.received} == {("peer-identity", "cluster-a")}


async def test_a_replayed_opening_is_refused(endpoint):
    client, _ = endpoint
    headers, _ = opening()
    ws = await client.ws_connect(STREAM_PATH, headers=headers)
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(STREAM_PATH, headers=headers)
    assert refused.value.status == 401


async def test_openings_without_a_valid_signature_or_hello_are_refused(endpoint):
    client, replicator = endpoint
    headers, _ = opening(key=peerauth.derive_key("x" * 32))
    with pytest.raises(aiohttp.WSServerHandshakeError) as foreign:
        await client.ws_connect(STREAM_PATH, headers=headers)
    assert foreign.value.status == 401
    headers, _ = opening()
    headers[HELLO_HEADER] = codec.encode_hello("someone-else", SENDER).decode()
    with pytest.raises(aiohttp.WSServerHandshakeError) as swapped:
        await client.ws_connect(STREAM_PATH, headers=headers)
    assert swapped.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as malformed:
        await client.ws_connect(STREAM_PATH, headers={HELLO_HEADER: "{"})
    assert malformed.value.status == 400
    assert replicator.received == []


BAD_FRAMES = {
    "skipped number": lambda mac: codec.encode_frame(mac, 2, BATCH),
    "replayed number": None,  # frame 1 twice
    "other stream's MAC": lambda mac: codec.encode_frame(opening()[1], 1, BATCH),
    "changed body": lambda mac: codec.encode_frame(mac, 1, BATCH).replace(b'"epoch":3', b'"epoch":9'),
    "other sender in the batch": lambda mac: codec.encode_frame(
        mac, 1, codec.encode_batch("intruder", SENDER, MESSAGES)
    ),
    "not a frame": lambda mac: b"hello",
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
async def test_a_bad_frame_closes_the_stream_and_delivers_nothing(endpoint, case):
    client, replicator = endpoint
    headers, mac = opening()
    ws = await client.ws_connect(STREAM_PATH, headers=headers)
    make = BAD_FRAMES[case]
    if make is None:
        await ws.send_bytes(codec.encode_frame(mac, 1, BATCH))
        await ws.send_bytes(codec.encode_frame(mac, 1, BATCH))
        expected = 1
    else:
        await ws.send_bytes(make(mac))
        expected = 0
    await until_closed(ws)
    assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert len(replicator.received) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_change_to_a_frame_is_refused(data):
    """Property: flipping any byte, truncating, or extending a frame never yields a body."""
    _, mac = opening()
    body = data.draw(st.binary(max_size=200))
    seq = data.draw(st.integers(1, 2**40))
    frame = codec.encode_frame(mac, seq, body)
    assert codec.decode_frame(mac, seq, frame) == body
    change = data.draw(st.sampled_from(["flip", "cut", "extend", "renumber"]))
    if change == "flip":
        at = data.draw(st.integers(0, len(frame) - 1))
        bad = frame[:at] + bytes([frame[at] ^ data.draw(st.integers(1, 255))]) + frame[at + 1 :]
    elif change == "cut":
        bad = frame[: data.draw(st.integers(0, len(frame) - 1))]
    elif change == "extend":
        bad = frame + data.draw(st.binary(min_size=1, max_size=8))
    else:
        bad = frame
        seq = seq + data.draw(st.integers(1, 5))
    with pytest.raises(codec.CodecError):
        codec.decode_frame(mac, seq, bad)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_any_hello_is_a_hello_or_a_codec_error(raw):
    try:
        sender, address = codec.decode_hello(raw)
    except codec.CodecError:
        return
    assert 0 < len(sender) <= codec.MAX_IDENTITY_CHARS and len(address) <= 64


async def test_a_refused_peer_is_noted_until_anything_works_with_it_again():
    """A refused connection (nothing listens: the process is gone) marks the peer for the Replicator's view;
    a timeout or another error does not; any success clears the mark. Each change is reported once."""
    from node.core.ids import Endpoint
    from node.replication.transport import ReplicationTransport

    changes: list[Endpoint] = []
    transport = ReplicationTransport(
        secret=SECRET, me=Endpoint.parse("10.0.0.1:3000"), identity="me", timeout_s=1.0,
        learn=lambda *a: None, log=nodelog.get_logger(), refused=changes.append,
    )  # fmt: skip
    peer = Endpoint.parse(SENDER)
    now = asyncio.get_running_loop().time()
    transport._note_failure(peer, TimeoutError())
    transport._note_failure(peer, OSError("unreachable"))
    assert not transport.recently_refused(peer, now, 2.0) and changes == []
    transport._note_failure(peer, ConnectionRefusedError())
    transport._note_failure(peer, ConnectionRefusedError())
    assert transport.recently_refused(peer, now, 2.0) and changes == [peer]
    assert not transport.recently_refused(peer, now + 5.0, 2.0)  # the mark is held for a while only
    transport.note_alive(peer)
    transport.note_alive(peer)
    assert not transport.recently_refused(peer, now, 2.0) and changes == [peer, peer]


class CountingReplicator(FakeReplicator):
    """Counts how often the stream builds its facts, which a test changes."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0
        self.leader: str | None = None

    @property
    def cluster_facts(self) -> dict:
        self.looks += 1
        return {"leader": self.leader, "leader_id": 0, "data": False, "name": ""}


@pytest.fixture
async def counting_endpoint():
    async with serving(CountingReplicator()) as served:
        yield served


async def delivered(client: TestClient, replicator: FakeReplicator, count: int) -> None:
    for _ in range(200):  # bounded: each round trip lets the handler run
        if len(replicator.received) >= count:
            return
        await client.get("/nowhere")
    raise AssertionError(f"{len(replicator.received)} of {count} frames delivered")


async def test_the_facts_are_not_rebuilt_for_every_frame(counting_endpoint, monkeypatch):
    monkeypatch.setattr(replication_http, "FACTS_CHECK_S", 3600.0)
    client, replicator = counting_endpoint
    headers, mac = opening()
    ws = await client.ws_connect(STREAM_PATH, headers=headers)
    assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT  # at the opening
    for seq in range(1, 21):
        await ws.send_bytes(codec.encode_frame(mac, seq, BATCH))
    await delivered(client, replicator, 20)
    assert replicator.looks == 1
    await ws.close()


async def test_changed_facts_are_sent_on_the_next_frame_once_the_check_is_due(counting_endpoint, monkeypatch):
    monkeypatch.setattr(replication_http, "FACTS_CHECK_S", 0.0)
    client, replicator = counting_endpoint
    headers, mac = opening()
    ws = await client.ws_connect(STREAM_PATH, headers=headers)
    first = await ws.receive(timeout=5)
    assert '"leader":null' in first.data
    replicator.leader = "new-leader"
    await ws.send_bytes(codec.encode_frame(mac, 1, BATCH))
    changed = await ws.receive(timeout=5)
    assert changed.type is aiohttp.WSMsgType.TEXT and '"leader":"new-leader"' in changed.data
    await ws.close()
