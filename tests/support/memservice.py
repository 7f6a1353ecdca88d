"""An in-memory data service for simulations: the real state machine on an in-memory SQLite, no threads.

:class:`InMemoryDataService` implements :class:`node.service.DataService` the way a simulation needs it:
everything runs synchronously inside the awaiting task (so a simulated cluster stays deterministic under a
fake clock), the state machine is :func:`node.storage.statemachine.apply` itself (group apply, savepoints,
the applied index, request IDs), and the time and seed of each write come from callables the simulation
controls. What it leaves out is what the simulation does not model: threads, queues, read time limits and
byte limits (the step budget is kept: it decides results).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import apsw

from node.core.sqlreq import DbRequest, Flags, Level, Statement, WriteCommand, stamp_write
from node.service import WriteOutcome, WriteRequest
from node.storage import results as res
from node.storage import statemachine as sm

_INSERT = re.compile(r"^\s*(INSERT|REPLACE)\b", re.IGNORECASE)  # as node.storage.sqlite reports inserts
_TIME_FUNCTIONS = ("date", "time", "datetime", "julianday", "unixepoch", "strftime", "timediff")


class _MemoryOps:
    """:class:`node.storage.statemachine.Ops` over one in-memory connection."""

    def __init__(self, conn: apsw.Connection, step_budget: int) -> None:
        self.conn = conn
        self.step_budget = step_budget
        self.steps = 0
        self.exceeded = False
        self.rng = random.Random(0)
        self.now_text: str | None = None
        self._clock = apsw.Connection(":memory:")
        for name in _TIME_FUNCTIONS:
            conn.create_scalar_function(name, partial(self._time, name), -1, deterministic=True)
        conn.create_scalar_function("random", lambda: self.rng.getrandbits(64) - (1 << 63), 0)
        conn.create_scalar_function("randomblob", lambda n: self.rng.randbytes(max(1, int(n))), 1)
        conn.set_progress_handler(self._progress, 1000)
        self.counting = False

    def _time(self, name: str, *args: Any) -> Any:
        now = self.now_text or WriteCommand((), False, time.time_ns(), 0).now_text
        if not args and name != "strftime":
            args = (now,)
        elif name == "strftime" and len(args) == 1:
            args = (args[0], now)
        else:
            args = tuple(now if isinstance(a, str) and a.strip().lower() == "now" else a for a in args)
        return self._clock.execute(f"SELECT {name}({', '.join('?' * len(args))})", args).fetchall()[0][0]

    def _progress(self) -> bool:
        if not self.counting:
            return False
        self.steps += 1000
        if self.steps > self.step_budget:
            self.exceeded = True
            return True
        return False

    def internal(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def message(self, exc: BaseException) -> str:
        return str(exc) or type(exc).__name__

    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def deferred_fk_pending(self) -> bool:
        return self.conn.status(apsw.SQLITE_DBSTATUS_DEFERRED_FKS)[0] > 0

    def start_command(self, write: WriteCommand) -> None:
        self.rng = random.Random(write.seed)
        self.now_text = write.now_text
        self.steps, self.exceeded = 0, False

    def over_budget(self) -> bool:
        return self.exceeded

    def run(self, mode: str, statement: Statement) -> res.StatementResult:
        return run_statement(self.conn, mode, statement, self)


def run_statement(
    conn: apsw.Connection, mode: str, statement: Statement, ops: _MemoryOps
) -> res.StatementResult:
    cursor = conn.cursor()
    seen: list[tuple] = []

    def trace(c: apsw.Cursor, sql: str, bindings: Any) -> bool:
        description = c.get_description()
        if description and not seen:
            seen.append(description)
        return mode != sm.Mode.QUERY or c.is_readonly

    cursor.exec_trace = trace
    before_changes, before_rowid = conn.total_changes(), conn.last_insert_rowid()
    params = statement.params
    bindings = dict(params) if hasattr(params, "keys") else params
    ops.counting = True
    try:
        cursor.execute(statement.sql, bindings)
        rows = tuple(cursor)
        description = seen[0] if seen else None
    except apsw.ExecTraceAbort:
        return res.failed("attempt to change database via query operation")
    except apsw.InterruptError:
        return res.failed(
            f"write budget exceeded: the request used more than {ops.step_budget} SQLite VM steps "
            "(DB_WRITE_STEP_BUDGET)"
        )
    except (apsw.Error, ValueError, OverflowError, TypeError, KeyError) as exc:
        return res.failed(ops.message(exc))
    finally:
        ops.counting = False
        cursor.close(force=True)
    if mode == sm.Mode.QUERY or (mode == sm.Mode.REQUEST and description):
        description = description or ()
        return res.StatementResult(
            columns=tuple(n for n, _ in description),
            decltypes=tuple(t for _, t in description),
            rows=rows,
            has_blobs=any(isinstance(v, bytes) for row in rows for v in row),
        )
    changed = conn.total_changes() - before_changes
    rowid = conn.last_insert_rowid()
    return res.StatementResult(
        last_insert_id=rowid
        if rowid and (rowid != before_rowid or (changed > 0 and _INSERT.match(statement.sql)))
        else None,
        rows_affected=conn.changes() if changed > 0 and conn.changes() > 0 else None,
    )


class InMemoryDataService:
    """A single replica's data, in memory: ``submit`` stamps, indexes and applies; ``read`` reads locally."""

    def __init__(
        self,
        *,
        clock_ns: Callable[[], int] = lambda: 1_700_000_000_000_000_000,
        seeds: Iterable[int] | None = None,
        step_budget: int = 20_000_000,
    ) -> None:
        self.conn = apsw.Connection(":memory:")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.ops = _MemoryOps(self.conn, step_budget)
        self._clock_ns = clock_ns
        self._seeds = iter(seeds) if seeds is not None else iter(range(1, 1 << 62))
        self.next_index = 1
        self.entries: list[sm.Entry] = []  # every entry applied, in order (what a log would hold)

    def apply(self, entry: sm.Entry) -> list[sm.Applied] | None:
        """Apply one entry (as a follower would, from the log)."""
        self.entries.append(entry)
        self.next_index = max(self.next_index, entry.index + 1)
        group = sm.apply(self.ops, [entry])
        outcome = group.outcomes[0]
        return None if outcome is None else list(outcome)

    def applied_index(self) -> int:
        return sm.applied_index(self.ops)

    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome:
        write = stamp_write(
            DbRequest(request.statements, Flags(transaction=request.transaction)),
            time_ns=self._clock_ns(),
            seed=next(self._seeds),
        )
        command = sm.Command(write, unified=request.unified, client=client, request_id=request.request_id)
        outcomes = self.apply(sm.Entry(self.next_index, (command,)))
        assert outcomes is not None
        (applied,) = outcomes
        return WriteOutcome(applied.results, 0, applied.index, applied.duplicate)

    async def read(self, request: DbRequest, level: Level, client: str) -> list[res.StatementResult]:
        return [run_statement(self.conn, sm.Mode.QUERY, s, self.ops) for s in request.statements]
