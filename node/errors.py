"""One error hierarchy; each error knows its HTTP status. The HTTP layer maps them in one place.

The JSON body of every error is ``{"error": "<what is wrong>", "code": "<stable name>", ...details}``:
``error`` is the key rqlite clients read, ``code`` is for programs that branch on the kind of failure.
"""

from __future__ import annotations

from typing import Any


class RefusedToRun(RuntimeError):
    """Not an HTTP error: the node refuses to run on what it found in DATA_DIR (data written without
    replication, another node's hard-state file, a log in a newer format, a database and log that do not fit
    together, a state damaged again right after a quarantine). A restart in the same process would find the
    same (node.runtime.restart does not restart after it): the process exits 1, and the message says what an
    operator must do."""


class NodeError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code, **self.details}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(NodeError):
    """The client sent something we cannot act on; the message says what."""

    status = 400
    code = "bad_request"


class Unauthorized(NodeError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="talentnest", Basic realm="talentnest"'}


class Forbidden(NodeError):
    status = 403
    code = "forbidden"


class NotFound(NodeError):
    status = 404
    code = "not_found"


class MethodNotAllowed(NodeError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message, allowed=allowed)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class RequestTimeout(NodeError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(NodeError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(NodeError):
    status = 415
    code = "unsupported_media_type"


class Busy(NodeError):
    """A bounded queue is full; the client should retry shortly."""

    status = 503
    code = "busy"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class NotLeader(NodeError):
    status = 503
    code = "not_leader"

    def __init__(self, message: str, leader_url: str | None) -> None:
        super().__init__(message, leader=leader_url)


class NoQuorum(NodeError):
    status = 503
    code = "no_quorum"


class Unavailable(NodeError):
    status = 503
    code = "unavailable"


class DatabaseChecking(Unavailable):
    """The database's integrity is being checked at start; data calls wait for it."""

    code = "database_checking"


class DatabaseCorrupt(Unavailable):
    """The database file failed its integrity check and was quarantined; an operator must act."""

    code = "database_corrupt"


class InsufficientStorage(NodeError):
    """The disk holding DATA_DIR is full: nothing was stored; retry after space is freed."""

    status = 507
    code = "insufficient_storage"
