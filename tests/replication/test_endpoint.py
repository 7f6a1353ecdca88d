"""POST /cluster/replication in process: a batch is accepted once, only with a signature over its body.

A replayed batch, a batch whose body was changed after signing, an unsigned or malformed one: 4xx with a
JSON error, and the Replicator receives nothing from it.
"""

from __future__ import annotations

import itertools

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import peerauth
from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.http.replication import ReplicationRoutes
from node.http.server import HttpApi
from node.replication import codec
from node.replication.transport import PATH
from node.runtime import logging as nodelog

SECRET = "r" * 32
KEY = peerauth.derive_key(SECRET)
SENDER = "10.0.0.2:3000"
INCARNATIONS = itertools.count(100)


class FakeReplicator:
    identity = "me-identity"
    is_member = True

    def __init__(self) -> None:
        self.received: list[tuple[str, Endpoint, list, str]] = []

    def receive(self, sender: str, address: Endpoint, messages: list, cluster: str = "") -> None:
        self.received.append((sender, address, messages, cluster))


@pytest.fixture
async def endpoint():
    replicator = FakeReplicator()
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    ReplicationRoutes(
        replicator=replicator, secret=SECRET, log=nodelog.get_logger(), body_read_timeout_s=5
    ).add_to(api.app)
    async with TestClient(TestServer(api.app)) as client:
        yield client, replicator


def signed(signer: peerauth.Signer, body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", peerauth.HEADER: signer.next_header(PATH, 0, body)}


BATCH = codec.encode_batch("peer-identity", SENDER, [msg.Heartbeat(3, 7, 1), msg.AppendAck(3, 7, 2)])


async def test_a_signed_batch_is_delivered_once_and_its_replay_changes_nothing(endpoint):
    client, replicator = endpoint
    signer = peerauth.Signer(KEY, SENDER, 5)
    headers = signed(signer, BATCH)
    resp = await client.post(PATH, data=BATCH, headers=headers)
    assert resp.status == 200
    assert (await resp.json())["identity"] == "me-identity"
    assert len(replicator.received) == 1 and len(replicator.received[0][2]) == 2
    replay = await client.post(PATH, data=BATCH, headers=headers)
    assert replay.status == 401 and (await replay.json())["code"] == "unauthorized"
    assert len(replicator.received) == 1


async def test_the_senders_cluster_reaches_the_replicator_with_its_messages(endpoint):
    client, replicator = endpoint
    body = codec.encode_batch("peer-identity", SENDER, [msg.Heartbeat(3, 7, 1)], "cluster-a")
    resp = await client.post(PATH, data=body, headers=signed(peerauth.Signer(KEY, SENDER, 5), body))
    assert resp.status == 200
    assert replicator.received == [
        ("peer-identity", Endpoint.parse(SENDER), [msg.Heartbeat(3, 7, 1)], "cluster-a")
    ]


async def test_a_body_changed_after_signing_is_refused(endpoint):
    # Regression: signatures did not cover the body, so entries could be swapped under a valid header.
    client, replicator = endpoint
    signer = peerauth.Signer(KEY, SENDER, 5)
    headers = signed(signer, BATCH)
    other = codec.encode_batch("peer-identity", SENDER, [msg.Heartbeat(4, 9, 1)])
    resp = await client.post(PATH, data=other, headers=headers)
    assert resp.status == 401
    assert replicator.received == []


async def test_unsigned_and_foreign_key_batches_are_refused(endpoint):
    client, replicator = endpoint
    resp = await client.post(PATH, data=BATCH, headers={"Content-Type": "application/json"})
    assert resp.status == 401
    foreign = peerauth.Signer(peerauth.derive_key("x" * 32), SENDER, 5)
    resp = await client.post(PATH, data=BATCH, headers=signed(foreign, BATCH))
    assert resp.status == 401
    assert replicator.received == []


async def test_a_batch_with_a_list_as_message_type_is_a_400_not_a_500(endpoint):
    # Regression: an unhashable message type (or entry kind) raised TypeError out of the decoder: a batch
    # anyone could POST (it is decoded before its signature is checked) was answered 500.
    client, replicator = endpoint
    for msgs in ([[[1], {}]], [["append", {"epoch": 1, "prev": [0, 0], "entries": [[1, 1, [2], ""]]}]]):
        body = codec.encode_batch("peer-identity", SENDER, []).replace(
            b'"msgs":[]', b'"msgs":' + orjson.dumps(msgs)
        )
        resp = await client.post(PATH, data=body, headers={"Content-Type": "application/json"})
        assert resp.status == 400 and (await resp.json())["code"] == "bad_request"
    assert replicator.received == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300))
async def test_any_body_is_a_4xx_or_a_delivery_never_a_crash(endpoint, body):
    client, replicator = endpoint
    # A new incarnation per example: the endpoint (shared by the examples) must not see them as replays.
    signer = peerauth.Signer(KEY, SENDER, next(INCARNATIONS))
    before = len(replicator.received)
    resp = await client.post(PATH, data=body, headers=signed(signer, body))
    assert resp.status in (200, 400)  # signed correctly: only a malformed body is refused
    if resp.status != 200:
        assert "error" in await resp.json()
        assert len(replicator.received) == before
