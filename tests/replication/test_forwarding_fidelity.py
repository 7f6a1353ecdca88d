"""What a follower forwards is what the client sent, or a 400: never another request.

Found by a hostile probe of a 3-node cluster. A follower rebuilt the leader's URL from the decoded path and
query, and aiohttp's client re-encoded it: ``DELETE /cluster/voters/x/../<id>`` (404 at the leader) reached
it as ``/cluster/voters/<id>`` and removed that voter; a query value holding an encoded ``&`` would have been
split. A header that is not ASCII (``X-Request-Id: caf\\xe9-1``, 400 at the leader) lost its byte on the way
and arrived as another, valid ID. And the fast path took ``?%72edirect`` for a write to forward, where
aiohttp's path answered 301.

Here the "leader" is a server that echoes the request target and headers it received; the follower is a real
HttpApi with the forwarding middleware, with and without the write fast path, sent raw bytes over a socket (a
client library would normalise the target itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import auth
from node.core.ids import Endpoint
from node.http.server import HttpApi
from tests.replication.test_forwarding import SECRET, FakeReplicator, follower_of


def token() -> str:
    return auth.mint_jwt(SECRET, auth.Role.ADMIN, now=time.time(), ttl_s=600)


@contextlib.asynccontextmanager
async def follower_of_an_echo(fast: bool) -> AsyncIterator[tuple[HttpApi, int, list[dict]]]:
    """(the follower's HttpApi, the leader's port, what the leader received): the leader answers every
    request with the target, query and headers it got."""
    received: list[dict] = []

    async def echo(request: web.Request) -> web.Response:
        seen = {
            "method": request.method,
            "raw_path": request.raw_path,
            "query": list(request.query.items()),
            "request_id": request.headers.get("X-Request-Id"),
            "content_type": request.headers.get("Content-Type"),
        }
        received.append(seen)
        return web.json_response(seen)

    leader_app = web.Application()
    leader_app.router.add_route("*", "/{tail:.*}", echo)
    leader_server = TestServer(leader_app, host="127.0.0.1")
    await leader_server.start_server()
    api, forwarding = follower_of(FakeReplicator(Endpoint("127.0.0.1", leader_server.port)), fast)
    await api.start()
    try:
        yield api, leader_server.port, received
    finally:
        await api.stop()
        await forwarding.close()
        await leader_server.close()


async def raw_request(
    api: HttpApi, method: str, target: bytes, headers: dict[str, bytes] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], dict]:
    """One request as these exact bytes (no Connection header, so a plain write may take the fast path);
    (status, headers lower-cased, JSON body)."""
    head = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: follower"]
    head.append(b"Authorization: Bearer " + token().encode())
    for name, value in (headers or {}).items():
        head.append(name.encode() + b": " + value)
    head.append(b"Content-Length: " + str(len(body)).encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head_bytes.decode("latin-1").rstrip("\r\n").split("\r\n")
        answer_headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
        payload = await asyncio.wait_for(reader.readexactly(int(answer_headers["content-length"])), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return int(lines[0].split()[1]), answer_headers, orjson.loads(payload)


WRITE = b'[["INSERT INTO t VALUES (1)"]]'
JSON = {"Content-Type": b"application/json"}


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize(
    "method, target",
    [
        ("DELETE", b"/cluster/voters/x/../5"),  # the probe's case: resolved, it named voter 5
        ("DELETE", b"/cluster/voters/%2e%2e/voters/0"),
        ("DELETE", b"/cluster/voters/7?why=a%26b"),
        ("GET", b"/db/query?q=SELECT%20%27a%26b%27&level=weak"),  # an encoded "&" inside a value
        ("POST", b"/db/execute?timings&x=%2F%3F"),
    ],
)
async def test_the_leader_receives_the_request_target_the_client_sent(fast, method, target):
    async with follower_of_an_echo(fast) as (api, _, received):
        status, _, body = await raw_request(api, method, target, JSON, WRITE if method == "POST" else b"")
    assert status == 200, body
    assert [r["raw_path"] for r in received] == [target.decode()]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    segments=st.lists(st.sampled_from(["x", ".", "..", "%2e", "%2E%2e", "%2F", "a%20b", "5"]), min_size=1, max_size=4),
    value=st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12),
)
def test_any_voter_path_and_query_value_reach_the_leader_unchanged(segments, value):
    """The class: whatever dot segments, encoded slashes or query characters a target holds, the leader sees
    exactly it (and decodes the same query value the client meant)."""
    target = ("/cluster/voters/" + "/".join(segments) + "?v=" + quote(value, safe="")).encode()

    async def case() -> None:
        async with follower_of_an_echo(False) as (api, _, received):
            status, _, body = await raw_request(api, "DELETE", target)
            assert status == 200, body
            assert [r["raw_path"] for r in received] == [target.decode()]
            assert received[0]["query"] == [["v", value]] or received[0]["query"] == [("v", value)]

    asyncio.run(case())


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize(
    "name, value",
    [
        ("X-Request-Id", b"caf\xe9-1"),  # the probe's case: arrived as the valid, different ID "caf-1"
        ("X-Request-Id", b"id\xc3\xa9"),  # UTF-8 for e-acute
        ("Content-Type", b"application/json; charset=\xe9"),
    ],
)
async def test_a_header_the_follower_cannot_relay_unchanged_is_a_400_and_nothing_reaches_the_leader(
    fast, name, value
):
    async with follower_of_an_echo(fast) as (api, _, received):
        status, _, body = await raw_request(api, "POST", b"/db/execute", {**JSON, name: value}, WRITE)
    assert status == 400 and body["code"] == "bad_request", body
    assert name in body["error"], body
    assert received == []


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("request_id", [b"caf-1~", b"has space"])  # the second: the leader's to refuse
async def test_a_header_of_printable_ascii_is_relayed_as_sent(fast, request_id):
    async with follower_of_an_echo(fast) as (api, _, received):
        status, _, _ = await raw_request(api, "POST", b"/db/execute", {**JSON, "X-Request-Id": request_id}, WRITE)
        assert api.guard.fast_requests == (1 if fast else 0)  # the path the case is about was taken
    assert status == 200
    assert [(r["request_id"], r["content_type"]) for r in received] == [(request_id.decode(), "application/json")]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("query", [b"redirect", b"%72edirect", b"re%64irect=true", b"timings&%72edirect"])
async def test_a_redirect_flag_however_encoded_answers_301_on_both_paths(fast, query):
    async with follower_of_an_echo(fast) as (api, leader_port, received):
        status, headers, body = await raw_request(api, "POST", b"/db/execute?" + query, JSON, WRITE)
    assert status == 301, body
    assert headers["location"] == f"http://127.0.0.1:{leader_port}/db/execute?{query.decode()}"
    assert received == []
