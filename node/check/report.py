"""Waiting for convergence, and one report per run: every checker's verdict in a JSON-ready dict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from node.check import checkers
from node.check.checkers import Isolation
from node.check.history import Op
from node.check.workload import Client


async def converge(
    client: Client, urls: Sequence[str], table: str, deadline_s: float, interval_s: float = 0.25
) -> tuple[dict[str, Any], float | None]:
    """Poll every node's own copy until all answer with identical contents (or the deadline passes).

    Returns the last contents seen per URL (None for a node that did not answer) and the seconds it took to
    converge, or None if the nodes were still different (or unreachable) at the deadline.
    """
    start = time.monotonic()
    contents: dict[str, Any] = {}
    while True:
        answers = await asyncio.gather(*(client.contents(url, table) for url in urls))
        contents = dict(zip(urls, answers, strict=True))
        if all(a is not None for a in answers) and checkers.check_convergence(contents).identical:
            return contents, time.monotonic() - start
        if time.monotonic() - start > deadline_s:
            return contents, None
        await asyncio.sleep(interval_s)


def judge(
    ops: Sequence[Op],
    contents: Mapping[str, Any],
    *,
    initial: Mapping[str, Any],
    converge_s: float | None,
    fault_start: float | None = None,
    fault_end: float | None = None,
    isolations: Iterable[Isolation] = (),
    search_budget: int = checkers.DEFAULT_SEARCH_BUDGET,
) -> dict[str, Any]:
    """Every verdict of one run. ``valid`` is True only when no checker found a violation."""
    counts = {o: sum(1 for op in ops if op.outcome == o) for o in ("ok", "failed", "unknown")}
    lost: set[Any] = set()
    unexpected: set[Any] = set()
    failed_present: set[Any] = set()
    recovered: set[Any] = set()
    for picture in contents.values():
        if picture is None:
            continue
        verdict = checkers.check_set(ops, picture["set"])
        lost |= set(verdict.lost)
        unexpected |= set(verdict.unexpected)
        failed_present |= set(verdict.failed_present)
        recovered |= set(verdict.recovered)
    registers = checkers.check_registers(ops, initial, search_budget)
    linearizable: bool | None = True
    for r in registers:
        if r.linearizable is False:
            linearizable = False
        elif r.linearizable is None and linearizable is True:
            linearizable = None
    epochs = checkers.check_epochs(ops)
    isolated = checkers.check_isolated_acks(ops, isolations)
    converged = converge_s is not None
    report: dict[str, Any] = {
        "operations": counts,
        "set": {
            "acknowledged": sum(1 for op in ops if op.f == "add" and op.outcome == "ok"),
            "lost": sorted(lost),
            "unexpected": sorted(unexpected),
            "failed_present": sorted(failed_present),
            "recovered": len(recovered),
        },
        "linearizable": linearizable,
        "registers": {
            r.key: {
                "linearizable": r.linearizable,
                "operations": r.operations,
                "steps": r.steps,
                **({"blocked_by": r.blocked_by} if r.linearizable is False else {}),
            }
            for r in registers
        },
        "converged": converged,
        "converge_s": None if converge_s is None else round(converge_s, 3),
        "epochs": {
            "count": epochs.epochs,
            "two_leaders": [list(x) for x in epochs.two_leaders],
            "changed_entries": [list(x) for x in epochs.changed_entries],
            "unnamed": epochs.unnamed,
        },
        "isolated_acks": list(isolated),
    }
    if fault_start is not None:
        until = (
            fault_end
            if fault_end is not None
            else max((op.end or op.start for op in ops), default=fault_start)
        )
        a = checkers.availability(ops, fault_start, max(until, fault_start))
        report["first_write_after_fault_s"] = None if a.first_write_s is None else round(a.first_write_s, 3)
        report["longest_write_gap_s"] = round(a.longest_gap_s, 3)
    report["valid"] = bool(
        not lost
        and not unexpected
        and not failed_present
        and linearizable is True
        and converged
        and epochs.valid
        and not isolated
    )
    return report


COLUMNS = (
    ("fault", 22),
    ("ok", 6),
    ("failed", 6),
    ("unknown", 7),
    ("lost", 4),
    ("unexp", 5),
    ("linear", 6),
    ("same", 4),
    ("1st write s", 11),
    ("max gap s", 9),
    ("converge s", 10),
)


def table(rows: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    """The per-fault summary as fixed-width text (the JSON report holds the details)."""
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS)]
    for fault, r in rows:
        ops = r["operations"]
        cells = (
            fault,
            ops["ok"],
            ops["failed"],
            ops["unknown"],
            len(r["set"]["lost"]),
            len(r["set"]["unexpected"]),
            {True: "yes", False: "NO", None: "?"}[r["linearizable"]],
            "yes" if r["converged"] else "NO",
            _num(r.get("first_write_after_fault_s")),
            _num(r.get("longest_write_gap_s")),
            _num(r["converge_s"]),
        )
        lines.append("  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"
