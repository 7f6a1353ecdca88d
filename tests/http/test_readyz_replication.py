"""/readyz with REPLICATION=on: ready only when data calls can be served.

Before, /readyz said 200 while the node was still forming or joining a cluster (every data call 503
"replication is starting") and while it knew no replication leader (every call but a level=none read 503),
so a client or a Kubernetes Service that trusted it was sent to a node that refused it. The replication
problem is reported as one ``[-]replication ...`` line; ``noleader`` skips the leader part as it skips the
membership leader check. tests/integration/test_default_replication.py shows it on a real process.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.http.common import make_error_middleware
from node.http.db import DbRoutes
from node.runtime.mailbox import LatestCell
from node.service import LocalDataService
from node.storage.sqlite import Database, Limits
from tests.support.dbapi import QuietLog

SECRET = "a-test-secret-that-is-long-enough-0123456789"
STARTING, NO_LEADER, SERVING = "starting", "no_leader", "serving"


class FakeReplication:
    """Stands in for node.replication.wiring.Replication.readiness_problem, in a state the test sets."""

    def __init__(self) -> None:
        self.state = STARTING

    def problem(self, need_leader: bool) -> str | None:
        if self.state == STARTING:
            return "starting: forming or joining a cluster"
        if self.state == NO_LEADER and need_leader:
            return "has no healthy leader"
        return None


async def _probe(
    data_dir: Path, steps: list[tuple[str | None, bool]]
) -> list[tuple[str | None, bool, int, str]]:
    """For each (replication state or None for REPLICATION=off, noleader): the /readyz status and text."""
    database = Database(data_dir, limits=Limits(), queue_size=8)
    await database.open()
    service = LocalDataService(database)
    replication = FakeReplication()
    decisions: LatestCell = LatestCell()
    decisions.publish(object())  # an election round has run: the membership leader line is ok
    app = web.Application(middlewares=[make_error_middleware(QuietLog())])
    DbRoutes(
        service=service, jwt_secret=SECRET, decisions=decisions, max_body_bytes=1 << 16,
        max_load_bytes=1 << 20, max_statements=10, body_read_timeout_s=1.0,
    ).add_to(app)  # fmt: skip
    client = TestClient(TestServer(app))
    await client.start_server()
    out = []
    try:
        for state, noleader in steps:
            if state is None:
                service.__dict__.pop("replication_problem", None)
            else:
                replication.state = state
                service.replication_problem = replication.problem  # as the supervisor attaches it
            resp = await client.get("/readyz?noleader" if noleader else "/readyz")
            out.append((state, noleader, resp.status, await resp.text()))
    finally:
        await client.close()
        await database.close()
    return out


def _run(steps: list[tuple[str | None, bool]]) -> list[tuple[str | None, bool, int, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_probe(Path(tmp), steps))


def test_not_ready_while_forming_nor_without_a_leader_ready_once_serving():
    """Regression: a node still forming said 200 and then answered its first write 503."""
    results = _run(
        [(STARTING, False), (NO_LEADER, False), (NO_LEADER, True), (SERVING, False), (None, False)]
    )
    (_, _, s1, t1), (_, _, s2, t2), (_, _, s3, _), (_, _, s4, t4), (_, _, s5, t5) = results
    assert s1 == 503 and "[-]replication starting: forming or joining a cluster" in t1
    assert s2 == 503 and "[-]replication has no healthy leader" in t2
    assert s3 == 200  # noleader: a level=none read works without a leader
    assert s4 == 200 and "[-]" not in t4
    assert s5 == 200 and "replication" not in t5  # REPLICATION=off: no replication line at all


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from([STARTING, NO_LEADER, SERVING, None]), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_readyz_is_ready_exactly_when_replication_can_serve(steps):
    for state, noleader, status, text in _run(steps):
        can_serve = state in (None, SERVING) or (state == NO_LEADER and noleader)
        assert (status == 200) == can_serve, (state, noleader, status, text)
        assert ("[-]replication" in text) == (not can_serve), (state, noleader, text)
