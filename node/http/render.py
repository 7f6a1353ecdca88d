"""Raw results (:mod:`node.storage.results`) to rqlite's JSON, byte for byte as rqlite clients expect it.

Shapes, per statement:

* an error: ``{"error": "..."}`` (plus ``"time"`` with ``timings`` when the statement ran);
* rows: ``{"columns": [...], "types": [...], "values": [[...]]}`` (no ``values`` when there are no rows), or
  with ``associative`` ``{"types": {col: type}, "rows": [{col: value}]}``; types are the declared types in
  lower case ("" when undeclared);
* a write: ``{"last_insert_id": n, "rows_affected": n}`` (each only when it applies); /db/request with
  ``associative`` adds ``"rows": null``.

BLOBs are standard base64 (rqlite's default) or, with ``blob_array``, arrays of byte values. Rendering is
pure and costs a pass over the rows, so the caller runs it off the event loop for large results
(:func:`cells`); rows without BLOBs in the plain shape are handed to the JSON encoder as they are.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from node.core.sqlreq import Flags
from node.storage.results import Row, StatementResult

# Results with more values than this are rendered in a thread rather than on the event loop.
INLINE_RENDER_CELLS = 2_000


def cells(results: Sequence[StatementResult]) -> int:
    """How much rendering work ``results`` are: the values that may need converting."""
    total = 0
    for result in results:  # a loop, not sum() over a generator: this runs for every write's results
        rows = result.rows
        if rows:
            total += len(rows) * max(1, len(result.columns or ()))
    return total


def render_results(results: Sequence[StatementResult], flags: Flags, *, unified: bool = False) -> list[dict]:
    return [render_one(r, flags, unified=unified) for r in results]


def render_one(result: StatementResult, flags: Flags, *, unified: bool = False) -> dict[str, Any]:
    out: dict[str, Any]
    if result.error is not None:
        out = {"error": result.error}
    elif result.columns is not None:
        out = _rows(result, flags)
    else:
        out = {}
        if result.last_insert_id is not None:
            out["last_insert_id"] = result.last_insert_id
        if result.rows_affected is not None:
            out["rows_affected"] = result.rows_affected
        if unified and flags.associative:
            out["rows"] = None
    if flags.timings and result.time_s is not None:
        out["time"] = result.time_s
    return out


def _rows(result: StatementResult, flags: Flags) -> dict[str, Any]:
    columns = list(result.columns or ())
    types = [(decltype or "").lower() for decltype in result.decltypes]
    rows: Sequence[Row] | list[list[Any]] = result.rows
    if result.has_blobs:
        rows = [_row(row, flags.blob_array) for row in result.rows]
    if flags.associative:
        return {
            "types": dict(zip(columns, types, strict=True)),
            "rows": [dict(zip(columns, r, strict=True)) for r in rows],
        }
    out: dict[str, Any] = {"columns": columns, "types": types}
    if rows:
        out["values"] = rows
    return out


def _row(row: Row, blob_array: bool) -> list[Any]:
    return [
        (list(v) if blob_array else base64.b64encode(v).decode("ascii")) if isinstance(v, bytes) else v
        for v in row
    ]
