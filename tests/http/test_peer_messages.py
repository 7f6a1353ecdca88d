"""Peer messages over real HTTP (in-process aiohttp server): only signed ones change the view."""

import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from node.core import membership as m
from node.core import peerauth
from node.core.election import Leadership, step
from node.core.ids import Endpoint
from node.http.cluster import ClusterRoutes
from node.http.server import HttpApi
from node.runtime import logging as nodelog
from node.runtime.mailbox import LatestCell, Mailbox, Overflow

SECRET = "s" * 32
ME = Endpoint("10.0.0.1", 3000)
PEER = "10.0.0.2:3000"


@pytest.fixture
async def node_http():
    inbox: Mailbox[m.Input] = Mailbox("membership", 4, Overflow.BLOCK)
    decisions: LatestCell[Leadership] = LatestCell()
    decisions.publish(step(None, m.initial(ME, m.Params(3, 30)).view())[0])
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    ClusterRoutes(me=ME, decisions=decisions, inbox=inbox, secret=SECRET, log=nodelog.get_logger()).add_to(api.app)
    async with TestClient(TestServer(api.app)) as client:
        yield client, inbox


def signed(path: str, sender: str = PEER, secret: str = SECRET) -> dict[str, str]:
    return {peerauth.HEADER: peerauth.sign(peerauth.derive_key(secret), path, sender, time.time())}


async def test_signed_leave_is_accepted(node_http):
    client, inbox = node_http
    resp = await client.post("/cluster/leave", json={"address": PEER}, headers=signed("/cluster/leave"))
    assert resp.status == 202
    assert await inbox.get() == m.PeerDeparted(Endpoint.parse(PEER))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        signed("/cluster/leave", secret="other" * 8),
        signed("/cluster/hello"),
        signed("/cluster/leave", sender="10.0.0.9:3000"),
    ],
    ids=["unsigned", "other-secret", "other-path", "other-sender"],
)
async def test_forged_leave_is_refused_and_changes_nothing(node_http, headers, captured_logs):
    client, inbox = node_http
    resp = await client.post("/cluster/leave", json={"address": PEER}, headers=headers)
    assert resp.status == 401
    body = await resp.json()
    assert body["code"] == "unauthorized" and "JWT_SECRET" in body["error"]
    assert "WWW-Authenticate" in resp.headers
    assert len(inbox) == 0
    assert [e["event"] for e in captured_logs if e["event"] == "peer_rejected"] == ["peer_rejected"]


async def test_plain_health_check_needs_no_signature(node_http):
    client, inbox = node_http
    resp = await client.get("/cluster/health")
    assert resp.status == 200
    assert (await resp.json())["node_id"] == ME.node_id
    assert len(inbox) == 0


async def test_probe_naming_a_sender_must_be_signed(node_http):
    client, inbox = node_http
    resp = await client.get("/cluster/health", params={"from": PEER})
    assert resp.status == 401
    resp = await client.get("/cluster/health", params={"from": PEER}, headers=signed("/cluster/health"))
    assert resp.status == 200
    assert await inbox.get() == m.ProbedBy(Endpoint.parse(PEER))


async def test_full_membership_queue_answers_503_with_retry_after(node_http):
    client, inbox = node_http
    for _ in range(4):
        assert inbox.offer(m.Tick())
    resp = await client.post("/cluster/hello", json={"address": PEER}, headers=signed("/cluster/hello"))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["code"] == "busy"


async def test_a_stalled_notice_body_gets_408_instead_of_holding_the_handler():
    inbox: Mailbox[m.Input] = Mailbox("membership", 4, Overflow.BLOCK)
    decisions: LatestCell[Leadership] = LatestCell()
    decisions.publish(step(None, m.initial(ME, m.Params(3, 30)).view())[0])
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    ClusterRoutes(
        me=ME, decisions=decisions, inbox=inbox, secret=SECRET, log=nodelog.get_logger(), body_read_timeout_s=0.3
    ).add_to(api.app)
    async with TestServer(api.app, host="127.0.0.1") as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            # Announce 2000 bytes (under the notice limit), send 10, then nothing.
            writer.write(
                b"POST /cluster/hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2000\r\n\r\n{\"address\""
            )
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        finally:
            writer.close()
        assert status_line.split()[1] == b"408"
        assert len(inbox) == 0
