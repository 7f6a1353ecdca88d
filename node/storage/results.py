"""Raw results: what running a statement produced, as plain values, before any rendering.

Storage answers with these; ``node.http.render`` turns them into rqlite's JSON (base64 or byte arrays,
associative rows, timings, pretty printing). Keeping the two apart lets the same results travel further:
with replication the node that applies a write is not always the node that answers the client, a client's
request ID keeps its results in the database (:func:`encode_results`), and a simulation checks results
without any HTTP.

A result is one of three shapes, told apart by its fields:

* ``error`` set: the statement failed, was rolled back with its transaction, or did not run (``status``
  says which; the text already says why, in rqlite's words, and is the same on every copy);
* ``columns`` set: the statement answers with rows (a query, or a row-returning statement of /db/request);
* neither: a write, with ``rows_affected`` and ``last_insert_id`` when they apply.

Values are SQLite's: None, int, float, str and bytes (BLOBs stay bytes until rendering).
"""

from __future__ import annotations

import base64
import enum
import math
from dataclasses import dataclass
from typing import Any

import orjson

Value = None | int | float | str | bytes
Row = tuple[Value, ...]


class Status(enum.Enum):
    DONE = "done"  # ran, and its effect (if any) is stored
    FAILED = "failed"  # ran and failed; nothing of it is stored
    ROLLED_BACK = "rolled_back"  # ran, but its transaction did not commit
    NOT_RUN = "not_run"  # never ran (an earlier statement stopped the request)


@dataclass(frozen=True, slots=True)
class StatementResult:
    status: Status = Status.DONE
    error: str | None = None
    # Rows: column names, declared types as SQLite reports them (None when undeclared), the rows.
    columns: tuple[str, ...] | None = None
    decltypes: tuple[str | None, ...] = ()
    rows: tuple[Row, ...] = ()
    # True when some value in ``rows`` is bytes (rendering then converts rows; otherwise they pass as is).
    has_blobs: bool = False
    # Writes: what SQLite reports for this statement; None when it does not apply.
    rows_affected: int | None = None
    last_insert_id: int | None = None
    # Seconds the statement ran on this node (None when it did not run); shown with ``timings`` only.
    time_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def failed(error: str, *, time_s: float | None = None) -> StatementResult:
    return StatementResult(Status.FAILED, error, time_s=time_s)


def not_run(why: str) -> StatementResult:
    return StatementResult(Status.NOT_RUN, f"not run: {why}")


def rolled_back(results: list[StatementResult], total: int, why: str) -> list[StatementResult]:
    """One result per statement when a transaction did not commit: none of them claims a stored change."""
    out: list[StatementResult] = []
    for index in range(total):
        if index < len(results) and results[index].error is not None:
            error = f"{results[index].error} (the transaction was rolled back)"
            out.append(StatementResult(Status.ROLLED_BACK, error))
        elif index < len(results):
            out.append(StatementResult(Status.ROLLED_BACK, f"rolled back: {why}"))
        else:
            out.append(StatementResult(Status.NOT_RUN, f"not run: {why}; the transaction was rolled back"))
    return out


# --- keeping results in the database (request IDs) ---------------------------------------------------------

_FORMAT = 1


def _value_out(value: Value) -> Any:
    # Tagged so that what JSON cannot hold comes back exact: bytes, and SQLite's infinities (1e999).
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"f": repr(value)}
    return value


def _value_in(value: Any) -> Value:
    if isinstance(value, dict):
        return base64.b64decode(value["b"]) if "b" in value else float(value["f"])
    return value


def encode_results(results: list[StatementResult] | tuple[StatementResult, ...]) -> bytes:
    """Results as bytes, deterministic (the same results give the same bytes on every copy)."""
    items = []
    for r in results:
        items.append(
            [
                r.status.value, r.error,
                None if r.columns is None else list(r.columns), list(r.decltypes),
                [[_value_out(v) for v in row] for row in r.rows],
                r.has_blobs, r.rows_affected, r.last_insert_id, r.time_s,
            ]
        )  # fmt: skip
    return orjson.dumps([_FORMAT, items])


def decode_results(data: bytes) -> list[StatementResult]:
    version, items = orjson.loads(data)
    if version != _FORMAT:
        raise ValueError(f"unknown results format {version}")
    out = []
    for status, error, columns, decltypes, rows, has_blobs, affected, last_id, time_s in items:
        out.append(
            StatementResult(
                Status(status), error,
                None if columns is None else tuple(columns), tuple(decltypes),
                tuple(tuple(_value_in(v) for v in row) for row in rows),
                has_blobs, affected, last_id, time_s,
            )
        )  # fmt: skip
    return out
