"""The cluster HTTP API, in process: the documented /cluster/status shape, and bad input → JSON errors.

The application is built the way the node builds it (HttpApi's middleware and body limit, ClusterRoutes)
and served on loopback by aiohttp's test server. Nothing a client sends may break it: after every bad
request the node must keep serving, and no bad request may reach the membership inbox.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import election, peerauth
from node.core import membership as m
from node.core.ids import Endpoint
from node.http.cluster import ClusterRoutes
from node.http.server import DEFAULT_MAX_BODY_BYTES, HttpApi
from node.runtime.mailbox import LatestCell, Mailbox, Overflow
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

ME = Endpoint("10.0.2.2", 3000)  # id 514
LEADER = Endpoint("10.0.3.1", 3000)  # id 769, healthy: leads
DOWN = Endpoint("10.0.2.3", 3000)  # id 515, unhealthy: listed, cannot lead
OTHERS = [Endpoint("10.0.1.1", 3000), Endpoint("10.0.0.200", 3000)]  # ids 257, 200
SECRET = "s" * 32
ME_INCARNATION = 1_800_000_000_123  # this node's peer-message incarnation, reported by /cluster/health
URL_RE = re.compile(r"^http://\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$")


class RecordingLog:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        def log(event: str, **fields) -> None:
            self.records.append((level, event, fields))

        return log


def a_decision() -> election.Leadership:
    state = m.initial(ME, m.Params(failure_threshold=3, node_timeout_s=30.0))
    for endpoint in [DOWN, LEADER, *OTHERS]:  # not in ID order: the API must sort
        state, _ = m.step(state, m.PeerAnnounced(endpoint), now=1.0)
        state, _ = m.step(state, m.ProbeSucceeded(endpoint), now=1.0)
    for _ in range(3):
        state, _ = m.step(state, m.ProbeFailed(DOWN, "refused"), now=1.5)
    decision, _ = election.step(None, state.view())
    return decision


@dataclass
class Api:
    client: TestClient
    inbox: Mailbox[m.Input]
    decisions: LatestCell[election.Leadership]
    log: RecordingLog

    async def assert_still_serving(self) -> None:
        resp = await self.client.get("/cluster/status")
        assert resp.status == 200
        assert (await resp.json())["current_node_id"] == ME.node_id
        resp = await self.client.get("/cluster/health")
        assert resp.status == 200


async def serve(inbox: Mailbox[m.Input], publish: bool = True) -> AsyncIterator[Api]:
    log = RecordingLog()
    decisions: LatestCell[election.Leadership] = LatestCell()
    if publish:
        decisions.publish(a_decision())
    http = HttpApi(host="127.0.0.1", port=0, log=log)
    ClusterRoutes(
        me=ME, decisions=decisions, inbox=inbox, secret=SECRET, log=log, incarnation=ME_INCARNATION
    ).add_to(http.app)
    async with TestClient(TestServer(http.app, host="127.0.0.1")) as client:
        yield Api(client, inbox, decisions, log)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async for a in serve(Mailbox("membership", 64, Overflow.BLOCK)):
        yield a


async def expect_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    return body


# --- /cluster/status -------------------------------------------------------------------------------------

DOCUMENTED = {
    "current_node_id": int,
    "current_role": str,
    "leader_id": int,
    "leader_address": str,
    "total_nodes": int,
    "nodes": list,
}
DOCUMENTED_ADDITIONS = {"healthy_nodes": int, "epoch": int, "view_version": int}
NODE_KEYS = {"id": int, "address": str, "role": str, "is_leader": bool, "healthy": bool}


async def test_status_has_exactly_the_documented_keys_and_types(api):
    resp = await api.client.get("/cluster/status")
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == set(DOCUMENTED) | set(DOCUMENTED_ADDITIONS)
    for key, kind in {**DOCUMENTED, **DOCUMENTED_ADDITIONS}.items():
        assert type(body[key]) is kind, (key, body[key])  # `is`: a bool is not an int here
    assert body["current_node_id"] == ME.node_id
    assert body["current_role"] in ("leader", "follower")
    assert body["current_role"] == "follower"
    assert body["leader_id"] == LEADER.node_id
    assert body["leader_address"] == "http://10.0.3.1:3000" and URL_RE.match(body["leader_address"])
    assert body["total_nodes"] == len(body["nodes"]) == 5
    assert body["healthy_nodes"] == 4

    ids = [n["id"] for n in body["nodes"]]
    assert ids == sorted(ids) == [200, 257, 514, 515, 769]
    for node in body["nodes"]:
        assert set(node) == set(NODE_KEYS)
        for key, kind in NODE_KEYS.items():
            assert type(node[key]) is kind, (key, node)
        assert URL_RE.match(node["address"])
        assert node["role"] in ("leader", "follower")
        assert node["is_leader"] == (node["role"] == "leader") == (node["id"] == body["leader_id"])
    assert [n["healthy"] for n in body["nodes"]] == [True, True, True, False, True]
    assert [n["address"] for n in body["nodes"] if n["is_leader"]] == [body["leader_address"]]


async def test_status_pretty_is_the_same_document(api):
    plain = await (await api.client.get("/cluster/status")).json()
    resp = await api.client.get("/cluster/status?pretty")
    text = await resp.text()
    assert resp.status == 200 and "\n" in text
    assert orjson.loads(text) == plain


async def test_status_before_the_first_election_is_503_json():
    async for api in serve(Mailbox("membership", 4, Overflow.BLOCK), publish=False):
        await expect_error(await api.client.get("/cluster/status"), 503, "unavailable")
        await expect_error(await api.client.get("/cluster/health"), 503, "unavailable")


# --- routing errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/cluster", "/cluster/statuses", "/cluster/status/extra", "/%00", "/..%2f"]
)
async def test_unknown_path_is_404_json(api, path):
    body = await expect_error(await api.client.get(path), 404, "not_found")
    assert "no such endpoint" in body["error"]
    await api.assert_still_serving()


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/cluster/status", "GET"),
        ("DELETE", "/cluster/status", "GET"),
        ("PUT", "/cluster/health", "GET"),
        ("GET", "/cluster/hello", "POST"),
        ("GET", "/cluster/leave", "POST"),
        ("PATCH", "/cluster/hello", "POST"),
    ],
)
async def test_wrong_method_is_405_json_with_allow(api, method, path, allowed):
    resp = await api.client.request(method, path)
    body = await expect_error(resp, 405, "method_not_allowed")
    allow = [m.strip() for m in resp.headers["Allow"].split(",")]
    assert allowed in allow and method not in allow
    assert allowed in body["allowed"] and method in body["error"]
    await api.assert_still_serving()


# --- bodies of the peer notices ----------------------------------------------------------------------------

NOTICES = ["/cluster/hello", "/cluster/leave"]


@pytest.mark.parametrize("path", NOTICES)
@pytest.mark.parametrize(
    "body",
    [
        b"garbage",
        b"{not json",
        b'{"address": "10.0.2.9:3000"',
        bytes(range(256)),
        b"\xff\xfe\x00\x01",
        b"\x00" * 64,
    ],
    ids=["text", "broken-object", "truncated", "all-bytes", "bad-utf8", "nul-bytes"],
)
async def test_garbage_or_binary_body_is_400_naming_the_problem(api, path, body):
    resp = await api.client.post(path, data=body, headers={"Content-Type": "application/json"})
    error = await expect_error(resp, 400, "bad_request")
    assert "invalid JSON" in error["error"]
    assert len(api.inbox) == 0
    await api.assert_still_serving()


@pytest.mark.parametrize("path", NOTICES)
async def test_empty_body_is_400(api, path):
    error = await expect_error(await api.client.post(path, data=b""), 400, "bad_request")
    assert "empty" in error["error"]
    await api.assert_still_serving()


@pytest.mark.parametrize("path", NOTICES)
@pytest.mark.parametrize(
    "body", [b"[1, 2]", b'"10.0.2.9:3000"', b"42", b"null", b"true", b'[{"address": "10.0.2.9:3000"}]']
)
async def test_json_that_is_not_an_object_is_400(api, path, body):
    error = await expect_error(await api.client.post(path, data=body), 400, "bad_request")
    assert "JSON object" in error["error"]
    assert len(api.inbox) == 0
    await api.assert_still_serving()


@pytest.mark.parametrize("path", NOTICES)
@pytest.mark.parametrize(
    "body",
    [
        {},
        {"address": 5},
        {"address": None},
        {"address": "10.0.2.9"},
        {"address": "10.0.2.9:0"},
        {"address": "10.0.2.9:70000"},
        {"address": "::1:3000"},
        {"address": "backend-1:3000"},
        {"address": "1.2.3.4:\u00b2"},
        {"address": "1.2.3.4:" + "9" * 3000},
        {"address": "1.2.3.4:\uff13\uff10\uff10\uff10"},
        {"addr": "10.0.2.9:3000"},
    ],
)
async def test_object_without_a_valid_address_is_400(api, path, body):
    error = await expect_error(await api.client.post(path, json=body), 400, "bad_request")
    assert "address" in error["error"]
    assert len(api.inbox) == 0
    await api.assert_still_serving()


@pytest.mark.parametrize("path", NOTICES)
async def test_huge_body_is_413(api, path):
    body = b'{"address": "' + b"1" * (2 * DEFAULT_MAX_BODY_BYTES) + b'"}'
    await expect_error(await api.client.post(path, data=body), 413, "payload_too_large")
    assert len(api.inbox) == 0
    await api.assert_still_serving()


_SIGNERS: dict[str, peerauth.Signer] = {}


def signed(path: str, sender: str = "10.0.2.9:3000") -> dict[str, str]:
    """A fresh signed header, as the sender's transport makes it (a leave names this node's incarnation)."""
    signer = _SIGNERS.setdefault(sender, peerauth.Signer(peerauth.derive_key(SECRET), sender, 1))
    return {peerauth.HEADER: signer.next_header(path, ME_INCARNATION if path == "/cluster/leave" else 0)}


async def test_valid_notices_are_accepted_and_queued(api):
    resp = await api.client.post(
        "/cluster/hello", json={"address": "10.0.2.9:3000", "node_id": 521}, headers=signed("/cluster/hello")
    )
    assert resp.status == 202
    assert (await resp.json())["accepted"] is True
    resp = await api.client.post(
        "/cluster/leave", json={"address": "10.0.2.9:3000"}, headers=signed("/cluster/leave")
    )
    assert resp.status == 202
    assert [await api.inbox.get(), await api.inbox.get()] == [
        m.PeerAnnounced(Endpoint("10.0.2.9", 3000)),
        m.PeerDeparted(Endpoint("10.0.2.9", 3000)),
    ]


async def test_notice_when_the_inbox_is_full_is_503_with_retry_after():
    async for api in serve(Mailbox("membership", 1, Overflow.BLOCK)):
        resp = await api.client.post(
            "/cluster/hello", json={"address": "10.0.2.9:3000"}, headers=signed("/cluster/hello")
        )
        assert resp.status == 202
        resp = await api.client.post(
            "/cluster/hello",
            json={"address": "10.0.2.10:3000"},
            headers=signed("/cluster/hello", "10.0.2.10:3000"),
        )
        await expect_error(resp, 503, "busy")
        assert resp.headers["Retry-After"] == "1"
        assert len(api.inbox) == 1
        await api.assert_still_serving()


# --- /cluster/health ---------------------------------------------------------------------------------------


async def test_health_answers_ok(api):
    resp = await api.client.get("/cluster/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok" and body["node_id"] == ME.node_id and body["role"] == "follower"
    assert len(api.inbox) == 0  # no prober named: nothing to learn


async def test_health_with_a_valid_from_tells_membership_who_probed(api):
    resp = await api.client.get(
        "/cluster/health", params={"from": "10.0.2.9:3000"}, headers=signed("/cluster/health")
    )
    assert resp.status == 200
    assert await api.inbox.get() == m.ProbedBy(Endpoint("10.0.2.9", 3000))


@pytest.mark.parametrize(
    "prober",
    [
        "",
        "garbage",
        "10.0.2.9",
        "10.0.2.9:",
        "10.0.2.9:abc",
        "10.0.2.9:0",
        "10.0.2.9:65536",
        "::1",
        "[::1]:3000",
        "10.0.2.256:3000",
        "host.example:3000",
        "1.2.3.4:\u00b2",  # a Unicode digit: was a 500 (int() of what str.isdigit() accepted)
        "1.2.3.4:\u0663\u0660\u0660\u0660",  # Arabic-Indic 3000: was accepted as port 3000
        "1.2.3.4:" + "9" * 5000,  # was a 500 (int() refuses 4,300+ digits)
        "1.2.3.\u0664:3000",
    ],
)
async def test_health_with_an_invalid_from_is_400(api, prober):
    error = await expect_error(
        await api.client.get("/cluster/health", params={"from": prober}), 400, "bad_request"
    )
    assert error["error"].startswith("from:")
    assert len(api.inbox) == 0
    await api.assert_still_serving()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prober=st.text(max_size=60))
async def test_any_from_is_200_or_a_json_4xx_never_a_500(api, prober):
    """The whole class: whatever text names the prober, the answer is 400/401 JSON (or 200 if it is valid
    and signed), never a 500 and never a queued event without a signature."""
    resp = await api.client.get("/cluster/health", params={"from": prober})
    assert resp.status in (400, 401), (prober, resp.status)
    assert resp.content_type == "application/json"
    assert (await resp.json())["code"] in ("bad_request", "unauthorized")
    assert len(api.inbox) == 0


async def test_no_bad_request_is_logged_as_a_failure(api):
    await api.client.post("/cluster/hello", data=bytes(range(256)))
    await api.client.get("/cluster/health", params={"from": "nope"})
    await api.client.delete("/cluster/status")
    await api.client.get("/nowhere")
    assert [r for r in api.log.records if r[1] == "request_failed"] == []


# --- a real node process: requests the HTTP parser itself rejects ------------------------------------------


@pytest.fixture
def real_node(tmp_path):
    with Cluster(tmp_path, size=1) as c:
        node = c.start(c.ips[0])
        wait_until(lambda: node.status() is not None, 15, what="the node to serve", describe=c.describe)
        yield node


def raw_exchange(node, payload: bytes, timeout_s: float = 2.0) -> bytes:
    with socket.create_connection((node.ip, node.port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        chunks = []
        for _ in range(64):  # bounded: a response is a few hundred bytes
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


MALFORMED = [
    b"\x00\xff\xfe garbage\r\n\r\n",
    b"GET /cluster/status HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /cluster/hello HTTP/9.9\r\n\r\n",
    bytes(range(256)) * 4,
]


@pytest.mark.integration
def test_real_node_answers_malformed_http_with_400_and_keeps_serving(real_node):
    for payload in MALFORMED:
        reply = raw_exchange(real_node, payload)
        assert reply.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"400"], (payload[:40], reply[:200])
    assert real_node.status() is not None
    assert real_node.running
    assert real_node.log_problems() == []


@pytest.mark.integration
@pytest.mark.parametrize("payload", MALFORMED, ids=["garbage", "bad-content-length", "bad-version", "bytes"])
def test_real_node_answers_malformed_http_with_a_json_error(real_node, payload):
    # Rejected by aiohttp's parser before routing: answered by the node's RequestHandler.handle_error.
    reply = raw_exchange(real_node, payload)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), reply[:300]
    assert orjson.loads(body)["code"] == "bad_request"


@pytest.mark.integration
def test_real_node_answers_a_huge_body_with_413_json_and_keeps_serving(real_node):
    body = b'{"address": "' + b"1" * (2 * DEFAULT_MAX_BODY_BYTES) + b'"}'
    head = (
        f"POST /cluster/hello HTTP/1.1\r\nHost: {real_node.ip}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        reply = raw_exchange(real_node, head + body, timeout_s=5.0)
    except (BrokenPipeError, ConnectionResetError):
        reply = b""  # the node may close the connection before the whole body is sent
    if reply:
        status_line, _, rest = reply.partition(b"\r\n")
        assert status_line.split(b" ")[1] == b"413", reply[:300]
        assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["code"] == "payload_too_large"
    assert real_node.status() is not None
    assert real_node.running
