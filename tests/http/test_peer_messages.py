"""Peer messages over real HTTP: only signed ones change the view, and each is accepted once.

In process (aiohttp test server with the node's routes) for the message-level rules; against a real
``python -m node`` process for what an attacker who captured traffic can do: replay a leave, replay it
after the receiver restarted.
"""

import asyncio
import json
import random
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import membership as m
from node.core import peerauth
from node.core.election import Leadership, step
from node.core.ids import Endpoint
from node.http.cluster import ClusterRoutes
from node.http.server import HttpApi
from node.runtime import logging as nodelog
from node.runtime.mailbox import LatestCell, Mailbox, Overflow
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

SECRET = "s" * 32
KEY = peerauth.derive_key(SECRET)
ME = Endpoint("10.0.0.1", 3000)
ME_INCARNATION = 1_800_000_000_000
PEER = "10.0.0.2:3000"
PEER_INCARNATION = 1_700_000_000_000


def routes(inbox, incarnation=ME_INCARNATION, **kwargs):
    decisions: LatestCell[Leadership] = LatestCell()
    decisions.publish(step(None, m.initial(ME, m.Params(3, 30)).view())[0])
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    ClusterRoutes(
        me=ME,
        decisions=decisions,
        inbox=inbox,
        secret=SECRET,
        log=nodelog.get_logger(),
        incarnation=incarnation,
        **kwargs,
    ).add_to(api.app)
    return api


@pytest.fixture
async def node_http():
    inbox: Mailbox[m.Input] = Mailbox("membership", 256, Overflow.BLOCK)
    async with TestClient(TestServer(routes(inbox).app)) as client:
        yield client, inbox


def signer(sender: str = PEER, incarnation: int = PEER_INCARNATION, secret: str = SECRET) -> peerauth.Signer:
    return peerauth.Signer(peerauth.derive_key(secret), sender, incarnation)


def signed(path: str, sender: str = PEER, secret: str = SECRET, rinc: int | None = None) -> dict[str, str]:
    """A fresh header; a leave names this node's incarnation unless told otherwise."""
    if rinc is None:
        rinc = ME_INCARNATION if path == "/cluster/leave" else 0
    return {peerauth.HEADER: signer(sender, secret=secret).next_header(path, rinc)}


async def drain(inbox: Mailbox[m.Input]) -> list[m.Input]:
    """Everything queued so far (get() does not wait: the items are there)."""
    return [await inbox.get() for _ in range(len(inbox))]


async def expect_401(resp) -> dict:
    assert resp.status == 401, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["code"] == "unauthorized" and body["error"]
    return body


async def test_signed_leave_is_accepted(node_http):
    client, inbox = node_http
    resp = await client.post("/cluster/leave", json={"address": PEER}, headers=signed("/cluster/leave"))
    assert resp.status == 202
    assert (await resp.json())["incarnation"] == ME_INCARNATION
    assert await inbox.get() == m.PeerDeparted(Endpoint.parse(PEER))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        signed("/cluster/leave", secret="other" * 8),
        signed("/cluster/hello"),
        signed("/cluster/leave", sender="10.0.0.9:3000"),
        signed("/cluster/leave", rinc=0),
        signed("/cluster/leave", rinc=ME_INCARNATION - 1),
    ],
    ids=[
        "unsigned",
        "other-secret",
        "other-path",
        "other-sender",
        "receiver-unknown",
        "receiver-before-restart",
    ],
)
async def test_forged_leave_is_refused_and_changes_nothing(node_http, headers, captured_logs):
    client, inbox = node_http
    resp = await client.post("/cluster/leave", json={"address": PEER}, headers=headers)
    body = await expect_401(resp)
    assert "WWW-Authenticate" in resp.headers
    assert "JWT_SECRET" in body["error"] or "incarnation" in body["error"]
    assert len(inbox) == 0
    assert [e["event"] for e in captured_logs if e["event"] == "peer_rejected"] == ["peer_rejected"]


async def test_captured_leave_replayed_100_times_is_accepted_once(node_http, captured_logs):
    client, inbox = node_http
    captured = signed("/cluster/leave")
    statuses = []
    for _ in range(101):
        resp = await client.post("/cluster/leave", json={"address": PEER}, headers=captured)
        statuses.append(resp.status)
        if resp.status != 202:
            assert "replay" in (await expect_401(resp))["error"]
    assert statuses == [202] + [401] * 100
    assert await drain(inbox) == [m.PeerDeparted(Endpoint.parse(PEER))]
    rejected = [e for e in captured_logs if e["event"] == "peer_rejected"]
    assert len(rejected) == 1, "a replay flood logs once per sender and reason"


async def test_captured_probe_and_hello_are_accepted_once(node_http):
    client, inbox = node_http
    s = signer()
    probe = {peerauth.HEADER: s.next_header("/cluster/health")}
    hello = {peerauth.HEADER: s.next_header("/cluster/hello")}
    for _ in range(3):
        await client.get("/cluster/health", params={"from": PEER}, headers=probe)
        await client.post("/cluster/hello", json={"address": PEER}, headers=hello)
    peer = Endpoint.parse(PEER)
    assert await drain(inbox) == [m.ProbedBy(peer), m.PeerAnnounced(peer)]


async def test_reordered_probes_are_accepted_once_each(node_http):
    client, inbox = node_http
    s = signer()
    headers = [{peerauth.HEADER: s.next_header("/cluster/health")} for _ in range(peerauth.WINDOW_BITS)]
    random.Random(7).shuffle(headers)
    for h in headers:
        resp = await client.get("/cluster/health", params={"from": PEER}, headers=h)
        assert resp.status == 200, await resp.text()
    for h in headers[:10]:
        await expect_401(await client.get("/cluster/health", params={"from": PEER}, headers=h))
    assert await drain(inbox) == [m.ProbedBy(Endpoint.parse(PEER))] * peerauth.WINDOW_BITS


async def test_a_restarted_sender_is_accepted_and_its_old_incarnation_refused(node_http):
    client, inbox = node_http
    before, after = signer(incarnation=PEER_INCARNATION), signer(incarnation=PEER_INCARNATION + 1)
    for _ in range(5):
        resp = await client.post(
            "/cluster/hello",
            json={"address": PEER},
            headers={peerauth.HEADER: before.next_header("/cluster/hello")},
        )
        assert resp.status == 202
    # The restarted process counts from seq 1 again: new incarnation, so that is not a replay.
    resp = await client.post(
        "/cluster/leave",
        json={"address": PEER},
        headers={peerauth.HEADER: after.next_header("/cluster/leave", ME_INCARNATION)},
    )
    assert resp.status == 202
    late = {peerauth.HEADER: before.next_header("/cluster/hello")}  # fresh seq, but the old process's
    body = await expect_401(await client.post("/cluster/hello", json={"address": PEER}, headers=late))
    assert "old incarnation" in body["error"]
    assert (await drain(inbox))[-1] == m.PeerDeparted(Endpoint.parse(PEER))


async def test_a_leave_captured_before_the_receiver_restarted_is_refused():
    """The restarted receiver has empty windows; the leave is refused because it names the old incarnation."""
    captured = signed("/cluster/leave", rinc=ME_INCARNATION)
    inbox: Mailbox[m.Input] = Mailbox("membership", 16, Overflow.BLOCK)
    async with TestClient(TestServer(routes(inbox, incarnation=ME_INCARNATION + 5).app)) as client:
        health = await (await client.get("/cluster/health")).json()
        assert health["incarnation"] == ME_INCARNATION + 5
        await expect_401(await client.post("/cluster/leave", json={"address": PEER}, headers=captured))
        fresh = signed("/cluster/leave", rinc=health["incarnation"])
        assert (await client.post("/cluster/leave", json={"address": PEER}, headers=fresh)).status == 202
    assert await drain(inbox) == [m.PeerDeparted(Endpoint.parse(PEER))]


GOOD = signed("/cluster/leave")[peerauth.HEADER]


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "v=2,inc=\u00b2,seq=1,rinc=0,sig=" + "0" * 64,
        "v=2,inc=1,seq=" + "9" * 5000 + ",rinc=0,sig=" + "0" * 64,
        "v=2,inc=18446744073709551616,seq=1,rinc=0,sig=" + "0" * 64,
        GOOD.replace("v=2,", "v=2,v=2,"),
        GOOD.replace(",rinc=", ",rinc=1,rinc="),
        GOOD.replace("v=2,", ""),
        GOOD + "," + "x" * 7000,
        "t=1800000000,sig=" + "0" * 64,  # the previous scheme's header
    ],
    ids=[
        "text",
        "unicode-digit",
        "huge-number",
        "dup-version",
        "dup-field",
        "missing",
        "long",
        "huge",
        "old",
    ],
)
async def test_malformed_header_is_401_json_never_500(node_http, header):
    client, inbox = node_http
    await expect_401(
        await client.post("/cluster/leave", json={"address": PEER}, headers={peerauth.HEADER: header})
    )
    await expect_401(
        await client.get("/cluster/health", params={"from": PEER}, headers={peerauth.HEADER: header})
    )
    assert len(inbox) == 0


async def test_a_repeated_header_is_refused_even_if_one_copy_is_valid(node_http):
    client, inbox = node_http
    good = signed("/cluster/leave")[peerauth.HEADER]
    headers = [(peerauth.HEADER, good), (peerauth.HEADER, "garbage")]
    await expect_401(await client.post("/cluster/leave", json={"address": PEER}, headers=headers))
    assert len(inbox) == 0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.text(
        st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\r\n"),
        min_size=1,
        max_size=300,
    )
)
async def test_any_header_text_is_401_json(node_http, header):
    client, inbox = node_http
    try:
        encoded = header.encode("latin-1").decode("latin-1")  # what an HTTP client can put in a header
    except UnicodeEncodeError:
        encoded = header.encode().decode("latin-1")
    resp = await client.post(
        "/cluster/leave", json={"address": PEER}, headers={peerauth.HEADER: encoded.strip()}
    )
    await expect_401(resp)
    assert len(inbox) == 0


async def test_plain_health_check_needs_no_signature_and_reports_the_incarnation(node_http):
    client, inbox = node_http
    resp = await client.get("/cluster/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["node_id"] == ME.node_id and body["incarnation"] == ME_INCARNATION
    assert len(inbox) == 0


async def test_probe_naming_a_sender_must_be_signed(node_http):
    client, inbox = node_http
    resp = await client.get("/cluster/health", params={"from": PEER})
    assert resp.status == 401
    resp = await client.get("/cluster/health", params={"from": PEER}, headers=signed("/cluster/health"))
    assert resp.status == 200
    assert await inbox.get() == m.ProbedBy(Endpoint.parse(PEER))


async def test_full_membership_queue_answers_503_with_retry_after():
    inbox: Mailbox[m.Input] = Mailbox("membership", 4, Overflow.BLOCK)
    async with TestClient(TestServer(routes(inbox).app)) as client:
        for _ in range(4):
            assert inbox.offer(m.Tick())
        resp = await client.post("/cluster/hello", json={"address": PEER}, headers=signed("/cluster/hello"))
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["code"] == "busy"


async def test_a_stalled_notice_body_gets_408_instead_of_holding_the_handler():
    inbox: Mailbox[m.Input] = Mailbox("membership", 4, Overflow.BLOCK)
    async with TestServer(routes(inbox, body_read_timeout_s=0.3).app, host="127.0.0.1") as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            # Announce 2000 bytes (under the notice limit), send 10, then nothing.
            writer.write(
                b"POST /cluster/hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 2000\r\n\r\n{"address"'
            )
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        finally:
            writer.close()
        assert status_line.split()[1] == b"408"
        assert len(inbox) == 0


# --- against a real node process ------------------------------------------------------------------------------


class FakePeer:
    """A peer the real node can probe (a tiny HTTP server on a spare loopback address) and whose messages
    the test signs itself, so it can capture and replay them."""

    def __init__(self, cluster: Cluster, incarnation: int) -> None:
        self.cluster = cluster
        self.address = f"{cluster.spare_ip()}:{cluster.port}"
        self.signer = peerauth.Signer(peerauth.derive_key(cluster.jwt_secret), self.address, incarnation)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = json.dumps({"status": "ok", "incarnation": incarnation}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((cluster.spare_ip(), cluster.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-peer", daemon=True)

    def __enter__(self) -> "FakePeer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def header(self, path: str, rinc: int = 0) -> dict[str, str]:
        return {peerauth.HEADER: self.signer.next_header(path, rinc)}


def post(url: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers.get_content_type() == "application/json"
        return exc.code, json.loads(exc.read())


def peer_health(node, address: str) -> bool | None:
    """Whether the node lists ``address`` as healthy (None: not listed at all)."""
    status = node.status()
    for entry in (status or {}).get("nodes", []):
        if entry["address"] == f"http://{address}":
            return entry["healthy"]
    return None


def node_incarnation(node) -> int:
    with urllib.request.urlopen(f"{node.url}/cluster/health", timeout=2) as resp:
        return json.loads(resp.read())["incarnation"]


def join(node, peer: FakePeer) -> None:
    status, _ = post(f"{node.url}/cluster/hello", {"address": peer.address}, peer.header("/cluster/hello"))
    assert status == 202
    wait_until(
        lambda: peer_health(node, peer.address), 10, what=f"{peer.address} to be healthy", describe=node.tail
    )


@pytest.fixture
def one_node(tmp_path):
    with Cluster(tmp_path, size=1) as c:
        node = c.start(c.ips[0])
        wait_until(lambda: node.status() is not None, 15, what="the node to serve", describe=c.describe)
        yield c, node


@pytest.mark.integration
def test_real_node_a_captured_leave_replayed_100_times_changes_the_view_at_most_once(one_node):
    cluster, node = one_node
    with FakePeer(cluster, incarnation=1_000) as peer:
        join(node, peer)
        captured = peer.header("/cluster/leave", node_incarnation(node))
        assert post(f"{node.url}/cluster/leave", {"address": peer.address}, captured)[0] == 202
        wait_until(lambda: peer_health(node, peer.address) is None, 5, what="the leave to take effect")
        join(node, peer)  # the peer is back (fresh hello): the captured leave must not evict it again
        replies = [post(f"{node.url}/cluster/leave", {"address": peer.address}, captured) for _ in range(100)]
        assert {status for status, _ in replies} == {401}
        assert all(body["code"] == "unauthorized" for _, body in replies)
        assert peer_health(node, peer.address) is True
        removed = node.wait_events("peer_removed", lambda e: e.get("peer") == peer.address)
        assert len(removed) == 1
        node.wait_events("peer_rejected", lambda e: e.get("peer") == peer.address)
    assert node.log_problems() == []


@pytest.mark.integration
def test_real_node_refuses_a_leave_captured_before_it_restarted(one_node):
    cluster, node = one_node
    with FakePeer(cluster, incarnation=1_000) as peer:
        join(node, peer)
        before = node_incarnation(node)
        captured = peer.header("/cluster/leave", before)  # captured, never delivered
        node.stop()
        node.start()
        wait_until(lambda: node.status() is not None, 15, what="the node to serve again", describe=node.tail)
        assert node_incarnation(node) > before
        join(node, peer)
        status, body = post(f"{node.url}/cluster/leave", {"address": peer.address}, captured)
        assert status == 401 and "incarnation" in body["error"]
        assert peer_health(node, peer.address) is True
    with FakePeer(cluster, incarnation=2_000) as restarted:  # the same peer after its own restart
        status, _ = post(
            f"{node.url}/cluster/leave",
            {"address": restarted.address},
            restarted.header("/cluster/leave", node_incarnation(node)),
        )
        assert status == 202
        wait_until(lambda: peer_health(node, restarted.address) is None, 5, what="the restarted peer's leave")


@pytest.mark.integration
def test_real_cluster_restarts_and_goodbyes_need_no_rejected_message(tmp_path):
    """The nodes' own transport: after a restart (new incarnation, receivers' windows reset or stale) probes
    and hellos still pass, and a SIGTERM's leave names the receivers' current incarnation and is accepted."""
    with Cluster(tmp_path, size=3) as c:
        c.start_all()
        low, mid, high = c.ips
        c.nodes[mid].stop()
        c.publish_dns()
        c.start(mid)
        c.wait_agreed(c.ips, timeout_s=15)
        c.nodes[high].stop()
        c.publish_dns()
        for ip in (low, mid):
            removed = c.nodes[ip].wait_events("peer_removed", lambda e: e.get("peer_id") == node_id_of(high))
            assert [e["reason"] for e in removed] == ["left"]
        assert [e for ip in c.ips for e in c.nodes[ip].events("peer_rejected")] == []
        assert c.all_log_problems() == []


def node_id_of(ip: str) -> int:
    return Endpoint.parse(f"{ip}:1").node_id
