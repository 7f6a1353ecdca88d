"""The data API's routes over a real Database in an in-process aiohttp test server (no node process), and
helpers that call a Database the way HTTP does (through the service, rendered as rqlite JSON)."""

from __future__ import annotations

import weakref
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from node.core import sqlreq as q
from node.http.common import make_error_middleware
from node.http.db import DbRoutes
from node.http.render import render_results
from node.runtime.mailbox import LatestCell
from node.service import LocalDataService
from node.storage.sqlite import Database
from node.storage.statemachine import Command


class QuietLog:
    """A logger that drops everything (the tests look at responses, not log lines)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


async def start_db_api(
    database: Database,
    *,
    secret: str,
    max_body_bytes: int = 32 << 10,
    max_load_bytes: int = 1 << 20,
    max_statements: int = 20,
    body_read_timeout_s: float = 0.5,
    handler_cancellation: bool = False,
) -> TestClient:
    """A started client whose server serves the data routes on ``database`` (already open), as if elected.

    ``client.database`` is the database; the caller closes the client, then the database.
    """
    decisions: LatestCell = LatestCell()
    decisions.publish(object())
    app = web.Application(middlewares=[make_error_middleware(QuietLog())])
    DbRoutes(
        service=LocalDataService(database),
        jwt_secret=secret,
        decisions=decisions,
        max_body_bytes=max_body_bytes,
        max_load_bytes=max_load_bytes,
        max_statements=max_statements,
        body_read_timeout_s=body_read_timeout_s,
    ).add_to(app)
    client = TestClient(TestServer(app, handler_cancellation=handler_cancellation))
    await client.start_server()
    client.database = database
    return client


# The next index for writes applied straight to a Database (no service), per database.
_NEXT_INDEX: weakref.WeakKeyDictionary[Database, int] = weakref.WeakKeyDictionary()


async def execute(
    database: Database, command: q.WriteCommand, flags: q.Flags | None = None, *, unified: bool = False
) -> list[dict[str, Any]]:
    """Apply ``command`` as the next entry of ``database`` and render it as /db/execute (or /db/request)."""
    if database not in _NEXT_INDEX:
        _NEXT_INDEX.setdefault(database, await database.applied_index() + 1)
    index = _NEXT_INDEX[database]
    _NEXT_INDEX[database] = index + 1
    outcomes = await database.apply(index, [Command(command, unified=unified)])
    assert outcomes is not None
    return _as_json(render_results(outcomes[0].results, flags or q.Flags(), unified=unified))


async def query(database: Database, request: q.DbRequest, *, client: str = "") -> list[dict[str, Any]]:
    """A read on ``database`` rendered as /db/query answers it."""
    return _as_json(render_results(await database.query(request, client=client), request.flags))


def _as_json(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a client decodes from the response (tuples become lists)."""
    return orjson.loads(orjson.dumps(results))
