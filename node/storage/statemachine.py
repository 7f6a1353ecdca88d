"""The state machine: apply log entries of write commands to SQLite, each entry exactly once.

``apply`` takes entries ``(index, commands)`` in log order and runs them in ONE SQLite transaction (group
apply: many clients' commands share one commit, hence one fsync), and records the highest applied index in
the same transaction (table ``_talentnest_state``). So after a crash either the entry's effects and its
index are both stored or neither is, and an entry whose index is at or below the recorded one is skipped
(its result is ``None``): applying twice is impossible, whatever replays it.

Inside the transaction every command has a savepoint, and so does every statement of a command without the
``transaction`` flag (the first one's is its command's: nothing runs between them), so one client's failing
statement never undoes another client's work:

* a command with ``transaction``: its statements run until the first error; on an error (or when a deferred
  foreign key is still violated at its end, which a COMMIT would have refused) the command's savepoint is
  rolled back and each of its statements answers "rolled back"/"not run", as rqlite does for a transaction;
* a command without: each statement is on its own, as if it committed by itself; a deferred foreign key
  left violated by the statement fails it ("FOREIGN KEY constraint failed", what its own COMMIT would say).

Some errors make SQLite roll back the whole transaction, not just a statement: an interrupt (the write step
budget, counted by the progress handler), ``INSERT OR ROLLBACK``/``RAISE(ROLLBACK)``, a full disk or an I/O
error. Then the whole group is run again from the start with that statement's outcome fixed in advance
(it is not executed again): the commands before it are deterministic (same seed, same time, same data), so
they give the same results, and the statement's own outcome is the one it had. At most one retry per
statement of the group, so the loop is bounded. Only a shutdown interrupts a write by the clock: the whole
group then fails (503) and its index is NOT recorded.

Results are raw (:mod:`node.storage.results`); the HTTP layer renders them.

**Request IDs (at-most-once).** A command may carry the client (a hash of its credential) and a request ID.
The first command with that pair is applied and its results are stored in ``_talentnest_requests`` in the
same transaction; a later command with the same pair (a retry after an unknown outcome, or a concurrent
duplicate) is not applied again and answers the stored results, with the index that applied it. A command
whose statements differ from the stored one answers an error per statement instead. What is kept is
bounded by count, not by time (replicas must agree without clocks): the last ``REQUEST_ID_WINDOW`` IDs in
apply order. Results larger than ``MAX_KEPT_RESULT_BYTES`` are kept without their rows.

**Durability: the synchronous switch.** ``SYNCHRONOUS`` is the one place that decides how SQLite syncs
applied entries. The log (:mod:`node.storage.log`) is the durable record of every write: an entry is
appended and fsynced there before it is applied, and no client is answered before that fsync returned
(:mod:`node.service`). So applying uses ``NORMAL``: a COMMIT in WAL mode does not fsync (the WAL is synced
at checkpoints), and a power loss or kernel crash may lose the last applied transactions. That is safe
because the applied index is stored in the same transaction as the entry's effects: SQLite keeps both or
neither, never one without the other; at the next start the node re-applies every log entry past the stored
applied index (the replay in :mod:`node.service`), and entries at or below it are skipped, so nothing is
lost and nothing is applied twice. (A killed process loses nothing at all: the OS page cache survives it.)
The exceptions are loads (/db/load), which the log records only as a marker it cannot replay: their COMMIT
is synced with ``FULL`` whatever this switch says (see :mod:`node.storage.sqlite`).

**Replicated loads.** With replication a /db/load of an SQL dump is a run of log entries like any write:
:class:`LoadChunk` commands stage whole statements in ``_talentnest_loads`` (in their entry's transaction,
so a crash or a replay stages them again or not at all), and one :class:`LoadEnd` command runs all of them
under its savepoint, checked against the chunk count and digest the leader shipped: one result for the
whole dump, applied all or nothing, at the same index on every replica. A deterministic failure (a
statement's error, foreign keys left violated) is the result and the end's index is still applied; a full
disk or an I/O error raises, never becomes a result (another replica would not share it).

**SQLite versions.** A replicated command names the SQLite the leader ran; a group holding a command of
another version is refused before anything runs (:func:`foreign_version`), so a replica never executes a
write under another engine than the leader's.

Internal tables (``_talentnest_*``) are created by the first write, so an empty database stays empty. User
SQL cannot read or change them (the authorizer refuses it); a dump that contains them has those
statements skipped on load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from node.core.sqlreq import Statement, WriteCommand
from node.storage import results as r

# How SQLite syncs each applied entry's commit. NORMAL: the log is the durable record (see the docstring).
SYNCHRONOUS = "NORMAL"
# Request IDs remembered, in apply order (older ones are forgotten: a retry later than that applies again).
REQUEST_ID_WINDOW = 10_000
# Encoded results kept per request ID; beyond it rows are dropped (the statement answers an explanation).
MAX_KEPT_RESULT_BYTES = 64 << 10
# Longest request ID accepted.
MAX_REQUEST_ID_CHARS = 128

INTERNAL_PREFIX = "_talentnest_"
STATE_TABLE = INTERNAL_PREFIX + "state"
REQUESTS_TABLE = INTERNAL_PREFIX + "requests"
LOADS_TABLE = INTERNAL_PREFIX + "loads"  # chunks of a replicated /db/load not yet ended (see LoadChunk)
APPLIED_KEY = "applied_index"
REQUESTS_SEQ_INDEX = REQUESTS_TABLE + "_seq"
# (name, statement) of every internal object; an apply looks the names up once to skip the statements.
_SCHEMA_OBJECTS = (
    (STATE_TABLE, f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (key TEXT PRIMARY KEY, value INTEGER NOT NULL) "
     "WITHOUT ROWID"),
    (REQUESTS_TABLE, f"CREATE TABLE IF NOT EXISTS {REQUESTS_TABLE} (client TEXT NOT NULL, "
     "request_id TEXT NOT NULL, idx INTEGER NOT NULL, seq INTEGER NOT NULL, digest BLOB NOT NULL, "
     "results BLOB NOT NULL, PRIMARY KEY (client, request_id)) WITHOUT ROWID"),
    (REQUESTS_SEQ_INDEX, f"CREATE INDEX IF NOT EXISTS {REQUESTS_SEQ_INDEX} ON {REQUESTS_TABLE}(seq)"),
    (LOADS_TABLE, f"CREATE TABLE IF NOT EXISTS {LOADS_TABLE} (load_id TEXT NOT NULL, seq INTEGER NOT NULL, "
     "data BLOB NOT NULL, PRIMARY KEY (load_id, seq)) WITHOUT ROWID"),
)  # fmt: skip
# WITHOUT ROWID: writing them never moves last_insert_rowid, which clients see.
SCHEMA = tuple(sql for _, sql in _SCHEMA_OBJECTS)


class Mode:
    EXECUTE = "execute"  # /db/execute: every statement answers as a write
    REQUEST = "request"  # /db/request: row-returning statements answer with rows
    QUERY = "query"  # /db/query: read-only, rows


@dataclass(frozen=True, slots=True)
class LoadChunk:
    """Part of a replicated SQL dump (/db/load): whole statements, stamped once by the leader.

    Applying it only stages it (``LOADS_TABLE``, in the entry's own transaction, so replay and crashes need
    no other bookkeeping) and advances the applied index: nothing of the dump is visible before its
    :class:`LoadEnd` runs every chunk at once. The first chunk of a load drops whatever an unfinished
    earlier load left staged (its end never committed: a leader change or a crash), so stale chunks never
    pile up, and every replica drops the same ones at the same index.
    """

    load_id: str
    seq: int
    statements: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LoadEnd:
    """The end of a replicated load: its staged chunks run, in ``seq`` order, as one all-or-nothing part of
    the entry's transaction, provided they are exactly the ones the leader shipped (``chunks`` of them,
    whose statements hash to ``digest``, see :class:`LoadDigest`); otherwise the load fails and nothing of
    it is applied. ``abort``: the leader gave up shipping; only what was staged is dropped."""

    load_id: str
    chunks: int
    statements: int
    digest: str
    abort: bool = False


@dataclass(frozen=True, slots=True)
class LoadFile:
    """A replicated /db/load of an SQLite *file*: the whole database is replaced by the staged file whose
    SHA-256 is ``sha256`` (``size_bytes`` long), stamped with the entry's index (see
    :mod:`node.replication.staged_loads`). Never run by :func:`apply`: the Replicator applies it alone
    (a barrier between two runs of ordinary entries), by swapping the file in."""

    sha256: str
    size_bytes: int


class LoadDigest:
    """SHA-256 over a load's statements in order (each length-prefixed, so boundaries are part of it)."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, statements: Sequence[str]) -> None:
        for sql in statements:
            data = sql.encode("utf-8", "surrogatepass")
            self._h.update(len(data).to_bytes(8, "big"))
            self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass(frozen=True, slots=True)
class Command:
    """One client's write as a log entry carries it: the stamped statements and who asked, under which ID.

    ``sqlite_version``: the SQLite the leader ran when it stamped the command (None: an entry of a release
    that did not record it); a replica running another one refuses to apply it (``foreign_version``).
    ``load``: a part of a replicated /db/load instead of statements (``write`` then only carries the time
    and seed its statements see).
    """

    write: WriteCommand
    unified: bool = False  # /db/request rather than /db/execute
    client: str = ""
    request_id: str | None = None
    sqlite_version: str | None = None
    load: LoadChunk | LoadEnd | LoadFile | None = None

    @property
    def mode(self) -> str:
        return Mode.REQUEST if self.unified else Mode.EXECUTE


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    commands: tuple[Command, ...]


@dataclass(frozen=True, slots=True)
class Applied:
    """A command's outcome: its results and the index that applied it (an earlier one for a duplicate)."""

    results: tuple[r.StatementResult, ...]
    index: int
    duplicate: bool = False
    # False: the group's COMMIT failed, so nothing of this command is stored and ``index`` committed
    # nothing; the answer must not name it as the index of a stored write (no X-TalentNest-Index).
    committed: bool = True


@dataclass(frozen=True, slots=True)
class Fixed:
    """A statement's outcome fixed after it made SQLite drop the whole transaction (see the docstring)."""

    result: r.StatementResult
    stops: bool  # the rest of its command does not run (the step budget was exceeded)


class Ops(Protocol):
    """What applying needs from the write connection (implemented by the database's writer thread).

    Optional: a writable ``schema_ready`` attribute, to remember that the node's own tables exist (see
    ``_schema_and_applied``).
    """

    def internal(self, sql: str, params: tuple = ()) -> list[tuple]: ...
    def message(self, exc: BaseException) -> str: ...
    def in_transaction(self) -> bool: ...
    def deferred_fk_pending(self) -> bool: ...
    def start_command(self, write: WriteCommand) -> None: ...
    def over_budget(self) -> bool: ...
    def run(self, mode: str, statement: Statement) -> r.StatementResult: ...
    def run_load_statement(self, sql: str) -> tuple[bool, str | None]: ...


def digest(command: Command) -> bytes:
    """What a request ID stands for: the same ID with other statements is another request (refused)."""
    h = hashlib.sha256()
    h.update(b"t" if command.write.transaction else b"f")
    h.update(b"u" if command.unified else b"e")
    for statement in command.write.statements:
        h.update(statement.sql.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(repr(statement.params if not hasattr(statement.params, "items") else sorted(
            statement.params.items())).encode("utf-8", "surrogatepass"))  # fmt: skip
        h.update(b"\x01")
    if isinstance(command.load, LoadEnd):
        # A load's request stands for the dump it ran: the same ID with another dump is another request.
        h.update(b"load\x00" + command.load.digest.encode("ascii"))
    elif isinstance(command.load, LoadFile):
        # A file load's request stands for the file: the same ID with another file is another request.
        h.update(b"file\x00" + command.load.sha256.encode("ascii"))
    return h.digest()


def foreign_version(commands: Sequence[Command], mine: str) -> str | None:
    """The first SQLite version other than ``mine`` a command was stamped under (None: all may apply).

    Replaying a write under another SQLite may give other results (query plans, functions, collations
    change between releases), so a replica never applies one: it waits until it runs the same version.
    """
    for command in commands:
        if command.sqlite_version is not None and command.sqlite_version != mine:
            return command.sqlite_version
    return None


def applied_index(ops: Ops) -> int:
    tables = ops.internal("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (STATE_TABLE,))
    if not tables:
        return 0
    rows = ops.internal(f"SELECT value FROM {STATE_TABLE} WHERE key = ?", (APPLIED_KEY,))
    return int(rows[0][0]) if rows else 0


def ensure_schema(ops: Ops) -> None:
    for sql in SCHEMA:
        ops.internal(sql)


# When every object SCHEMA creates is there (every apply but a database's first), one lookup of their names
# replaces SCHEMA's statements and the applied index's own table check.
_SCHEMA_NAMES = tuple(name for name, _ in _SCHEMA_OBJECTS)
_SCHEMA_LOOKUP = f"SELECT count(*) FROM sqlite_schema WHERE name IN ({', '.join('?' * len(_SCHEMA_NAMES))})"


def _schema_and_applied(ops: Ops) -> int:
    """``ensure_schema`` then ``applied_index``, in two statements instead of six when the schema is there.

    Run first in a transaction, so the lookup sees committed objects. An ``ops`` with a ``schema_ready``
    attribute remembers that it saw all of them (on its connection): nothing drops them (user SQL may not
    name them), so later applies skip the lookup, a scan of the whole schema, the dearest statement of a
    small group after its COMMIT.
    """
    if not getattr(ops, "schema_ready", False):
        if ops.internal(_SCHEMA_LOOKUP, _SCHEMA_NAMES)[0][0] != len(_SCHEMA_NAMES):
            ensure_schema(ops)
        elif hasattr(ops, "schema_ready"):
            ops.schema_ready = True  # type: ignore[attr-defined]
    rows = ops.internal(f"SELECT value FROM {STATE_TABLE} WHERE key = ?", (APPLIED_KEY,))
    return int(rows[0][0]) if rows else 0


def set_applied(ops: Ops, index: int) -> None:
    ops.internal(f"INSERT OR REPLACE INTO {STATE_TABLE}(key, value) VALUES(?, ?)", (APPLIED_KEY, index))


@dataclass(frozen=True, slots=True)
class Group:
    """What one apply did: per entry its commands' outcomes (None: already applied before, skipped)."""

    outcomes: tuple[tuple[Applied, ...] | None, ...]
    committed: bool  # False: the COMMIT failed, nothing was applied, every result says so
    commit_error: Exception | None = None


def apply(ops: Ops, entries: Sequence[Entry]) -> Group:
    """Apply ``entries`` (in log order) in one transaction.

    Entries at or below the applied index are skipped here, inside the transaction, so the check and the
    write cannot be separated. When the COMMIT itself fails nothing was applied and every statement's
    result says it was rolled back; an exception from ``ops`` (shutdown) propagates, nothing applied.
    """
    group = _run_group(ops, entries, commit=True)
    assert isinstance(group, Group)
    return group


def stage(ops: Ops, entries: Sequence[Entry]) -> tuple[tuple[Applied, ...], ...] | None:
    """Run ``entries`` as :func:`apply` would, but leave their transaction open, uncommitted: per entry its
    commands' outcomes, or None (nothing left open) unless the first entry is the one right after the
    applied index.

    A leader runs its own entries this way while their Append is on its way to the followers, and commits
    (:func:`commit_staged`) once the log has committed exactly these entries, or rolls back. The outcomes
    are the ones :func:`apply` gives the same entries: both run them on the same state (the applied index
    is checked inside the transaction), and an entry's outcome does not depend on how entries are grouped
    (see ``test_a_group_gives_each_command_what_it_would_get_alone``). Nothing of a staged group is visible
    to another connection before its COMMIT.
    """
    if not entries:
        return None
    out = _run_group(ops, entries, commit=False)
    assert not isinstance(out, Group)
    return out


def commit_staged(ops: Ops) -> None:
    """COMMIT the group :func:`stage` left open; raises (and rolls back: nothing applied) if it fails."""
    try:
        ops.internal("COMMIT")
    finally:
        if ops.in_transaction():
            ops.internal("ROLLBACK")


def _run_group(
    ops: Ops, entries: Sequence[Entry], *, commit: bool
) -> Group | tuple[tuple[Applied, ...], ...] | None:
    fixed: dict[tuple[int, int, int], Fixed] = {}
    retries: int | None = None  # counted at the first retry only: most groups never need one
    while True:
        try:
            return _attempt(ops, entries, fixed, commit=commit)
        except _Lost as lost:
            if lost.where in fixed:  # cannot happen: a fixed statement does not run again
                break
            fixed[lost.where] = lost.fixed
        if retries is None:
            retries = 1 + sum(
                len(c.write.statements) + (c.load is not None) for e in entries for c in e.commands
            )
        retries -= 1
        if retries < 0:
            break
    raise RuntimeError("the transaction was rolled back more times than it has statements")


class _Lost(Exception):
    """A statement's error rolled back the whole transaction; the group runs again with it fixed."""

    def __init__(self, where: tuple[int, int, int], fixed: Fixed) -> None:
        super().__init__()
        self.where = where
        self.fixed = fixed


def _attempt(
    ops: Ops, entries: Sequence[Entry], fixed: dict[tuple[int, int, int], Fixed], *, commit: bool
) -> Group | tuple[tuple[Applied, ...], ...] | None:
    """One try at the group; ``commit`` False: :func:`stage`'s, which leaves the transaction open on success."""
    ops.internal("BEGIN IMMEDIATE")
    keep_open = False
    try:
        applied = _schema_and_applied(ops)
        if not commit and applied != entries[0].index - 1:
            return None  # not the next entries: staging them would not give apply's outcomes
        out: list[list[Applied] | None] = []
        # The highest request-ID sequence number, read only once a command of the group names a request ID
        # (None: none did, nothing is recorded, and the window's DELETE below would find nothing new).
        seq: int | None = None
        for e, entry in enumerate(entries):
            if entry.index <= applied:
                out.append(None)
                continue
            outcomes = []
            for c, command in enumerate(entry.commands):
                if seq is None and command.request_id is not None:
                    seq = ops.internal(f"SELECT max(seq) FROM {REQUESTS_TABLE}")[0][0] or 0
                applied_one, recorded = _command(ops, command, entry.index, seq or 0, (e, c), fixed)
                if recorded:
                    assert seq is not None  # recorded only for a command with a request ID
                    seq += recorded
                outcomes.append(applied_one)
            applied = entry.index
            out.append(outcomes)
        if seq is not None and seq > REQUEST_ID_WINDOW:
            ops.internal(f"DELETE FROM {REQUESTS_TABLE} WHERE seq <= ?", (seq - REQUEST_ID_WINDOW,))
        set_applied(ops, applied)
        if not commit:
            keep_open = True
            return tuple(tuple(o) for o in out if o is not None)
        try:
            ops.internal("COMMIT")
        except Exception as exc:  # noqa: BLE001 - a failed COMMIT is every command's answer
            why = f"COMMIT failed: {ops.message(exc)}"
            failed_outcomes = tuple(
                None if entry_out is None else tuple(
                    a if a.duplicate else Applied(
                        tuple(r.rolled_back(list(a.results), len(a.results), why)), a.index, committed=False
                    )
                    for a in entry_out
                )
                for entry_out in out
            )  # fmt: skip
            return Group(failed_outcomes, False, exc)
        return Group(tuple(None if o is None else tuple(o) for o in out), True)
    finally:
        if not keep_open and ops.in_transaction():
            ops.internal("ROLLBACK")


def _command(
    ops: Ops, command: Command, index: int, seq: int, where: tuple[int, int], fixed: dict
) -> tuple[Applied, int]:
    """One command under its savepoint. Returns its outcome and how many request IDs it recorded (0/1)."""
    if isinstance(command.load, LoadFile):
        raise ValueError("a file load is applied alone by swapping the file in, never inside a group")
    if isinstance(command.load, LoadChunk):
        return _stage_chunk(ops, command.load, index), 0
    key = (command.client, command.request_id)
    want = digest(command) if command.request_id is not None else b""
    if command.request_id is not None:
        # Only the IDs inside the window as of this command: the group's end prunes the older ones, and
        # without this bound a group would still see them where a group ending just before it would not,
        # so replicas that group entries differently (a follower gathers larger runs) could disagree.
        rows = ops.internal(
            f"SELECT idx, digest, results FROM {REQUESTS_TABLE} WHERE client = ? AND request_id = ? "
            "AND seq > ?",
            (*key, seq - REQUEST_ID_WINDOW),
        )
        if rows:
            if isinstance(command.load, LoadEnd):
                _drop_staged(ops, command.load.load_id)  # a retried load: its new chunks are not needed
            idx, stored_digest, data = rows[0]
            if bytes(stored_digest) != want:
                why = f"request id {command.request_id!r} was already used for a different request"
                count = 1 if command.load is not None else len(command.write.statements)
                return Applied(tuple(r.failed(why) for _ in range(count)), idx, True), 0
            return Applied(tuple(r.decode_results(bytes(data))), idx, True), 0
    ops.internal("SAVEPOINT tn_command")
    ops.start_command(command.write)
    if isinstance(command.load, LoadEnd):
        results = _end_load(ops, command.load, where, fixed)
    elif command.write.transaction:
        results = _transaction(ops, command, where, fixed)
    else:
        results = _autocommit(ops, command, where, fixed)
    ops.internal("RELEASE tn_command")
    if isinstance(command.load, LoadEnd):
        _drop_staged(ops, command.load.load_id)
    if command.request_id is None:
        return Applied(tuple(results), index), 0
    data = r.encode_results(results)
    if len(data) > MAX_KEPT_RESULT_BYTES:
        data = r.encode_results([_without_rows(x) for x in results])
    ops.internal(  # REPLACE: a row of the same ID still there is outside the window (pruned at the group's end)
        f"INSERT OR REPLACE INTO {REQUESTS_TABLE}(client, request_id, idx, seq, digest, results) "
        "VALUES(?, ?, ?, ?, ?, ?)",
        (*key, index, seq + 1, want, data),
    )
    return Applied(tuple(results), index), 1


def _stage_chunk(ops: Ops, chunk: LoadChunk, index: int) -> Applied:
    if chunk.seq == 0:
        # A new load: chunks of an earlier one whose end never committed are dropped (same index everywhere).
        ops.internal(f"DELETE FROM {LOADS_TABLE} WHERE load_id != ?", (chunk.load_id,))
    ops.internal(
        f"INSERT OR REPLACE INTO {LOADS_TABLE}(load_id, seq, data) VALUES(?, ?, ?)",
        (chunk.load_id, chunk.seq, orjson.dumps(list(chunk.statements))),
    )
    return Applied((), index)


def _drop_staged(ops: Ops, load_id: str) -> None:
    ops.internal(f"DELETE FROM {LOADS_TABLE} WHERE load_id = ?", (load_id,))


def _end_load(ops: Ops, end: LoadEnd, where: tuple[int, int], fixed: dict) -> list[r.StatementResult]:
    """Run a load's staged statements under the command's savepoint: one result, all or nothing.

    Foreign keys are checked at the end of the load (``defer_foreign_keys``; a dump's own
    ``PRAGMA foreign_keys=OFF`` cannot apply inside the group's transaction), so a dump may insert rows in
    any order, but a dump that leaves a violation fails as a whole.
    """
    if end.abort:
        return []
    known = fixed.get((*where, 0))
    if known is not None:
        result = known.result
    else:
        ops.internal("PRAGMA defer_foreign_keys=ON")
        try:
            result = _run_load(ops, end, (*where, 0))
        finally:
            if ops.in_transaction():
                ops.internal("PRAGMA defer_foreign_keys=OFF")
    if result.error is not None:
        ops.internal("ROLLBACK TO tn_command")
    return [result]


def _run_load(ops: Ops, end: LoadEnd, where: tuple[int, int, int]) -> r.StatementResult:
    (count, low, high), = ops.internal(
        f"SELECT count(*), min(seq), max(seq) FROM {LOADS_TABLE} WHERE load_id = ?", (end.load_id,)
    )  # fmt: skip
    if count != end.chunks or (count and (low != 0 or high != count - 1)):
        # Not the dump's fault (ROLLED_BACK, not FAILED): the client is told it was not applied, to retry.
        return r.StatementResult(
            r.Status.ROLLED_BACK,
            f"load not applied: {count} of its {end.chunks} chunks are in the log (a leader change lost the "
            "others); nothing was loaded",
        )
    check = LoadDigest()
    ran = number = 0
    for seq in range(end.chunks):
        (data,), = ops.internal(
            f"SELECT data FROM {LOADS_TABLE} WHERE load_id = ? AND seq = ?", (end.load_id, seq)
        )  # fmt: skip
        statements = orjson.loads(data)
        check.update(statements)
        for sql in statements:
            number += 1
            counted, error = ops.run_load_statement(sql)
            if error is not None:
                result = r.failed(f"load failed at statement {number}: {error}; nothing was loaded")
                if not ops.in_transaction():
                    raise _Lost(where, Fixed(result, True))
                return result
            ran += counted
    if number != end.statements or check.hexdigest() != end.digest:
        return r.StatementResult(
            r.Status.ROLLED_BACK,
            "load not applied: its chunks in the log differ from the ones the leader shipped (a leader change); "
            "nothing was loaded",
        )
    if ops.deferred_fk_pending():
        return r.failed("load failed: FOREIGN KEY constraint failed; nothing was loaded")
    return r.StatementResult(rows_affected=ran)


def _without_rows(result: r.StatementResult) -> r.StatementResult:
    if result.columns is None or not result.rows:
        return result
    return r.StatementResult(
        r.Status.DONE,
        f"the write was applied once; its rows were larger than {MAX_KEPT_RESULT_BYTES} bytes and are not "
        "kept for retries",
    )


def _run(
    ops: Ops, mode: str, statement: Statement, where: tuple[int, int, int], fixed: dict
) -> tuple[r.StatementResult, bool]:
    """A statement's result and whether it stops its command (budget); raises _Lost if it lost the group."""
    known = fixed.get(where)
    if known is not None:
        return known.result, known.stops
    result = ops.run(mode, statement)
    stops = result.error is not None and ops.over_budget()
    if result.error is not None and not ops.in_transaction():
        raise _Lost(where, Fixed(result, stops))
    return result, stops


def _transaction(ops: Ops, command: Command, where: tuple[int, int], fixed: dict) -> list[r.StatementResult]:
    results: list[r.StatementResult] = []
    failure: str | None = None
    statements = command.write.statements
    for number, statement in enumerate(statements, 1):
        result, _ = _run(ops, command.mode, statement, (*where, number), fixed)
        results.append(result)
        if result.error is not None:
            # rqlite: processing stops at the first error and the transaction is rolled back whole.
            failure = f"statement {number} failed: {result.error}"
            break
    if failure is None and ops.deferred_fk_pending():
        failure = "COMMIT failed: FOREIGN KEY constraint failed"
    if failure is None:
        return results
    ops.internal("ROLLBACK TO tn_command")
    return r.rolled_back(results, len(statements), failure)


def _autocommit(ops: Ops, command: Command, where: tuple[int, int], fixed: dict) -> list[r.StatementResult]:
    results: list[r.StatementResult] = []
    stopped: str | None = None
    for number, statement in enumerate(command.write.statements, 1):
        if stopped is not None:
            results.append(r.not_run(stopped))
            continue
        # The first statement's savepoint is the command's own: nothing ran since it began, so rolling back
        # to it undoes exactly what a savepoint of the statement's would (the deferred foreign key count
        # included). One savepoint pair less per command, and a one-statement command (most writes) has one.
        first = number == 1
        if not first:
            ops.internal("SAVEPOINT tn_statement")
        result, stops = _run(ops, command.mode, statement, (*where, number), fixed)
        if result.error is None and ops.deferred_fk_pending():
            # What this statement's own COMMIT would have answered; its changes are undone below.
            result = r.failed("FOREIGN KEY constraint failed", time_s=result.time_s)
        if result.error is not None:
            ops.internal("ROLLBACK TO tn_command" if first else "ROLLBACK TO tn_statement")
        if not first:
            ops.internal("RELEASE tn_statement")
        results.append(result)
        if stops:
            stopped = result.error
    return results


def valid_request_id(text: str) -> bool:
    """1 to MAX_REQUEST_ID_CHARS printable ASCII characters (no spaces): safe to store, log and compare."""
    return 0 < len(text) <= MAX_REQUEST_ID_CHARS and all("!" <= ch <= "~" for ch in text)
