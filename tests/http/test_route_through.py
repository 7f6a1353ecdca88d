"""HttpApi.route_through: a layer run inside the node's one middleware, as an innermost middleware was.

Its errors render as the JSON errors of the error middleware, it sees 404/405 requests after the header
timer stopped, and it is wired once, before the server starts."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from node import errors
from node.http.common import json_response
from node.http.server import HttpApi
from node.runtime import logging as nodelog


async def start(around) -> tuple[HttpApi, str, list[str]]:
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    seen: list[str] = []

    async def hello(request: web.Request) -> web.Response:
        return json_response({"hello": request.path})

    async def layer(request: web.Request, handler) -> web.StreamResponse:
        protocol = request.protocol
        seen.append(f"{request.path} head_armed={protocol._head_armed}")
        return await around(request, handler)

    api.app.router.add_get("/hello", hello)
    api.route_through(layer)
    await api.start()
    return api, f"http://127.0.0.1:{api.port}", seen


async def test_the_layer_wraps_the_handler_and_its_node_errors_are_json():
    async def around(request, handler):
        if "refuse" in request.query:
            raise errors.Unavailable("the layer said no")
        response = await handler(request)
        response.headers["X-Layer"] = "1"
        return response

    api, url, seen = await start(around)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/hello") as resp:
                assert resp.status == 200
                assert resp.headers["X-Layer"] == "1"
                assert orjson.loads(await resp.read()) == {"hello": "/hello"}
            async with session.get(f"{url}/hello?refuse") as resp:
                assert resp.status == 503
                assert orjson.loads(await resp.read()) == {
                    "error": "the layer said no",
                    "code": "unavailable",
                }
            async with session.get(f"{url}/nowhere") as resp:  # routed requests only: a 404 too
                assert resp.status == 404
                assert orjson.loads(await resp.read())["code"] == "not_found"
            async with session.post(f"{url}/hello") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "GET, HEAD"
    finally:
        await api.stop()
    # The header timer was stopped before the layer ran, for every request.
    assert seen == [
        "/hello head_armed=False",
        "/hello head_armed=False",
        "/nowhere head_armed=False",
        "/hello head_armed=False",
    ]


async def test_a_layer_is_set_once_and_before_the_start():
    api = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())

    async def around(request, handler):
        return await handler(request)

    api.route_through(around)
    with pytest.raises(RuntimeError, match="once, before the server starts"):
        api.route_through(around)
    other = HttpApi(host="127.0.0.1", port=0, log=nodelog.get_logger())
    await other.start()
    try:
        with pytest.raises(RuntimeError, match="once, before the server starts"):
            other.route_through(around)
    finally:
        await other.stop()
