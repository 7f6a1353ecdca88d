"""The small-write path of /db/execute and /db/request: a body that came with its head is taken and parsed
without coroutines (``body_at_hand``), few results are rendered inline. Whatever the body, the answer
(status, headers, JSON) is the one the general path gives when the same body arrives in pieces later."""

from __future__ import annotations

import asyncio
import json
import time
from unittest import mock

import orjson
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from node import auth
from node.http import common
from node.http.common import body_at_hand, make_error_middleware
from node.http.db import INLINE_PARSE_BYTES, DbRoutes
from node.http.render import cells
from node.runtime.mailbox import LatestCell
from node.service import WriteOutcome
from node.storage.results import StatementResult
from tests.support.bodies import arriving_body
from tests.support.dbapi import QuietLog

SECRET = "s" * 32
MAX_BODY = 256 << 10


class EchoService:
    """Answers a write at once with one result per statement, naming its SQL, so the answer shows what was
    parsed."""

    database = None

    async def submit(self, write, client):  # noqa: ANN001, ANN202 - the DataService protocol
        results = tuple(
            StatementResult(rows_affected=len(s.sql), last_insert_id=i)
            for i, s in enumerate(write.statements)
        )
        return WriteOutcome(results, 2, 17)


async def _answer(
    body: bytes, *, arrived: bool, content_type: str, path: str = "/db/execute", pieces: int = 3
):
    routes = DbRoutes(
        service=EchoService(), jwt_secret=SECRET, decisions=LatestCell(), max_body_bytes=MAX_BODY,
        max_load_bytes=1 << 20, max_statements=50, body_read_timeout_s=5,
    )  # fmt: skip
    token = auth.mint_jwt(SECRET, auth.Role.WRITE, now=time.time(), ttl_s=600)
    size = max(1, len(body) // pieces)
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    request = make_mocked_request(
        "POST",
        path,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
        },
        payload=arriving_body(chunks, arrived=arrived),
        app=web.Application(),
    )
    handler = routes.execute if path == "/db/execute" else routes.unified
    response = await make_error_middleware(QuietLog())(request, handler)
    assert isinstance(response, web.Response)
    headers = {k: v for k, v in response.headers.items()}
    return response.status, headers, orjson.loads(response.body)


def _both(body: bytes, content_type: str = "application/json", path: str = "/db/execute"):
    async def run():
        at_hand = await _answer(body, arrived=True, content_type=content_type, path=path)
        later = await _answer(body, arrived=False, content_type=content_type, path=path)
        return at_hand, later

    return asyncio.run(run())


def _json(value: object) -> bytes:
    """JSON text of any value, huge integers and infinities included (orjson refuses them)."""
    return json.dumps(value).encode()


_values = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20))
_statement = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.text(max_size=40), _values), max_size=4),
    st.builds(
        lambda sql, params: [sql, params], st.text(max_size=40), st.dictionaries(st.text(max_size=5), _values)
    ),
)
_bodies = st.one_of(
    st.lists(_statement, max_size=6).map(_json),
    st.binary(max_size=200),
    st.sampled_from([b"", b"  ", b"[]", b"{}", b"[[]]", b'["SELECT 1"', b"[1]", b'"x"']),
)


@settings(max_examples=200, deadline=None)
@given(
    body=_bodies,
    content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"]),
)
def test_a_body_at_hand_answers_as_one_that_arrives_later(body, content_type):
    at_hand, later = _both(body, content_type)
    assert at_hand == later
    assert at_hand[0] == 200 or 400 <= at_hand[0] < 500  # never a 5xx for what a client sent


@settings(max_examples=50, deadline=None)
@given(body=st.lists(_statement, max_size=4).map(_json))
def test_request_answers_alike_on_both_paths(body):
    at_hand, later = _both(body, path="/db/request")
    assert at_hand == later


def test_a_large_body_at_hand_is_parsed_as_before():
    """Past INLINE_PARSE_BYTES a body at hand is still parsed off the event loop, with the same answer."""
    statements = [["INSERT INTO t(v) VALUES(?)", "x" * 2000] for _ in range(40)]
    body = orjson.dumps(statements)
    assert len(body) > INLINE_PARSE_BYTES
    at_hand, later = _both(body)
    assert at_hand == later
    assert at_hand[0] == 200 and len(at_hand[2]["results"]) == 40
    assert at_hand[1]["X-TalentNest-Index"] == "17"


def test_a_body_over_the_limit_is_413_on_both_paths():
    body = orjson.dumps([["INSERT INTO t(v) VALUES(?)", "x" * MAX_BODY]])
    at_hand, later = _both(body)
    assert at_hand == later
    assert at_hand[0] == 413 and at_hand[2]["code"] == "payload_too_large"


def test_body_at_hand_takes_nothing_from_a_body_still_arriving():
    async def case():
        reader = StreamReader(mock.Mock(), 1 << 16, loop=asyncio.get_running_loop())
        request = make_mocked_request("POST", "/x", headers={"Content-Length": "6"}, payload=reader)
        reader.feed_data(b"abc")
        assert body_at_hand(request, limit=100) is None
        reader.feed_data(b"def")
        reader.feed_eof()
        return await common.read_body(request, limit=100, timeout_s=5)

    assert asyncio.run(case()) == b"abcdef"


@pytest.mark.parametrize("declared", [None, 50, 150])
def test_body_at_hand_refuses_what_read_body_refuses(declared):
    async def case(read):
        reader = StreamReader(mock.Mock(), 1 << 16, loop=asyncio.get_running_loop())
        headers = {} if declared is None else {"Content-Length": str(declared)}
        request = make_mocked_request("POST", "/x", headers=headers, payload=reader)
        reader.feed_data(b"y" * 120)
        reader.feed_eof()
        try:
            return await read(request)
        except Exception as exc:  # noqa: BLE001 - compared below
            return (type(exc), str(exc))

    async def at_hand(request):
        return body_at_hand(request, limit=100)

    async def general(request):
        return await common.read_body(request, limit=100, timeout_s=5)

    assert asyncio.run(case(at_hand)) == asyncio.run(case(general))


@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.integers(0, 50), st.one_of(st.none(), st.integers(0, 6))),
        max_size=8,
    )
)
def test_cells_counts_as_the_sum_it_replaced(shapes):
    results = [
        StatementResult(
            columns=None if ncols is None else tuple(f"c{i}" for i in range(ncols)),
            decltypes=() if ncols is None else ("",) * ncols,
            rows=((1,) * (ncols or 1),) * nrows if ncols is not None else (),
        )
        for nrows, ncols in shapes
    ]
    assert cells(results) == sum(len(r.rows) * max(1, len(r.columns or ())) for r in results)


@pytest.mark.parametrize(
    ("response", "streamed"),
    [
        (web.Response(body=b"x" * 10), False),
        (web.Response(body=b"x" * (common.STREAM_THRESHOLD_BYTES + 1)), True),
        (web.Response(body=bytearray(common.STREAM_THRESHOLD_BYTES + 1)), False),
        (web.Response(text="x" * (common.STREAM_THRESHOLD_BYTES + 1)), True),
        (web.StreamResponse(), False),
        (web.json_response({"x": "y" * common.STREAM_THRESHOLD_BYTES}), True),
    ],
)
def test_which_responses_are_streamed(response, streamed):
    assert common._should_stream(response) is streamed
