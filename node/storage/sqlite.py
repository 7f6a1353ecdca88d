"""The node's SQLite database: one file in DATA_DIR, WAL mode, every call on one dedicated thread.

Threading: a single-worker executor owns both connections (opened, used and closed there), so no sqlite call
ever runs on the event loop and no connection is shared between threads. Jobs queue in arrival order; at
most ``queue_size`` may wait, beyond that callers get :class:`node.errors.Busy` (503) instead of an
ever-growing backlog.

Connections:

* the **write** connection runs /db/execute, /db/request, /db/load. Its ``random()``, ``randomblob()`` and
  date/time functions are replaced by ones answering from the current :class:`WriteCommand`'s seed and
  timestamp, so a command replays identically on every copy of the database.
* the **query** connection runs /db/query with ``PRAGMA query_only`` and refuses, before running it, any
  statement SQLite does not report as read-only.

Durability: ``PRAGMA synchronous=FULL`` in WAL mode, so every commit is fsynced into the WAL before
``execute`` returns, and the HTTP layer answers only after that. An acknowledged write survives a crash of
the process and of the machine (power loss included, as far as the disk honours fsync).

Guards on user SQL (an authorizer): no ATTACH/DETACH (no files outside DATA_DIR), no transaction statements
(a request may not leave a transaction open on the shared connection: use the ``transaction`` flag), and no
pragmas that change journaling or durability. Every statement has a time limit (a progress handler
interrupts it), a result has a row and a byte limit, and no single value may exceed the byte limit.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import apsw

from node import errors
from node.core.sqlreq import DbRequest, Flags, Statement, WriteCommand

T = TypeVar("T")

DB_FILE_NAME = "node.db"
SQLITE_MAGIC = b"SQLite format 3\x00"
READ_ONLY_REFUSAL = "attempt to change database via query operation"
# Date and time functions that accept 'now'; on the write connection they answer from the command's time.
TIME_FUNCTIONS = ("date", "time", "datetime", "julianday", "unixepoch", "strftime", "timediff")
# Pragmas user SQL may not run: they would change journaling, durability or the engine's safety settings.
DENIED_PRAGMAS = frozenset(
    {
        "journal_mode", "synchronous", "wal_checkpoint", "wal_autocheckpoint", "locking_mode", "query_only",
        "writable_schema", "mmap_size", "temp_store_directory", "data_store_directory", "journal_size_limit",
        "trusted_schema", "cell_size_check", "schema_version", "hard_heap_limit", "soft_heap_limit", "threads",
    }
)  # fmt: skip
# SQLite virtual-machine steps between two checks of the statement deadline.
PROGRESS_STEPS = 1000
_TEMP_PREFIX = ".tmp-"
_INSERT_WORDS = re.compile(r"^\s*(INSERT|REPLACE)\b", re.IGNORECASE)
_TX_WORDS = re.compile(r"^\s*(BEGIN|COMMIT|END|ROLLBACK)\b", re.IGNORECASE)
_TX_ACTIONS = (apsw.SQLITE_TRANSACTION, apsw.SQLITE_SAVEPOINT)


@dataclass(frozen=True, slots=True)
class Limits:
    # Seconds one statement may run before it is interrupted (a request can ask for less with db_timeout).
    statement_timeout_s: float = 5.0
    # Rows one statement may return.
    max_result_rows: int = 10_000
    # Bytes (approximate, as encoded) all results of one request may hold; also the largest single value.
    max_result_bytes: int = 16 << 20


class _Mode:
    EXECUTE = "execute"
    QUERY = "query"
    REQUEST = "request"


class _Budget:
    """What is left of a request's result limits."""

    __slots__ = ("bytes_left", "max_rows", "timeout_s")

    def __init__(self, limits: Limits, flags: Flags) -> None:
        self.bytes_left = limits.max_result_bytes
        self.max_rows = limits.max_result_rows
        timeout = limits.statement_timeout_s
        if flags.db_timeout_s is not None:
            timeout = min(timeout, flags.db_timeout_s)
        self.timeout_s = timeout


class _ResultTooLarge(Exception):
    pass


class Database:
    def __init__(self, data_dir: Path, *, limits: Limits, queue_size: int) -> None:
        self.data_dir = data_dir
        self.path = data_dir / DB_FILE_NAME
        self.limits = limits
        self._queue_size = queue_size
        self._pending = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Everything below is touched only on the database thread.
        self._rw: apsw.Connection | None = None
        self._ro: apsw.Connection | None = None
        self._clock_db: apsw.Connection | None = None
        self._deadline = float("inf")
        # Set (on the loop thread) when closing: the running statement is interrupted at its next progress
        # check and queued jobs fail at once, so a stop is not held up by a slow query or a backlog.
        self._closing = False
        self._internal = False
        self._denied: str | None = None
        self._rng = random.Random()
        self._now_text: str | None = None
        self._temp_seq = 0

    # --- life cycle (event loop side) ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating DATA_DIR and the file if needed) on the database thread. Raises OSError."""
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        try:
            await self._call(self._open)
        except (apsw.Error, OSError) as exc:
            # An OSError so the node reports it as a start-up failure (exit 2), naming DATA_DIR.
            await self.close()
            raise OSError(f"cannot open the database {self.path} (DATA_DIR): {exc}") from exc

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._close)
        finally:
            executor.shutdown(wait=False)

    @property
    def is_open(self) -> bool:
        return self._executor is not None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor
        if executor is None:
            raise errors.Unavailable("the database is not open")
        if self._pending >= self._queue_size:
            raise errors.Busy(f"database queue is full ({self._queue_size} requests waiting); retry shortly")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, self._unless_closing, fn, *args)
        finally:
            self._pending -= 1

    # --- public operations (event loop side) ---------------------------------------------------------------

    async def query(self, request: DbRequest) -> list[dict[str, Any]]:
        """Read-only statements on the query connection."""
        return await self._call(self._run_request, _Mode.QUERY, request.statements, request.flags)

    async def execute(
        self, command: WriteCommand, flags: Flags, *, unified: bool = False
    ) -> list[dict[str, Any]]:
        """A write command on the write connection. Returns once it is committed and fsynced.

        ``unified`` (/db/request): statements that return rows answer with rows, the others as writes.
        """
        mode = _Mode.REQUEST if unified else _Mode.EXECUTE
        return await self._call(self._run_command, mode, command, flags)

    async def ping(self) -> None:
        await self._call(self._ping)

    async def backup(self) -> Path:
        """A consistent copy of the database in a new file (SQLite's backup API); the caller deletes it."""
        return await self._call(self._backup)

    async def load_sqlite(self, data: bytes) -> None:
        """Replace the database with the SQLite file ``data`` (checked first)."""
        await self._call(self._load_sqlite, data)

    async def load_dump(self, command: WriteCommand) -> int:
        """Run an SQL dump as one transaction (all or nothing); returns the number of statements run."""
        return await self._call(self._load_dump, command)

    # --- database thread -----------------------------------------------------------------------------------

    def _open(self, *, first: bool = True) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if first:
            for stale in self.data_dir.glob(f"{_TEMP_PREFIX}*"):
                stale.unlink(missing_ok=True)  # left by a crash during a backup or load
        self._clock_db = apsw.Connection(":memory:")
        self._rw = self._connect("PRAGMA journal_mode=WAL")
        for name in TIME_FUNCTIONS:
            self._rw.create_scalar_function(name, partial(self._fn_time, name), -1, deterministic=True)
        self._rw.create_scalar_function("random", self._fn_random, 0)
        self._rw.create_scalar_function("randomblob", self._fn_randomblob, 1)
        self._ro = self._connect("PRAGMA query_only=ON")

    def _connect(self, setup: str) -> apsw.Connection:
        conn = apsw.Connection(str(self.path))
        conn.set_busy_timeout(5000)
        conn.execute(setup).fetchall()
        # FULL: fsync the WAL at every commit (see the module docstring: what is acknowledged is on disk).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.limit(apsw.SQLITE_LIMIT_LENGTH, self.limits.max_result_bytes)
        conn.limit(apsw.SQLITE_LIMIT_ATTACHED, 0)
        conn.authorizer = self._authorize  # last: the settings above are pragmas user SQL may not run
        conn.set_progress_handler(self._progress, PROGRESS_STEPS)
        return conn

    def _close(self) -> None:
        for conn in (self._ro, self._rw, self._clock_db):
            if conn is not None:
                conn.close()
        self._ro = self._rw = self._clock_db = None

    def _ping(self) -> None:
        assert self._ro is not None
        try:
            self._ro.execute("SELECT 1").fetchall()
        except apsw.Error as exc:
            raise errors.Unavailable(f"database not ok: {_message(exc)}") from None

    def _authorize(
        self, action: int, one: str | None, two: str | None, db: str | None, trig: str | None
    ) -> int:
        if action in (apsw.SQLITE_ATTACH, apsw.SQLITE_DETACH):
            self._denied = "ATTACH and DETACH are not allowed"
            return apsw.SQLITE_DENY
        if action in _TX_ACTIONS and not self._internal:
            self._denied = "transaction statements are not allowed; use the transaction flag"
            return apsw.SQLITE_DENY
        if action == apsw.SQLITE_PRAGMA and one is not None and one.lower() in DENIED_PRAGMAS:
            self._denied = f"disallowed pragma: {one.lower()}"
            return apsw.SQLITE_DENY
        return apsw.SQLITE_OK

    def _unless_closing(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closing:
            raise errors.Unavailable("the node is shutting down")
        return fn(*args)

    def _progress(self) -> bool:
        return self._closing or time.monotonic() > self._deadline

    # Deterministic replacements, used on the write connection only.

    def _fn_random(self) -> int:
        return self._rng.getrandbits(64) - (1 << 63)

    def _fn_randomblob(self, n: Any) -> bytes:
        size = max(1, int(n)) if isinstance(n, int | float) else 1
        if size > self.limits.max_result_bytes:
            raise apsw.TooBigError("string or blob too big")
        return self._rng.randbytes(size)

    def _fn_time(self, name: str, *args: Any) -> Any:
        now = self._now_text or _now_text(time.time_ns())
        if not args and name != "strftime":
            args = (now,)
        elif name == "strftime" and len(args) == 1:
            args = (args[0], now)
        else:
            args = tuple(now if isinstance(a, str) and a.strip().lower() == "now" else a for a in args)
        assert self._clock_db is not None
        placeholders = ", ".join("?" * len(args))
        return self._clock_db.execute(f"SELECT {name}({placeholders})", args).fetchall()[0][0]

    def _internal_sql(self, conn: apsw.Connection, sql: str) -> None:
        self._internal = True
        try:
            conn.execute(sql, can_cache=False)
        finally:
            self._internal = False

    def _rollback_if_open(self, conn: apsw.Connection) -> None:
        if conn.in_transaction:
            self._internal_sql(conn, "ROLLBACK")

    def _run_command(self, mode: str, command: WriteCommand, flags: Flags) -> list[dict[str, Any]]:
        self._rng = random.Random(command.seed)
        self._now_text = command.now_text
        try:
            return self._run_request(mode, command.statements, flags, transaction=command.transaction)
        finally:
            self._rng = random.Random()
            self._now_text = None

    def _run_request(
        self, mode: str, statements: tuple[Statement, ...], flags: Flags, *, transaction: bool | None = None
    ) -> list[dict[str, Any]]:
        conn = self._ro if mode == _Mode.QUERY else self._rw
        assert conn is not None
        transaction = flags.transaction if transaction is None else transaction
        budget = _Budget(self.limits, flags)
        results: list[dict[str, Any]] = []
        try:
            if transaction:
                self._internal_sql(conn, "BEGIN IMMEDIATE" if mode != _Mode.QUERY else "BEGIN")
            for statement in statements:
                result = self._run_statement(conn, mode, statement, flags, budget)
                results.append(result)
                if transaction and "error" in result:
                    # rqlite: processing stops at the first error and the transaction is rolled back whole.
                    self._rollback_if_open(conn)
                    return results
            if transaction:
                # Durability: COMMIT returns after the WAL is fsynced (synchronous=FULL); only then does the
                # caller get the results, and only then does the HTTP 200 go out.
                self._internal_sql(conn, "COMMIT")
        except apsw.Error as exc:
            self._rollback_if_open(conn)
            results.append({"error": _message(exc)})
        finally:
            self._rollback_if_open(conn)  # never leave a transaction open on a shared connection
        return results

    def _run_statement(
        self, conn: apsw.Connection, mode: str, statement: Statement, flags: Flags, budget: _Budget
    ) -> dict[str, Any]:
        started = time.perf_counter()
        seen: dict[str, Any] = {"index": -1, "rows_at": None, "description": None, "refused": False}

        def trace(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            seen["index"] += 1
            description = cursor.get_description()
            if description and seen["description"] is None:
                seen["description"], seen["rows_at"] = description, seen["index"]
            if mode == _Mode.QUERY and not cursor.is_readonly:
                seen["refused"] = True
                return False
            self._deadline = time.monotonic() + budget.timeout_s
            return True

        cursor = conn.cursor()
        cursor.exec_trace = trace
        self._denied = None
        changes_before = conn.total_changes()
        rowid_before = conn.last_insert_rowid()
        rows: list[list[Any]] = []
        result: dict[str, Any] = {}
        params = statement.params
        bindings = dict(params) if isinstance(params, dict) or hasattr(params, "keys") else params
        try:
            # Outside a transaction each statement commits by itself when it finishes stepping, and that
            # commit (WAL fsync, see synchronous=FULL) completes before its result below is built.
            cursor.execute(statement.sql, bindings)
            for row in _bounded_rows(cursor, seen, budget, flags):
                rows.append(row)
        except apsw.ExecTraceAbort:
            result = {"error": READ_ONLY_REFUSAL}
        except apsw.InterruptError:
            result = {"error": f"interrupted: the statement ran longer than {budget.timeout_s:g} s"}
        except apsw.AuthError as exc:
            result = {"error": self._denied or _message(exc)}
        except _ResultTooLarge as exc:
            result = {"error": str(exc)}
        except (apsw.Error, ValueError, OverflowError, UnicodeError) as exc:
            result = {"error": _message(exc)}
        except (KeyError, TypeError) as exc:  # apsw's binding errors the request checks missed: not a 500
            result = {"error": f"cannot bind the values: {type(exc).__name__} {exc}"}
        finally:
            self._deadline = float("inf")
            cursor.close(force=True)
        if "error" not in result:
            description = seen["description"]
            as_rows = mode == _Mode.QUERY or (mode == _Mode.REQUEST and description is not None)
            if as_rows:
                result = _rows_result(description or (), rows, flags)
            else:
                changed = conn.total_changes() - changes_before
                rowid = conn.last_insert_rowid()
                # The connection is shared, so SQLite's last rowid may be another request's: report it only
                # if this statement inserted (it moved, or an INSERT changed rows and reused the same rowid).
                inserted = rowid != rowid_before or (changed > 0 and _INSERT_WORDS.match(statement.sql))
                if inserted and rowid != 0:
                    result["last_insert_id"] = rowid
                if changed > 0 and conn.changes() > 0:
                    result["rows_affected"] = conn.changes()
                if mode == _Mode.REQUEST and flags.associative:
                    result["rows"] = None
        if flags.timings:
            result["time"] = time.perf_counter() - started
        return result

    def _backup(self) -> Path:
        assert self._rw is not None
        target = self._temp_path("backup")
        dest = apsw.Connection(str(target))
        try:
            with dest.backup("main", self._rw, "main") as copy:
                while not copy.done:
                    copy.step(1024)
            # A self-contained file: rollback journal, not WAL (there is no -wal file beside a download).
            dest.execute("PRAGMA journal_mode=DELETE").fetchall()
        except BaseException:
            dest.close()
            target.unlink(missing_ok=True)
            raise
        dest.close()
        return target

    def _load_sqlite(self, data: bytes) -> None:
        source = self._temp_path("load")
        try:
            with open(source, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            check = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                verdict = check.execute("PRAGMA quick_check").fetchall()
                check.execute("SELECT count(*) FROM sqlite_schema").fetchall()
            except apsw.Error as exc:
                raise errors.BadRequest(f"invalid SQLite data: {_message(exc)}") from None
            finally:
                check.close()
            if verdict != [("ok",)]:
                raise errors.BadRequest("invalid SQLite data: integrity check failed")
            # Close, then swap files: the old WAL is checkpointed and removed at close, so it can never be
            # applied to the new file; a crash before the rename leaves the old database whole.
            self._close()
            for sidecar in ("-wal", "-shm"):
                Path(str(self.path) + sidecar).unlink(missing_ok=True)
            os.replace(source, self.path)
            _fsync_dir(self.data_dir)
        finally:
            source.unlink(missing_ok=True)
            if self._rw is None:
                self._open(first=False)

    def _load_dump(self, command: WriteCommand) -> int:
        conn = self._rw
        assert conn is not None
        self._rng = random.Random(command.seed)
        self._now_text = command.now_text
        count = 0
        try:
            self._internal_sql(conn, "BEGIN IMMEDIATE")
            for statement in command.statements:
                for sql in split_sql(statement.sql):
                    if _TX_WORDS.match(sql):
                        continue  # a dump's own BEGIN/COMMIT: the load is one transaction already
                    self._denied = None
                    self._deadline = time.monotonic() + self.limits.statement_timeout_s * 10
                    try:
                        conn.execute(sql).fetchall()
                    except apsw.AuthError as exc:
                        raise errors.BadRequest(f"load failed: {self._denied or _message(exc)}") from None
                    except apsw.Error as exc:
                        raise errors.BadRequest(
                            f"load failed at statement {count + 1}: {_message(exc)}"
                        ) from None
                    count += 1
            self._internal_sql(conn, "COMMIT")
            return count
        finally:
            self._deadline = float("inf")
            self._rollback_if_open(conn)
            self._rng = random.Random()
            self._now_text = None

    def _temp_path(self, kind: str) -> Path:
        self._temp_seq += 1
        return self.data_dir / f"{_TEMP_PREFIX}{kind}-{os.getpid()}-{self._temp_seq}.db"


def split_sql(script: str) -> Iterator[str]:
    """Split a script into complete statements (semicolons inside literals and triggers stay put)."""
    start = 0
    pos = script.find(";")
    while pos >= 0:
        candidate = script[start : pos + 1]
        if apsw.complete(candidate):
            if candidate.strip(" \t\r\n;"):
                yield candidate
            start = pos + 1
        pos = script.find(";", pos + 1)
    tail = script[start:]
    if tail.strip():
        yield tail


def _bounded_rows(
    cursor: apsw.Cursor, seen: dict[str, Any], budget: _Budget, flags: Flags
) -> Iterator[list[Any]]:
    count = 0
    for row in cursor:
        if seen["index"] != seen["rows_at"]:
            continue  # rows of a later statement in the same string: the first statement with columns answers
        count += 1
        if count > budget.max_rows:
            raise _ResultTooLarge(f"result too large: more than {budget.max_rows} rows")
        out = []
        for value in row:
            if isinstance(value, bytes):
                budget.bytes_left -= (len(value) + 2) // 3 * 4 + 2
                value = list(value) if flags.blob_array else base64.b64encode(value).decode("ascii")
            elif isinstance(value, str):
                budget.bytes_left -= len(value) + 2
            else:
                budget.bytes_left -= 8
            out.append(value)
        if budget.bytes_left < 0:
            raise _ResultTooLarge("result too large: the results of this request exceed the byte limit")
        yield out


def _rows_result(
    description: tuple[tuple[str, str | None], ...], rows: list[list[Any]], flags: Flags
) -> dict:
    columns = [name for name, _ in description]
    types = [(decltype or "").lower() for _, decltype in description]
    if flags.associative:
        return {
            "types": dict(zip(columns, types, strict=True)),
            "rows": [dict(zip(columns, r, strict=True)) for r in rows],
        }
    result: dict[str, Any] = {"columns": columns, "types": types}
    if rows:
        result["values"] = rows
    return result


def _message(exc: BaseException) -> str:
    text = str(exc)
    # apsw prefixes some messages with the exception class ("SQLError: ..."); rqlite clients see SQLite's.
    name = type(exc).__name__
    if text.startswith(name + ": "):
        text = text[len(name) + 2 :]
    return text or name


def _now_text(time_ns: int) -> str:
    return WriteCommand((), False, time_ns, 0).now_text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
