"""read_body: a body that arrived whole with its head is taken at once; one still arriving is read in chunks
under the time limit. Both give the same bytes, and the same 413 past the limit."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from node import errors
from node.http.common import read_body
from tests.support.bodies import arriving_body


def _request(chunks: list[bytes], *, arrived: bool, declared: bool):
    total = sum(len(c) for c in chunks)
    headers = {"Content-Length": str(total)} if declared else {}
    return make_mocked_request(
        "POST", "/db/execute", headers=headers, payload=arriving_body(chunks, arrived=arrived)
    )


async def _outcome(chunks: list[bytes], limit: int, *, arrived: bool, declared: bool):
    try:
        request = _request(chunks, arrived=arrived, declared=declared)
        return await read_body(request, limit=limit, timeout_s=5)
    except errors.NodeError as exc:
        return (exc.status, str(exc))


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=6),
    limit=st.integers(0, 1200),
    declared=st.booleans(),
)
def test_a_body_that_arrived_whole_reads_as_one_still_arriving(chunks, limit, declared):
    async def both():
        whole = await _outcome(chunks, limit, arrived=True, declared=declared)
        streamed = await _outcome(chunks, limit, arrived=False, declared=declared)
        return whole, streamed

    whole, streamed = asyncio.run(both())
    assert whole == streamed
    body = b"".join(chunks)
    if len(body) <= limit:
        assert whole == body
    else:
        assert whole[0] == 413


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_that_arrived_whole_is_refused(declared):
    async def case():
        return await _outcome([b"x" * 100], 99, arrived=True, declared=declared)

    status, message = asyncio.run(case())
    assert status == 413
    assert "99" in message
