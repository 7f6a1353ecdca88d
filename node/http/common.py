"""Shared HTTP plumbing: JSON responses, the error middleware, body reading with limits."""

from __future__ import annotations

import asyncio
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


async def read_body(request: web.Request, *, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes (else 413), within ``timeout_s`` (else 408).

    The time limit is what keeps a client that announces a body and then stalls from holding a handler
    (and a connection) for ever.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise errors.PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}", limit=limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                if len(body) + len(chunk) > limit:
                    raise errors.PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", limit=limit)
                body += chunk
    except TimeoutError:
        raise errors.RequestTimeout(f"request body not received within {timeout_s:g} s") from None
    return bytes(body)


def parse_json(raw: bytes, *, expected: str = "JSON") -> Any:
    """Parse a JSON body; an empty or malformed one is a 400 saying what was expected and what is wrong."""
    if not raw.strip():
        raise errors.BadRequest(f"request body is empty; expected {expected}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"invalid JSON body: {exc}") from None


async def read_json(request: web.Request, *, limit: int, timeout_s: float) -> Any:
    """Read (with :func:`read_body`'s limits) and parse a JSON body; every failure is a 4xx saying what."""
    return parse_json(await read_body(request, limit=limit, timeout_s=timeout_s))
