"""The forwarding middleware when the leader it forwarded to is lost mid-request.

Found on containers: a write forwarded by a follower to a leader that was then SIGKILLed (no RST) waited the
whole forward timeout (15 s). Now, once the follower's view no longer names that leader, the client gets
503 ``outcome_unknown`` at failure-detection speed; a leader that answers keeps answering through.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import auth
from node.core.ids import Endpoint
from node.http.replication import ForwardingMiddleware
from node.http.server import HttpApi
from node.runtime import logging as nodelog

SECRET = "f" * 32


class FakeReplicator:
    def __init__(self, leader: Endpoint | None) -> None:
        self.leader = leader

    def leader_endpoint(self) -> Endpoint | None:
        return self.leader


def token() -> str:
    return auth.mint_jwt(SECRET, auth.Role.ADMIN, now=time.time(), ttl_s=600)


class LocalRouteUnused:
    """The fast path's local route: never asked here (every request is forwarded)."""

    def claim(self, request: object) -> bool:
        raise AssertionError("the local route was asked to claim")

    async def answer(self, request: object) -> tuple[int, dict[str, str] | None, bytes]:
        raise AssertionError("a forwarded request was answered locally")


def follower_of(replicator: FakeReplicator, fast: bool) -> tuple[HttpApi, ForwardingMiddleware]:
    """A follower's HttpApi (not started) with the forwarding layer, wired as the node wires it, and that
    layer (to close): every request it takes goes to ``replicator``'s leader, through aiohttp's client or
    (``fast``) also the write fast path's forwarder."""
    forwarding = ForwardingMiddleware(
        replicator=replicator,
        me=Endpoint("127.0.0.2", 3000),
        jwt_secret=SECRET,
        max_body_bytes=1 << 20,
        body_read_timeout_s=5,
        forward_timeout_s=5,
    )
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    api.route_through(forwarding.handle)  # as node.replication.wiring does
    if fast:
        api.fast_path(forwarding.fast_route(LocalRouteUnused()))  # as node.supervisor wires it
    return api, forwarding


async def run_case(
    answer_after_s: float | None, lose_after_s: float | None, fast: bool = False
) -> tuple[int, dict, float]:
    """A leader that answers after answer_after_s (None: never) and a follower whose view drops that leader
    lose_after_s after the leader received the request (None: never), forwarding through aiohttp or (fast)
    through the write fast path's forwarder. Returns the client's status, body and time to the answer."""
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def leader_execute(request: web.Request) -> web.Response:
        arrived.set()
        if answer_after_s is None:
            await release.wait()
        else:
            await asyncio.sleep(answer_after_s)
        return web.json_response({"results": [{"rows_affected": 1}]})

    leader_app = web.Application()
    leader_app.router.add_post("/db/execute", leader_execute)
    leader_server = TestServer(leader_app, host="127.0.0.1")
    await leader_server.start_server()
    replicator = FakeReplicator(Endpoint("127.0.0.1", leader_server.port))
    api, forwarding = follower_of(replicator, fast)

    async def lose() -> None:
        if lose_after_s is not None:
            await asyncio.wait_for(arrived.wait(), 5)  # the loss is timed from the leader's receipt
            await asyncio.sleep(lose_after_s)
            replicator.leader = None

    await api.start()  # its own server (the fast path lives in its connection handler)
    try:
        async with aiohttp.ClientSession() as client, asyncio.TaskGroup() as tasks:
            tasks.create_task(lose())
            started = time.monotonic()
            resp = await client.post(
                f"http://127.0.0.1:{api.port}/db/execute",
                json=[["INSERT INTO t VALUES (1)"]],
                headers={"Authorization": f"Bearer {token()}"},
            )
            body = await resp.json()
            assert api.guard.fast_requests == (1 if fast else 0)  # the path the case is about was taken
            return resp.status, body, time.monotonic() - started
    finally:
        release.set()
        await api.stop()
        await forwarding.close()
        await leader_server.close()


@pytest.mark.parametrize("fast", [False, True])
async def test_a_leader_lost_mid_request_answers_503_outcome_unknown_not_after_the_forward_timeout(fast):
    status, body, took_s = await run_case(answer_after_s=None, lose_after_s=0.2, fast=fast)
    assert status == 503 and body["code"] == "outcome_unknown", body
    assert "X-Request-Id" in body["error"]
    assert took_s < 4.0  # liveness: well before the 5 s forward timeout (not a speed assertion)


@pytest.mark.parametrize("fast", [False, True])
async def test_a_leader_that_answers_is_passed_through(fast):
    status, body, _ = await run_case(answer_after_s=0.1, lose_after_s=None, fast=fast)
    assert status == 200 and body == {"results": [{"rows_affected": 1}]}


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    answer_after_s=st.one_of(st.none(), st.floats(0.0, 0.4)),
    lose_after_s=st.one_of(st.none(), st.floats(0.0, 0.4)),
    fast=st.booleans(),
)
def test_a_forwarded_request_always_ends_with_the_leaders_answer_or_a_503(answer_after_s, lose_after_s, fast):
    """Whatever the order of the leader's answer and its loss: the client gets the leader's 200 (answered
    before the loss was seen) or 503 (outcome_unknown), never a hang past the forward timeout."""
    if answer_after_s is None and lose_after_s is None:
        lose_after_s = 0.1  # a leader that never answers and is never lost is the forward timeout's case
    status, body, took_s = asyncio.run(run_case(answer_after_s, lose_after_s, fast))
    assert took_s < 4.0
    if lose_after_s is None or (answer_after_s is not None and answer_after_s + 0.2 < lose_after_s):
        assert status == 200, body
    elif answer_after_s is None or lose_after_s + 0.2 < answer_after_s:
        assert status == 503 and body["code"] == "outcome_unknown", body
    else:
        assert status == 200 or (status == 503 and body["code"] == "outcome_unknown"), body


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 65535)), max_size=300))
def test_the_cached_node_id_text_is_always_the_endpoints_own_and_the_cache_stays_bounded(hosts):
    """X-TalentNest-Node is derived from the endpoint's node ID, parsed once per host and cached
    (node.core.ids): whatever endpoints come and go (more than the bound), each answer is the endpoint's own
    node ID and the cache never grows past its bound."""
    from node.core import ids

    for c, d, port in hosts:
        endpoint = Endpoint(f"10.1.{c}.{d}", port)
        assert str(endpoint.node_id) == str(ids.node_id_from_ipv4(endpoint.host)) == str(c * 256 + d)
        assert str(endpoint.node_id) == str(c * 256 + d)  # a cached answer
        assert ids._cached_node_id.cache_info().currsize <= ids.MAX_CACHED_NODE_IDS
