"""Data API endpoints, shaped like rqlite's: /db/execute, /db/query, /db/request, /db/backup, /db/load, /readyz.

Every data endpoint checks the token first (before reading a body): /db/query needs ``read``, /db/execute
and /db/request ``write``, /db/backup and /db/load ``admin``. /readyz is public, like /cluster/status.

Bodies are read here, with a byte limit per route (413) and a time limit (408), not through aiohttp's
app-wide ``client_max_size``: /db/load takes far more than the other routes, and its body is streamed to a
temporary file in DATA_DIR (never whole in memory; 507 if the disk fills), removed in every case.

Reads carry a client key (a hash of the Authorization header, never the credential itself) so that one
client cannot hold every reader of the database.

Handlers authenticate, parse, call the data service (:mod:`node.service`) and render its raw results as
rqlite's JSON (:mod:`node.http.render`). The service stamps writes (off the event loop), gives them a log
index and applies them; with replication it will also forward to the leader or answer 301.

Headers: a client may send ``X-Request-Id`` (1-128 printable ASCII characters) with a write; a retry of
the write with the same ID and the same credential is applied at most once and answers the first
application's results. Every successful write answers ``X-TalentNest-Index``: the log index that committed
it (for a deduplicated retry, the index that applied it the first time); a write whose COMMIT failed
(nothing stored, every result says "rolled back") answers without it. /db/load takes ``X-Request-Id``
too (with replication a retried load applies at most once). /db/backup answers from the node asked, with
``X-TalentNest-Applied-Index``: the applied index its copy reflects.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from node import auth, errors
from node.core.election import Leadership
from node.core.sqlreq import (
    DbRequest,
    Flags,
    Statement,
    decode_text,
    parse_statements,
    parse_text_statement,
)
from node.http.common import (
    EXTRA_HEADERS,
    body_at_hand,
    declared_too_large,
    json_response,
    parse_json,
    query_flags,
    read_body,
    request_flags,
)
from node.http.fastpath import FastRequest
from node.http.render import INLINE_RENDER_CELLS, cells, render_results
from node.runtime.mailbox import LatestCell
from node.service import LocalDataService, LogBackedDataService, WriteOutcome, WriteRequest
from node.storage.durable import free_bytes
from node.storage.results import StatementResult
from node.storage.sqlite import SQLITE_MAGIC, Database, is_disk_full
from node.storage.statemachine import MAX_REQUEST_ID_CHARS, valid_request_id

# Request bodies up to this size are parsed on the event loop (microseconds); larger ones in a thread.
INLINE_PARSE_BYTES = 64 << 10
# Bytes per read when streaming a backup file to the client.
BACKUP_CHUNK_BYTES = 1 << 20
# Bytes of a /db/load body gathered in memory before they are written to the upload file (off the loop).
UPLOAD_CHUNK_BYTES = 1 << 20
REQUEST_ID_HEADER = "X-Request-Id"
INDEX_HEADER = "X-TalentNest-Index"
# On /db/backup: the applied index the copy reflects (on the node asked; with replication a follower's copy
# may be behind the leader's, and this says by how much).
APPLIED_INDEX_HEADER = "X-TalentNest-Applied-Index"


# Client keys by Authorization header, for the few credentials a node's clients use again and again: a
# dict lookup instead of a SHA-256 per request. Only headers up to CLIENT_KEY_CACHE_CHARS characters are
# kept, and the dict is emptied when it reaches CLIENT_KEY_CACHE_ENTRIES (at most ~2 MiB of keys). It
# lives in this process's memory only, like the header each request brings; nothing of it is logged.
CLIENT_KEY_CACHE_ENTRIES = 1024
CLIENT_KEY_CACHE_CHARS = 2048
_client_keys: dict[str, str] = {}


def client_key(authorization: str | None) -> str:
    """Who a read belongs to, for the per-client reader cap: a hash of the credential, never the credential."""
    if authorization is not None:
        key = _client_keys.get(authorization)
        if key is not None:
            return key
    key = hashlib.sha256((authorization or "").encode("utf-8", "surrogateescape")).hexdigest()[:32]
    if authorization is not None and len(authorization) <= CLIENT_KEY_CACHE_CHARS:
        if len(_client_keys) >= CLIENT_KEY_CACHE_ENTRIES:
            _client_keys.clear()
        _client_keys[authorization] = key
    return key


class DbRoutes:
    def __init__(
        self,
        *,
        service: LocalDataService | LogBackedDataService,
        jwt_secret: str,
        decisions: LatestCell[Leadership],
        max_body_bytes: int,
        max_load_bytes: int,
        max_statements: int,
        body_read_timeout_s: float,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        log_reserve_bytes: int = 0,
    ) -> None:
        self._service = service
        self._db: Database = service.database  # backups, upload files and readiness stay local
        self._secret = jwt_secret
        self._decisions = decisions
        self._max_body = max_body_bytes
        self._max_load = max_load_bytes
        self._max_statements = max_statements
        self._read_timeout_s = body_read_timeout_s
        self._wall_clock_ns = wall_clock_ns
        self._log_reserve_bytes = log_reserve_bytes

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/db/execute", self.execute)
        app.router.add_get("/db/query", self.query)
        app.router.add_post("/db/query", self.query)
        app.router.add_post("/db/request", self.unified)
        app.router.add_get("/db/backup", self.backup)
        app.router.add_post("/db/load", self.load)
        app.router.add_get("/readyz", self.readyz)

    # --- helpers -------------------------------------------------------------------------------------------

    def _authorize(self, request: web.Request, role: auth.Role) -> auth.Principal:
        principal = auth.authenticate(
            request.headers.get("Authorization"), self._secret, now=self._wall_clock_ns() / 1e9
        )
        principal.require(role)
        return principal

    async def _request(self, request: web.Request, flags: Flags, raw: bytes | None = None) -> DbRequest:
        """The request's statements; ``raw`` is its body if the caller already has it (:func:`body_at_hand`)."""
        if raw is None:
            raw = await read_body(request, limit=self._max_body, timeout_s=self._read_timeout_s)
        text = _is_text(request)
        if len(raw) <= INLINE_PARSE_BYTES:
            return self._parse(raw, flags, text=text)
        # Decoding and checking a body of megabytes takes tens of milliseconds of CPU: off the event loop, so
        # probes and other requests are served meanwhile.
        return await asyncio.to_thread(self._parse, raw, flags, text=text)

    def _parse(self, raw: bytes, flags: Flags, *, text: bool) -> DbRequest:
        return DbRequest(self._statements(raw, text=text), flags)

    def _statements(self, raw: bytes, *, text: bool) -> tuple[Statement, ...]:
        if text:
            return parse_text_statement(decode_text(raw))
        body = parse_json(raw, expected="a JSON array of statements")
        # raw too: an integer beyond 64 bits is decoded again exactly, to be refused rather than stored as REAL.
        return parse_statements(body, max_statements=self._max_statements, raw=raw)

    def _respond(
        self,
        results: list[dict[str, Any]],
        flags: Flags,
        started: float,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body: dict[str, Any] = {"results": results}
        if flags.timings:
            body["time"] = time.perf_counter() - started
        return json_response(body, headers=headers, pretty=flags.pretty)

    async def _render(
        self,
        results: tuple[StatementResult, ...] | list[StatementResult],
        flags: Flags,
        *,
        unified: bool = False,
    ) -> list[dict[str, Any]]:
        if cells(results) <= INLINE_RENDER_CELLS:
            return render_results(results, flags, unified=unified)
        return await asyncio.to_thread(render_results, results, flags, unified=unified)

    async def _write(self, request: web.Request, *, unified: bool) -> web.Response:
        started = time.perf_counter()
        authorization = request.headers.get("Authorization")  # looked up once: the token, then the client key
        principal = auth.authenticate(authorization, self._secret, now=self._wall_clock_ns() / 1e9)
        principal.require(auth.Role.WRITE)
        flags = request_flags(request)
        request_id = checked_request_id(request.headers.get(REQUEST_ID_HEADER))
        # A small body that came with its head (the common write) is parsed here, without the two coroutines
        # of reading and parsing it in general (the same checks, the same answers: see body_at_hand).
        raw = body_at_hand(request, limit=self._max_body)
        if raw is not None and len(raw) <= INLINE_PARSE_BYTES:
            statements = self._statements(raw, text=_is_text(request))
        else:
            statements = (await self._request(request, flags, raw)).statements
        body, headers = await self._commit(statements, flags, unified, request_id, authorization, started)
        return json_response(body, headers=headers, pretty=flags.pretty)

    async def fast_execute(self, request: FastRequest) -> tuple[int, dict[str, str] | None, bytes]:
        """``POST /db/execute`` taken by the fast path (node.http.fastpath): :meth:`execute`'s checks in its
        order, its answer as (status, headers, JSON body). Its body is whole at hand already."""
        started = time.perf_counter()
        authorization = request.headers.get("authorization")
        principal = auth.authenticate(authorization, self._secret, now=self._wall_clock_ns() / 1e9)
        principal.require(auth.Role.WRITE)
        flags = query_flags(request.query_string)
        request_id = checked_request_id(request.headers.get("x-request-id"))
        raw = request.body
        if len(raw) > self._max_body:  # its Content-Length, as the aiohttp path checks it
            raise declared_too_large(len(raw), self._max_body)
        if len(raw) <= INLINE_PARSE_BYTES:
            statements = self._statements(raw, text=request.text)
        else:
            statements = await asyncio.to_thread(self._statements, raw, text=request.text)
        body, headers = await self._commit(statements, flags, False, request_id, authorization, started)
        return 200, headers, orjson.dumps(body, option=orjson.OPT_INDENT_2 if flags.pretty else 0)

    async def _commit(
        self,
        statements: tuple[Statement, ...],
        flags: Flags,
        unified: bool,
        request_id: str | None,
        authorization: str | None,
        started: float,
    ) -> tuple[dict[str, Any], dict[str, str] | None]:
        """Submit a parsed write and render its answer: the JSON body and the headers of a 200."""
        write = WriteRequest(statements, flags.transaction, unified, request_id)
        # Replication seam: the service forwards to the leader (or answers 301) when this node is a follower.
        outcome: WriteOutcome = await self._service.submit(write, client_key(authorization))
        # The results exist only after the write's log entry was fsynced and then applied: answering now
        # acknowledges only durable writes. Few results are rendered here, without a coroutine for it.
        if cells(outcome.results) <= INLINE_RENDER_CELLS:
            results = render_results(outcome.results, flags, unified=unified)
        else:
            results = await asyncio.to_thread(render_results, outcome.results, flags, unified=unified)
        body: dict[str, Any] = {"results": results}
        if flags.timings:
            body["time"] = time.perf_counter() - started
        # The index names a stored write only: after a failed group COMMIT nothing was stored.
        return body, ({INDEX_HEADER: str(outcome.index)} if outcome.committed else None)

    # --- handlers ------------------------------------------------------------------------------------------

    async def execute(self, request: web.Request) -> web.Response:
        return await self._write(request, unified=False)

    async def query(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        self._authorize(request, auth.Role.READ)
        flags = request_flags(request)
        if request.method == "GET":
            sql = request.query.get("q", "")
            if not sql.strip():
                raise errors.BadRequest("query parameter not set")
            db_request = DbRequest(parse_text_statement(sql), flags)
        else:
            db_request = await self._request(request, flags)
        raw = await self._service.read(
            db_request, flags.level, client_key(request.headers.get("Authorization"))
        )
        return self._respond(await self._render(raw, flags), flags, started)

    async def unified(self, request: web.Request) -> web.Response:
        return await self._write(request, unified=True)

    async def backup(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request, auth.Role.ADMIN)
        fmt = request.query.get("fmt", "binary")
        if fmt != "binary":
            raise errors.BadRequest(f"unsupported backup format {fmt!r}; only fmt=binary is supported")
        require_local_copy = getattr(self._service, "require_local_copy", None)  # REPLICATION=on only
        if require_local_copy is not None:
            require_local_copy()  # a node whose data was quarantined has no copy to give yet
        path, applied = await self._db.backup_indexed()
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Disposition": 'attachment; filename="node.db"',
                    "Content-Length": str(size),
                    APPLIED_INDEX_HEADER: str(applied),
                    **request.get(EXTRA_HEADERS, {}),
                }
            )
            await response.prepare(request)
            # Each chunk is read by offset in one thread call that opens and closes the file, so a client that
            # goes away (the handler is cancelled) can never leave an open handle behind.
            offset = 0
            while chunk := await asyncio.to_thread(_read_chunk, path, offset, BACKUP_CHUNK_BYTES):
                await response.write(chunk)
                offset += len(chunk)
            await response.write_eof()
            return response
        finally:
            await asyncio.to_thread(path.unlink, True)

    async def load(self, request: web.Request) -> web.Response:
        """The body goes to a temporary file in DATA_DIR (never whole in memory); the database thread reads it:
        an SQLite file is checked and renamed into place, a dump is split and run as one transaction."""
        started = time.perf_counter()
        self._authorize(request, auth.Role.ADMIN)
        flags = request_flags(request)
        request_id = checked_request_id(request.headers.get(REQUEST_ID_HEADER))
        client = client_key(request.headers.get("Authorization"))
        path = self._db.temp_path("upload")
        try:
            head, blank = await self._receive_to_file(request, path)
            if head.startswith(SQLITE_MAGIC):
                loaded = await self._service.load_sqlite_file(path, client=client, request_id=request_id)
                return self._respond([], flags, started, {INDEX_HEADER: str(loaded.index)})
            if blank:
                raise errors.BadRequest("request body is empty; expected an SQLite file or an SQL dump")
            # The dump is split and its time keywords rewritten off the event loop (by the service).
            loaded = await self._service.load_dump_file(path, client=client, request_id=request_id)
            return self._respond(
                [{"statements": loaded.statements}], flags, started, {INDEX_HEADER: str(loaded.index)}
            )
        finally:
            await asyncio.to_thread(path.unlink, True)

    async def _receive_to_file(self, request: web.Request, path: Path) -> tuple[bytes, bool]:
        """Stream the body to ``path``: 413 past the load limit, 408 past the read time, 507 if the disk fills.

        Returns the first bytes (to tell an SQLite file from a dump) and whether the body is blank.
        """
        limit = self._max_load
        declared = request.content_length
        if declared is not None and declared > limit:
            raise declared_too_large(declared, limit)
        head = b""
        blank = True
        size = 0
        pending = bytearray()
        try:
            handle = await asyncio.to_thread(open, path, "wb")
        except OSError as exc:
            raise _storage_error(exc) from None
        try:
            async with asyncio.timeout(self._read_timeout_s):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise errors.PayloadTooLarge(
                            f"request body exceeds the limit of {limit} bytes", limit=limit
                        )
                    if len(head) < len(SQLITE_MAGIC):
                        head += chunk[: len(SQLITE_MAGIC) - len(head)]
                    blank = blank and not chunk.strip()
                    pending += chunk
                    if len(pending) >= UPLOAD_CHUNK_BYTES:
                        data, pending = bytes(pending), bytearray()
                        await asyncio.to_thread(handle.write, data)
            if pending:
                await asyncio.to_thread(handle.write, bytes(pending))
            await asyncio.to_thread(handle.flush)
        except TimeoutError:
            raise errors.RequestTimeout(
                f"request body not received within {self._read_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise _storage_error(exc) from None
        finally:
            await asyncio.to_thread(handle.close)
        return head, blank

    async def readyz(self, request: web.Request) -> web.Response:
        lines = ["[+]node ok"]
        ready = True
        if "noleader" not in request.query:
            if self._decisions.get() is None:
                lines.append("[+]leader does not exist")
                ready = False
            else:
                lines.append("[+]leader ok")
        if self._db.is_open:
            lines.append("[+]store ok")
            try:
                await self._db.ping()
                lines.append("[+]db ok")
            except (errors.NodeError, OSError) as exc:
                lines.append(f"[-]db not ok: {exc}")
                ready = False
            if await self._db.disk_low():
                lines.append("[-]disk full")
                ready = False
            below = await self._log_reserve_shortfall()
            if below is not None:
                lines.append(f"[-]log below reserve: {below}")
                ready = False
            stalled = getattr(self._service, "stalled", None)
            if stalled is not None:
                lines.append(f"[-]log apply stalled: {stalled}")
                ready = False
            refused = getattr(self._db, "apply_refused", None)
            if refused is not None:  # replicated entries of another SQLite version: this copy stands still
                lines.append(f"[-]apply refused: {refused}")
                ready = False
            replication = getattr(self._service, "replication_problem", None)  # REPLICATION=on only
            problem = replication("noleader" not in request.query) if replication is not None else None
            if problem is not None:
                lines.append(f"[-]replication {problem}")
                ready = False
        else:
            lines.append(f"[-]store not ready: {self._db.state_detail or self._db.state}")
            ready = False
        return web.Response(text="\n".join(lines), status=200 if ready else 503, content_type="text/plain")

    async def _log_reserve_shortfall(self) -> str | None:
        """Why writes are refused for space (the log keeps LOG_RESERVE_BYTES free in DATA_DIR: an append
        that would leave less is refused with 507, see node.storage.log), or None. A statvfs, off the loop."""
        reserve = self._log_reserve_bytes
        if reserve <= 0:
            return None
        try:
            free = await asyncio.to_thread(free_bytes, self._db.data_dir)
        except OSError:
            return None  # DATA_DIR unreadable: the store and db checks above report it
        if free >= reserve:
            return None
        return f"{free} bytes free in DATA_DIR, LOG_RESERVE_BYTES is {reserve}: writes are refused"


class ExecuteFastRoute:
    """The write fast path's route (node.http.fastpath) on a node that answers every write itself
    (REPLICATION=off): :meth:`DbRoutes.fast_execute`. With replication the forwarding layer wraps it."""

    __slots__ = ("answer",)

    def __init__(self, routes: DbRoutes) -> None:
        self.answer = routes.fast_execute

    def claim(self, request: FastRequest) -> bool:
        return True


def _is_text(request: web.Request) -> bool:
    """Whether a body is a plain-text statement (text/plain) rather than JSON. The header as clients almost
    always send it needs no parse (aiohttp's costs more than the JSON's)."""
    if request.headers.get("Content-Type") == "application/json":
        return False
    return request.content_type == "text/plain"


def checked_request_id(value: str | None) -> str | None:
    """The X-Request-Id header's value checked, or None when the request has none."""
    if value is None:
        return None
    if not valid_request_id(value):
        raise errors.BadRequest(
            f"{REQUEST_ID_HEADER} must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces"
        )
    return value


def _storage_error(exc: OSError) -> errors.NodeError:
    if is_disk_full(exc):
        return errors.InsufficientStorage("not enough disk space in DATA_DIR to receive the upload")
    return errors.Unavailable(f"cannot store the upload in DATA_DIR: {exc.strerror or exc}")


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)
