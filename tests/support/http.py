"""One JSON request to a node, as the tests make it: no redirect followed (a 301 is an answer under test),
and any failure to get an answer (refused, reset, timed out) is status 0, so a test can wait on it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 301 is the answer under test, not something to follow


_OPENER = urllib.request.build_opener(_NoRedirect)


def call_json(
    url: str, body: Any = None, token: str | None = None, timeout_s: float = 5.0, headers: dict | None = None
):
    """(status, headers, JSON body) of one request: a POST of ``body`` as JSON, or a GET without one. A
    non-JSON error body is returned as bytes; no answer at all is (0, {}, None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, dict(exc.headers), json.loads(raw or b"null")
        except ValueError:
            return exc.code, dict(exc.headers), raw
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}, None
