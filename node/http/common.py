"""Shared HTTP plumbing: JSON responses, the error middleware, body reading with limits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from node import errors

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None, *, pretty: bool = False):
    option = orjson.OPT_INDENT_2 if pretty else 0
    return web.Response(
        body=orjson.dumps(body, option=option),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: errors.NodeError) -> web.Response:
    return json_response(exc.body(), status=exc.status, headers=exc.headers())


def make_error_middleware(log: Any):
    """Every failure becomes a JSON error with the right status; nothing a client sends crashes the node."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.NodeError as exc:
            return error_response(exc)
        except web.HTTPMethodNotAllowed as exc:
            allowed = sorted(exc.allowed_methods)
            return error_response(
                errors.MethodNotAllowed(
                    f"method {request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
                    allowed,
                )
            )
        except web.HTTPNotFound:
            return error_response(errors.NotFound(f"no such endpoint: {request.path}"))
        except web.HTTPRequestEntityTooLarge as exc:
            return error_response(errors.PayloadTooLarge(f"request body too large: {exc.text}"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_response(
                {"error": exc.reason, "code": exc.reason.lower().replace(" ", "_")}, status=exc.status
            )
        except (ConnectionResetError, TimeoutError) as exc:
            # The client went away or stalled past a read deadline: nothing to answer, nothing broken.
            log.debug("request_aborted", path=request.path, reason=type(exc).__name__)
            raise
        except Exception:  # noqa: BLE001 - the one place that turns a bug into a 500 instead of a dead node
            log.exception("request_failed", method=request.method, path=request.path)
            return error_response(errors.NodeError("internal error; see the node's log"))

    return error_middleware


async def read_json(request: web.Request) -> Any:
    """Read and parse a JSON body, mapping every failure to a 4xx that says what was wrong."""
    raw = await request.read()
    if not raw.strip():
        raise errors.BadRequest("request body is empty; expected JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"invalid JSON body: {exc}") from None
