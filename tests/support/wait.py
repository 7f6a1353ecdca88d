"""Polling with a deadline: tests wait for a condition, never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline; the message says what was awaited and the last state."""


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.05,
    *,
    what: str = "condition",
    describe: Callable[[], object] | None = None,
) -> T:
    """Call ``predicate`` every ``interval_s`` until it returns a truthy value; return that value.

    Raises WaitTimeout after ``timeout_s`` (the predicate is always tried once more at the deadline), naming
    ``what`` and, if given, the state ``describe()`` reports, so a failure says what the system looked like.
    Exceptions from the predicate propagate: a predicate that can fail transiently must catch its own.
    """
    if timeout_s <= 0 or interval_s <= 0:
        raise ValueError("timeout_s and interval_s must be positive")
    deadline = time.monotonic() + timeout_s
    max_polls = int(timeout_s / interval_s) + 2  # bounded in count as well as in time
    for _ in range(max_polls):
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval_s, remaining))
    value = predicate()
    if value:
        return value
    detail = "" if describe is None else f"; last state: {describe()}"
    raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
