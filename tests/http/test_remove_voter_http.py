"""DELETE /cluster/voters/<node> in process: token first (401/403), then the path segment (400), then the
replication hook (404 with REPLICATION=off). Any segment a client sends answers a JSON 4xx or what the hook
answers, never a 5xx."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import auth, errors
from node.http.cluster import ClusterRoutes, parse_member_ref
from node.http.server import HttpApi
from node.runtime.mailbox import LatestCell, Mailbox, Overflow
from tests.http.test_cluster_http import ME, SECRET, RecordingLog, a_decision, expect_error


def bearer(role: auth.Role) -> dict[str, str]:
    return {"Authorization": "Bearer " + auth.mint_jwt(SECRET, role, now=time.time(), ttl_s=3600)}


ADMIN = bearer(auth.Role.ADMIN)


class Api:
    def __init__(self, client: TestClient, routes: ClusterRoutes) -> None:
        self.client, self.routes = client, routes
        self.calls: list[int | str] = []


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    decisions: LatestCell = LatestCell()
    decisions.publish(a_decision())
    http = HttpApi(host="127.0.0.1", port=0, log=RecordingLog())
    routes = ClusterRoutes(
        me=ME, decisions=decisions, inbox=Mailbox("membership", 8, Overflow.BLOCK), secret=SECRET,
        log=RecordingLog(),
    )  # fmt: skip
    routes.add_to(http.app)
    async with TestClient(TestServer(http.app, host="127.0.0.1")) as client:
        yield Api(client, routes)


def replicated(api: Api, answer: object = None) -> None:
    async def remove(target: int | str) -> dict:
        api.calls.append(target)
        if isinstance(answer, errors.NodeError):
            raise answer
        return {"removed": str(target), "voters": ["a", "b"]}

    api.routes.remove_member = remove


async def test_token_is_checked_first(api):
    replicated(api)
    await expect_error(await api.client.delete("/cluster/voters/515"), 401, "unauthorized")
    resp = await api.client.delete("/cluster/voters/515", headers=bearer(auth.Role.WRITE))
    await expect_error(resp, 403, "forbidden")
    assert api.calls == []


async def test_replication_off_has_no_voters_404(api):
    resp = await api.client.delete("/cluster/voters/515", headers=ADMIN)
    body = await expect_error(resp, 404, "not_found")
    assert "REPLICATION=off" in body["error"]


async def test_a_node_id_or_an_identity_reaches_the_hook_and_its_answer_is_returned(api):
    replicated(api)
    resp = await api.client.delete("/cluster/voters/515", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["removed"] == "515"
    identity = str(uuid.uuid4())
    resp = await api.client.delete(f"/cluster/voters/{identity}", headers=ADMIN)
    assert resp.status == 200
    assert api.calls == [515, identity]


@pytest.mark.parametrize(
    "segment", ["abc", "-1", "1.5", "0x10", "1234567890", "ABCDEF00-0000-4000-8000-000000000000"]
)
async def test_a_malformed_segment_is_400_and_reaches_nothing(api, segment):
    replicated(api)
    await expect_error(
        await api.client.delete(f"/cluster/voters/{segment}", headers=ADMIN), 400, "bad_request"
    )
    assert api.calls == []


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.NotFound("x"), 404, "not_found"),
        (errors.NoQuorum("no quorum: 1 of 3 voters reachable"), 503, "no_quorum"),
    ],
)
async def test_the_hooks_refusals_are_json_errors(api, error, status, code):
    replicated(api, error)
    await expect_error(await api.client.delete("/cluster/voters/515", headers=ADMIN), status, code)


@given(st.text(min_size=1, max_size=60))
def test_parse_member_ref_is_total(text):
    """Any text: a node ID, a canonical identity, or a 400 -- never another exception."""
    try:
        ref = parse_member_ref(text)
    except errors.BadRequest:
        return
    if isinstance(ref, int):
        assert re.fullmatch(r"[0-9]{1,9}", text) and int(text) == ref
    else:
        assert str(uuid.UUID(ref)) == ref == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(codec="ascii", exclude_characters="/?#%"), min_size=1, max_size=40))
async def test_any_segment_answers_json_4xx_or_the_hook_never_5xx(api, segment):
    replicated(api)
    resp = await api.client.delete("/cluster/voters/" + segment.replace(" ", "%20"), headers=ADMIN)
    assert resp.status in (200, 400, 404, 405), resp.status
    assert resp.content_type == "application/json"
