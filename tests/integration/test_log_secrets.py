"""A hostile pass over every endpoint of a real node, then a search of everything it printed for secrets.

The node runs at LOG_LEVEL=debug (the most it ever writes). Requests go over raw sockets, because HTTP
clients refuse to send the invalid header bytes this is about. Afterwards stdout and stderr are searched for
JWT_SECRET, the peer-message key derived from it, and every credential that was sent; stdout must be JSON
lines only and stderr empty.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import signal
import socket
import time
import zlib

import jwt
import pytest

from node import auth
from node.core import peerauth

pytestmark = pytest.mark.integration

PATHS = [
    "/cluster/status",
    "/cluster/health",
    "/cluster/health?from=127.0.0.9:4001",
    "/cluster/hello",
    "/cluster/leave",
    "/db/execute",
    "/db/query?q=SELECT%201",
    "/db/request",
    "/db/backup",
    "/db/load",
    "/readyz",
    "/no/such/endpoint",
]
MAX_RESPONSE_BYTES = 1 << 20


def raw_request(host: str, port: int, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``request`` as is and read the answer until the server closes (bounded in bytes and time)."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # the server may answer and close before reading a body it refuses
        chunks, total = [], 0
        deadline = time.monotonic() + timeout_s
        while total < MAX_RESPONSE_BYTES and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not data:
                break
            chunks.append(data)
            total += len(data)
    return b"".join(chunks)


def status_of(response: bytes) -> int | None:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def build(method: str, path: str, headers: list[bytes], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: node", b"Connection: close", *headers]
    if method == "POST":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body if method == "POST" else b"")


def test_hostile_requests_leave_no_secret_in_the_output(make_cluster):
    env = {"LOG_LEVEL": "debug"}
    cluster = make_cluster(size=1, env=env)
    (ip,) = cluster.ips
    node = cluster.start(ip)
    cluster.wait_agreed([ip], timeout_s=20)
    secret = cluster.jwt_secret
    key = peerauth.derive_key(secret)
    now = time.time()

    jwts = {role: auth.mint_jwt(secret, role, now=now, ttl_s=600) for role in auth.Role}
    compacts = {role: auth.mint_compact(secret, role, now=now, ttl_s=600) for role in auth.Role}
    upper_admin = jwt.encode(
        {"sub": "x", "role": "ADMIN", "iat": int(now), "exp": int(now) + 600}, secret, algorithm="HS256"
    )
    peer_sig = peerauth.Signer(key, "127.0.0.9:4001", incarnation=int(now * 1000)).next_header("/cluster/hello")
    sent_tokens = [*jwts.values(), *compacts.values(), upper_admin, peer_sig.split("sig=")[1]]

    def basic(password: str) -> bytes:
        return b"Authorization: Basic " + base64.b64encode(f"app:{password}".encode())

    # Header sets that only make Authorization hostile: each must be a 401 (or 2xx/403 for valid ones).
    auth_only = [
        [b"Authorization: Bearer \xff"],
        [b"Authorization: Bearer \xc3\x28\xa0\xa1"],
        [b"Authorization: Basic \xff\xfe\xfd"],
        [b"Authorization: Bearer " + jwts[auth.Role.ADMIN].encode() + b"\xff"],
        [b"Authorization: Bearer " + "ａｄｍｉｎ".encode()],
        [b"Authorization: Bearer " + b"eyJ" + b"A" * 6000 + b".x.y"],
        [b"Authorization: Bearer " + secret.encode()],
        [b"Authorization: Bearer " + upper_admin.encode()],
        [b"Authorization: Bearer " + jwts[auth.Role.ADMIN].encode()],
        [b"Authorization: Bearer " + jwts[auth.Role.READ].encode()],
        [basic(compacts[auth.Role.WRITE])],
        [basic(jwts[auth.Role.WRITE])],
    ]
    # Everything else a hostile client might send along.
    other = [
        [b"X-TalentNest-Peer: \xff\xfe garbage", b"Authorization: Bearer " + jwts[auth.Role.ADMIN].encode()],
        [b"X-TalentNest-Peer: " + peer_sig.encode()],
        [b"X-TalentNest-Peer: t=1,sig=" + b"0" * 64 + b",t=2,t=" + b"9" * 400],
        # A superscript two passes str.isdigit() but not int(): a failure inside code that holds the key.
        [b"X-TalentNest-Peer: t=\xc2\xb2,sig=" + peer_sig.split("sig=")[1].encode()],
        [b"X-TalentNest-Peer: " + peer_sig.replace("seq=1", "seq=\u00b2").encode()],
        [b"Content-Encoding: gzip", b"Authorization: Bearer " + jwts[auth.Role.ADMIN].encode()],
        [b"Content-Encoding: deflate", basic(compacts[auth.Role.ADMIN])],
        [b"Content-Encoding: br", b"Authorization: Bearer " + jwts[auth.Role.WRITE].encode()],
        [b"Expect: 999-foo", b"Authorization: Bearer " + jwts[auth.Role.ADMIN].encode()],
        [b"Authori\xffzation: Bearer " + jwts[auth.Role.ADMIN].encode()],  # invalid header name
        [b"Authorization: Bearer " + jwts[auth.Role.ADMIN].encode(), b"Authorization: Bearer \xff"],
    ]
    bodies = {
        b"Content-Encoding: gzip": b"\x1f\x8b not gzip at all " + secret.encode(),
        b"Content-Encoding: deflate": zlib.compress(b'["SELECT 1"]')[:-3],
        b"Content-Encoding: br": b"\x00\xff" * 16,
    }
    gzip_sql = gzip.compress(b'["SELECT 1"]')
    statuses: dict[tuple[str, str, int], int | None] = {}
    responses = 0
    for (index, headers), path, method in itertools.product(
        enumerate(auth_only + other), PATHS, ("GET", "POST")
    ):
        body = b'["SELECT 1"]'
        for header in headers:
            body = bodies.get(header, body)
        response = raw_request(node.ip, node.port, build(method, path, headers, body))
        responses += 1
        statuses[(method, path, index)] = status_of(response)
        if index < len(auth_only) and path.startswith("/db/"):
            assert status_of(response) is not None and status_of(response) < 500, (method, path, headers)
        if index < 3 and path.startswith("/db/") and status_of(response) == 401:
            assert b"application/json" in response and b'"code":"unauthorized"' in response
    # A few more: credentials in the path and the query, a valid gzip body, a request line of raw bytes.
    extra = [
        build("GET", "/" + jwts[auth.Role.ADMIN], []),
        build("GET", "/db/query?q=SELECT%20'" + compacts[auth.Role.READ] + "'", []),
        build("POST", "/db/query", [b"Content-Encoding: gzip", b"Content-Type: application/json"], gzip_sql),
        b"GET /db/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xff\r\n\r\n",
        b"\xff\xfe\xfd " + secret.encode() + b"\r\n\r\n",
    ]
    for request in extra:
        raw_request(node.ip, node.port, request)
        responses += 1

    # The \xff token that started this: a 401 with a JSON body, not a 500.
    assert statuses[("GET", "/db/query?q=SELECT%201", 0)] == 401
    # The valid tokens really were accepted (so the pass exercised the paths that hold the secret).
    assert statuses[("GET", "/db/query?q=SELECT%201", 8)] == 200  # admin JWT
    assert statuses[("GET", "/db/query?q=SELECT%201", 10)] == 200  # write compact credential over Basic
    assert statuses[("GET", "/db/query?q=SELECT%201", 7)] == 401  # role "ADMIN" is not a role
    assert 200 <= responses <= 600

    code, _ = node.stop(signal.SIGTERM, timeout_s=10)  # a clean stop flushes every queued line
    assert code == 0, node.tail()

    out = node.stdout_path.read_bytes()
    err = node.stderr_path.read_bytes()
    assert err == b"", err[:2000]
    assert node.log_problems() == []
    printed = out + err
    for needle in [secret, key.hex(), base64.b64encode(key).decode().rstrip("="), *sent_tokens]:
        assert needle.encode() not in printed, f"{needle[:12]}… reached the output"
    assert key not in printed
    # Sanity: the pass did reach the log (a node that logged nothing would pass the search trivially).
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert "node_stopped" in events
