"""Pure judges of a recorded history (``node.check.history``): no I/O, no clock, deterministic.

Each checker answers one question a user of a replicated database cares about and returns a frozen verdict
that says *which* operations break the promise, so a failing run points at evidence, not at a boolean:

* :func:`check_set` — unique inserts: **lost** (acknowledged, absent), **unexpected** (present, never sent),
  **failed_present** (definitely refused, yet present) and, for information, **recovered** (outcome unknown,
  present). Lost, unexpected and failed_present are violations.
* :func:`check_register` — linearizability of one register's history: a Wing & Gong search with Lowe's
  memoisation (the algorithm of Knossos' and Porcupine's checkers), on a doubly linked event list with
  "dancing links" for O(1) lift/unlift. An operation of unknown outcome may take effect at any moment after
  its start, or never; a definitely failed one never takes effect. The search is exponential in the worst
  case, so it has a step budget and answers ``None`` (undecided) rather than run forever.
* :func:`check_convergence` — every node holds identical tables after healing.
* :func:`check_epochs` — at most one node acknowledged writes in any epoch, and no log index was
  acknowledged under two epochs (a committed entry never changes).
* :func:`check_isolated_acks` — no write that started after a node was cut off from the majority was
  acknowledged by that node before the cut healed (it could not have reached a majority).
* :func:`availability` — time to the first successful write after a fault and the longest gap without one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from node.check.history import Op

WRITE_KINDS = ("add", "write", "cas")
DEFAULT_SEARCH_BUDGET = 2_000_000


# ----------------------------------------------------------------------------------------------- sets


@dataclasses.dataclass(frozen=True, slots=True)
class SetVerdict:
    attempted: int
    ok: int
    failed: int
    unknown: int
    lost: tuple[Any, ...]
    unexpected: tuple[Any, ...]
    failed_present: tuple[Any, ...]
    recovered: tuple[Any, ...]

    @property
    def valid(self) -> bool:
        return not (self.lost or self.unexpected or self.failed_present)


def check_set(ops: Iterable[Op], final: Iterable[Any]) -> SetVerdict:
    """Judge the ``add`` operations of a history against the set finally read from one node."""
    adds = [op for op in ops if op.f == "add"]
    present = set(final)
    by_outcome: dict[str, set[Any]] = {"ok": set(), "failed": set(), "unknown": set()}
    for op in adds:
        by_outcome[op.outcome].add(op.value)
    attempted = by_outcome["ok"] | by_outcome["failed"] | by_outcome["unknown"]
    return SetVerdict(
        attempted=len(adds),
        ok=len(by_outcome["ok"]),
        failed=len(by_outcome["failed"]),
        unknown=len(by_outcome["unknown"]),
        lost=_sorted(by_outcome["ok"] - present),
        unexpected=_sorted(present - attempted),
        # A value both refused once and acknowledged on a retry is not a violation: it was sent again.
        failed_present=_sorted((by_outcome["failed"] - by_outcome["ok"] - by_outcome["unknown"]) & present),
        recovered=_sorted((by_outcome["unknown"] - by_outcome["ok"]) & present),
    )


def _sorted(values: set[Any]) -> tuple[Any, ...]:
    return tuple(sorted(values, key=repr))


# ------------------------------------------------------------------------------------------ registers


@dataclasses.dataclass(frozen=True, slots=True)
class RegisterVerdict:
    key: str
    linearizable: bool | None  # None: the search budget ran out before a verdict
    operations: int  # operations that constrain the search (failed ones and unknown reads are left out)
    steps: int
    order: tuple[int, ...] = ()  # a witness: op ids in a valid linearization order (when linearizable)
    blocked_by: int | None = None  # when not: the op whose completion no explored order could reach
    longest_prefix: tuple[int, ...] = ()  # when not: the longest linearizable prefix the search found


_INVALID = object()


def register_step(state: Any, op: Op) -> Any:
    """The register model: the state after ``op`` or ``_INVALID`` if ``op`` cannot happen in ``state``."""
    if op.f == "read":
        return state if op.result == state else _INVALID
    if op.f == "write":
        return op.value
    old, new = op.value
    if op.outcome == "unknown":  # it happened, so it compared; both branches are possible
        return new if state == old else state
    if op.result:
        return new if state == old else _INVALID
    return state if state != old else _INVALID


def _constrains(op: Op) -> bool:
    if op.outcome == "failed":
        return False  # a definite failure had no effect and reported nothing
    if op.outcome == "unknown" and op.f == "read":
        return False  # no effect, no observation
    return op.f in ("read", "write", "cas")


def check_register(
    key: str, ops: Sequence[Op], initial: Any = None, budget: int = DEFAULT_SEARCH_BUDGET
) -> RegisterVerdict:
    """Is there a total order of ``ops`` that respects real time and the register's semantics?

    Real time: ``a`` must precede ``b`` only if ``a`` ended strictly before ``b`` started (equal times count
    as concurrent, which can only make the checker more lenient, never accuse a correct system).
    """
    chosen = [op for op in ops if _constrains(op)]
    n = len(chosen)
    # Events sorted by time; at equal times calls come first (concurrency, see above).
    events = sorted(
        [(op.start, 0, i) for i, op in enumerate(chosen)]
        + [(op.end if op.end is not None else math.inf, 1, i) for i, op in enumerate(chosen)]
    )
    size = 2 * n + 1  # node 0 is the list head
    nxt = list(range(1, size + 1))
    nxt[-1] = -1
    prv = list(range(-1, size - 1))
    is_call = [False] * size
    op_of = [0] * size
    match = [0] * size
    call_node = [0] * n
    ret_node = [0] * n
    for position, (_t, kind, i) in enumerate(events, start=1):
        op_of[position] = i
        if kind == 0:
            is_call[position] = True
            call_node[i] = position
        else:
            ret_node[i] = position
    for i in range(n):
        match[call_node[i]] = ret_node[i]

    def lift(c: int) -> None:
        for x in (c, match[c]):
            nxt[prv[x]] = nxt[x]
            if nxt[x] != -1:
                prv[nxt[x]] = prv[x]

    def unlift(c: int) -> None:
        for x in (match[c], c):
            nxt[prv[x]] = x
            if nxt[x] != -1:
                prv[nxt[x]] = x

    state = initial
    linearized = 0
    seen: set[tuple[int, Any]] = set()
    calls: list[tuple[int, Any]] = []
    longest: tuple[int, ...] = ()
    blocked: int | None = None
    entry = nxt[0]
    steps = 0
    while nxt[0] != -1:
        steps += 1
        if steps > budget:
            return RegisterVerdict(key, None, n, steps)
        if is_call[entry]:
            op = chosen[op_of[entry]]
            after = register_step(state, op)
            if after is not _INVALID:
                mark = linearized | (1 << op_of[entry])
                if (mark, after) not in seen:
                    seen.add((mark, after))
                    calls.append((entry, state))
                    state, linearized = after, mark
                    lift(entry)
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
            continue
        op = chosen[op_of[entry]]
        if op.end is None:
            # Only operations of unknown outcome remain (their returns sort last): leave them out.
            break
        if blocked is None or len(calls) > len(longest):
            longest = tuple(chosen[op_of[c]].id for c, _ in calls)
            blocked = op.id
        if not calls:
            return RegisterVerdict(key, False, n, steps, blocked_by=blocked, longest_prefix=longest)
        entry, state = calls.pop()
        linearized &= ~(1 << op_of[entry])
        unlift(entry)
        entry = nxt[entry]
    return RegisterVerdict(key, True, n, steps, order=tuple(chosen[op_of[c]].id for c, _ in calls))


def check_registers(
    ops: Iterable[Op], initial: Mapping[str, Any], budget: int = DEFAULT_SEARCH_BUDGET
) -> list[RegisterVerdict]:
    """Every register judged alone (linearizability is compositional)."""
    groups: dict[str, list[Op]] = {}
    for op in ops:
        if op.f in ("read", "write", "cas") and op.key is not None:
            groups.setdefault(op.key, []).append(op)
    return [check_register(k, groups[k], initial.get(k), budget) for k in sorted(groups)]


# ------------------------------------------------------------------------------------------ the rest


@dataclasses.dataclass(frozen=True, slots=True)
class ConvergenceVerdict:
    identical: bool
    groups: tuple[tuple[str, ...], ...]  # nodes grouped by identical contents, largest group first


def check_convergence(contents: Mapping[str, Any]) -> ConvergenceVerdict:
    """``contents`` maps a node to a comparable picture of its tables (e.g. sorted rows or a digest)."""
    groups: dict[Any, list[str]] = {}
    for node, picture in contents.items():
        groups.setdefault(_freeze(picture), []).append(node)
    ordered = sorted((tuple(sorted(g)) for g in groups.values()), key=lambda g: (-len(g), g))
    return ConvergenceVerdict(len(ordered) <= 1, tuple(ordered))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class EpochVerdict:
    epochs: int
    two_leaders: tuple[tuple[int, tuple[str, ...]], ...]  # (epoch, nodes that acknowledged writes in it)
    changed_entries: tuple[tuple[int, tuple[int, ...]], ...]  # (index, epochs it was acknowledged under)
    unnamed: int  # acknowledged writes whose answer did not name (node, epoch): cannot be judged

    @property
    def valid(self) -> bool:
        return not (self.two_leaders or self.changed_entries)


def check_epochs(ops: Iterable[Op]) -> EpochVerdict:
    leaders: dict[int, set[str]] = {}
    indexes: dict[int, set[int]] = {}
    unnamed = 0
    for op in ops:
        if op.outcome != "ok" or op.f not in WRITE_KINDS:
            continue
        if op.epoch is None or op.executed_by is None:
            unnamed += 1
            continue
        leaders.setdefault(op.epoch, set()).add(op.executed_by)
        if op.index is not None:
            indexes.setdefault(op.index, set()).add(op.epoch)
    return EpochVerdict(
        epochs=len(leaders),
        two_leaders=tuple((e, tuple(sorted(n))) for e, n in sorted(leaders.items()) if len(n) > 1),
        changed_entries=tuple((i, tuple(sorted(e))) for i, e in sorted(indexes.items()) if len(e) > 1),
        unnamed=unnamed,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Isolation:
    """``node`` (as named in ``executed_by``) could reach no majority of voters from ``start`` to ``end``."""

    node: str
    start: float
    end: float


def check_isolated_acks(ops: Iterable[Op], isolations: Iterable[Isolation]) -> tuple[int, ...]:
    """Ids of writes acknowledged by a node that was cut off for their whole duration: each is a violation."""
    cuts = list(isolations)
    bad = []
    for op in ops:
        if op.outcome != "ok" or op.f not in WRITE_KINDS or op.executed_by is None or op.end is None:
            continue
        for cut in cuts:
            if op.executed_by == cut.node and op.start >= cut.start and op.end <= cut.end:
                bad.append(op.id)
                break
    return tuple(sorted(bad))


@dataclasses.dataclass(frozen=True, slots=True)
class Availability:
    first_write_s: float | None  # from ``since`` to the end of the first acknowledged write started after it
    # Longest stretch in [since, until] without an acknowledged write ending, while writes were tried: a
    # workload that stopped issuing (its operation cap reached) before ``until`` is not a gap after that.
    longest_gap_s: float


def availability(ops: Iterable[Op], since: float, until: float) -> Availability:
    ops = list(ops)
    writes = [op for op in ops if op.outcome == "ok" and op.f in WRITE_KINDS and op.end is not None]
    after = [op.end for op in writes if op.start >= since and op.end is not None]
    first = (min(after) - since) if after else None
    last_try = max((op.end or op.start for op in ops if op.f in WRITE_KINDS), default=until)
    until = max(since, min(until, last_try))
    ends = sorted(op.end for op in writes if op.end is not None and since <= op.end <= until)
    marks = [since, *ends, until]
    gap = max((b - a for a, b in zip(marks, marks[1:], strict=False)), default=0.0)
    return Availability(first, gap)
