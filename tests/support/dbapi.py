"""The data API's routes over a real Database in an in-process aiohttp test server (no node process)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from node.http.common import make_error_middleware
from node.http.db import DbRoutes
from node.runtime.mailbox import LatestCell
from node.storage.sqlite import Database


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
        database=database,
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
