"""The record of a workload: one immutable :class:`Op` per completed client operation.

Times are seconds on the recording process's monotonic clock (only differences and order matter). An
operation's ``outcome`` is what the client can know:

* ``ok``      — the cluster answered that it happened (a write acknowledged, a read answered);
* ``failed``  — the cluster answered that it did *not* happen (e.g. 503 ``no_quorum`` before anything was
  proposed, a 4xx): the operation must have no effect;
* ``unknown`` — no definite answer (a timeout, a dropped connection, 503 ``outcome_unknown``): it may have
  taken effect at any moment after ``start``, or never. ``end`` is then ``None``.

Kinds (``f``): ``add`` puts the unique integer ``value`` into the set; ``read``/``write`` act on the register
``key``; ``cas`` is ``UPDATE … SET v = new WHERE k = key AND v = old`` with ``value = [old, new]`` and
``result`` True/False for rows_affected 1/0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from typing import Any

OUTCOMES = ("ok", "failed", "unknown")
KINDS = ("add", "read", "write", "cas")


class HistoryError(ValueError):
    """A record that does not describe an operation: refused rather than guessed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    id: int
    process: str
    f: str
    start: float
    end: float | None
    outcome: str
    key: str | None = None
    value: Any = None
    result: Any = None
    node: str | None = None  # the URL the client sent the request to
    executed_by: str | None = None  # the node that answered it (X-TalentNest-Node), when named
    epoch: int | None = None  # the epoch that committed a write (X-TalentNest-Epoch), when named
    index: int | None = None  # the log index that committed a write (X-TalentNest-Index), when named
    error: str | None = None

    def __post_init__(self) -> None:
        if self.f not in KINDS:
            raise HistoryError(f"op {self.id}: unknown kind {self.f!r}")
        if self.outcome not in OUTCOMES:
            raise HistoryError(f"op {self.id}: unknown outcome {self.outcome!r}")
        if self.outcome == "unknown":
            if self.end is not None:
                raise HistoryError(f"op {self.id}: an unknown outcome has no end")
        elif self.end is None or self.end < self.start:
            raise HistoryError(f"op {self.id}: a definite outcome needs end >= start")
        if self.f == "cas" and not (isinstance(self.value, list | tuple) and len(self.value) == 2):
            raise HistoryError(f"op {self.id}: cas needs value [old, new]")

    def to_json(self) -> dict[str, Any]:
        # ``end`` stays even when None: it is what says "no answer came".
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "end"}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Op:
        if not isinstance(record, dict):
            raise HistoryError("a history line must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - known
        if unknown:
            raise HistoryError(f"unknown fields {sorted(unknown)}")
        try:
            value = record.get("value")
            if isinstance(value, list):
                value = tuple(value)
            return cls(**{**record, "value": value})
        except TypeError as e:
            raise HistoryError(str(e)) from None


def dump_jsonl(ops: Iterable[Op]) -> str:
    return "".join(json.dumps(op.to_json(), sort_keys=True) + "\n" for op in ops)


def load_jsonl(text: str) -> list[Op]:
    ops = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HistoryError(f"line {number}: not JSON ({e.msg})") from None
        try:
            ops.append(Op.from_json(record))
        except HistoryError as e:
            raise HistoryError(f"line {number}: {e}") from None
    return ops


def by_key(ops: Iterable[Op]) -> Iterator[tuple[str, list[Op]]]:
    """Register operations grouped by key (linearizability is compositional: each key is judged alone)."""
    groups: dict[str, list[Op]] = {}
    for op in ops:
        if op.f in ("read", "write", "cas") and op.key is not None:
            groups.setdefault(op.key, []).append(op)
    yield from sorted(groups.items())
