"""A follower's fast path forwarding writes to its leader (node.http.forwarder via LeaderFastRoute): its
answers are those of aiohttp's forwarding path.

Two leaders, each a real server with a real database, and two followers in front of them: one with the fast
path, one without. Each request of the fast path's corpus goes through both followers; status, headers (but
``Date``) and body must be equal, and the counters must show which requests the fast follower forwarded itself
and which it left to aiohttp. The ways a forwarded request can fail are in tests/http/test_forwarder.py (the
forwarder) and tests/replication/test_forwarding.py (the follower's answers, both paths).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from node.core.ids import Endpoint
from tests.http.test_fast_path import CASES, READ, Connection, comparable, request, serving


@contextlib.asynccontextmanager
async def two_pairs(tmp_path) -> AsyncIterator[tuple]:
    async with (
        serving(tmp_path, "leader-f", fast=True) as leader_f,
        serving(tmp_path, "leader-s", fast=True) as leader_s,
        serving(tmp_path, "follower-f", fast=True) as follower_f,
        serving(tmp_path, "follower-s", fast=False) as follower_s,
    ):
        follower_f.replicator.leader = Endpoint("127.0.0.1", leader_f.port)
        follower_s.replicator.leader = Endpoint("127.0.0.1", leader_s.port)
        yield leader_f, leader_s, follower_f, follower_s


def normalized(answer, leader_port: int):
    """``comparable``, with the leader's port (in a redirect's Location and body) as "PORT"."""
    status, headers, body = comparable(answer)
    port = str(leader_port)
    headers = {k: v.replace(port, "PORT") for k, v in headers.items()}
    if isinstance(body, dict) and "leader" in body:
        body = {**body, "leader": body["leader"].replace(port, "PORT")}
    return status, headers, body


# What the fast follower forwards itself: what the fast path takes, but a redirect (left to aiohttp).
FORWARD_CASES = [(raw, taken and b"redirect" not in raw.split(b"\r\n")[0]) for raw, taken in CASES] + [
    (request("[\"INSERT INTO t(v) VALUES('k')\"]", headers={"Content-Type": None}), True),
    (request('["INSERT INTO t(v) VALUES(1)"]', auth_header=READ, headers={"X-Request-Id": "r-2"}), True),
]


async def test_each_request_forwarded_gets_the_answer_of_aiohttps_forwarding(tmp_path):
    async with two_pairs(tmp_path) as (leader_f, leader_s, follower_f, follower_s):
        for index, (raw, forwarded) in enumerate(FORWARD_CASES):
            answers = []
            before = (follower_f.api.guard.fast_requests, follower_f.api.guard.fast_handoffs)
            for follower, lead in ((follower_f, leader_f), (follower_s, leader_s)):
                conn = await Connection.open(follower.port)
                await conn.send(raw)
                answers.append(normalized(await conn.response(), lead.port))
                await conn.close()
            assert answers[0] == answers[1], (index, raw[:120])
            after = (follower_f.api.guard.fast_requests, follower_f.api.guard.fast_handoffs)
            assert (after[0] - before[0], after[1] - before[1]) == ((1, 0) if forwarded else (0, 1)), index
        # The fast follower's writes reached its leader's own fast path, marked forwarded.
        assert leader_f.api.guard.fast_requests > 0
        assert follower_s.api.guard.fast_requests == 0


async def test_one_keep_alive_connection_through_a_follower_gets_the_same_answers(tmp_path):
    async with two_pairs(tmp_path) as (leader_f, leader_s, follower_f, follower_s):
        got = {}
        for follower, lead in ((follower_f, leader_f), (follower_s, leader_s)):
            conn = await Connection.open(follower.port)
            got[follower.port] = []
            for raw, _ in FORWARD_CASES:
                if b"Connection: close" in raw:
                    continue
                await conn.send(raw)
                got[follower.port].append(normalized(await conn.response(), lead.port))
            await conn.close()
        assert got[follower_f.port] == got[follower_s.port]
        first_left = next(i for i, (_, forwarded) in enumerate(FORWARD_CASES) if not forwarded)
        assert follower_f.api.guard.fast_requests == first_left


@pytest.mark.parametrize("fast", [True, False])
async def test_a_follower_whose_leader_is_gone_answers_503_on_both_paths(tmp_path, fast):
    async with serving(tmp_path, "follower", fast=fast) as follower:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there
        follower.replicator.leader = Endpoint("127.0.0.1", port)
        conn = await Connection.open(follower.port)
        await conn.send(request('["CREATE TABLE g (v)"]'))
        status, _, body = await conn.response()
        await conn.close()
        assert status == 503 and b"could not be reached to forward the request" in body
        assert follower.api.guard.fast_requests == (1 if fast else 0)
