"""Polling with a deadline: tests wait for a condition, never for a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline; the message says what was awaited and the last state."""


def _polls(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float,
    what: str,
    describe: Callable[[], object] | None,
) -> Generator[float, None, T]:
    """The polling both waits share: yields the seconds to sleep before the next try (the caller sleeps
    them, blocking or on the loop), returns the predicate's truthy value, raises WaitTimeout at the deadline
    (the predicate tried once more there), bounded in count as well as in time."""
    if timeout_s <= 0 or interval_s <= 0:
        raise ValueError("timeout_s and interval_s must be positive")
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 2):
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        yield min(interval_s, remaining)
    value = predicate()
    if value:
        return value
    detail = "" if describe is None else f"; last state: {describe()}"
    raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}{detail}")


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
    polls = _polls(predicate, timeout_s, interval_s, what, describe)
    try:
        while True:
            time.sleep(next(polls))
    except StopIteration as done:
        return done.value


async def until(
    predicate: Callable[[], T], what: str = "condition", timeout_s: float = 10.0, interval_s: float = 0.005
) -> T:
    """:func:`wait_until` for a test on the event loop: the loop runs other tasks (and the done callbacks of
    other threads' work) between polls. Returns the predicate's truthy value; raises WaitTimeout naming
    ``what`` after ``timeout_s`` (the predicate is tried once more at the deadline), bounded in count too."""
    polls = _polls(predicate, timeout_s, interval_s, what, None)
    try:
        while True:  # noqa: ASYNC110 - polling is the point: the awaited conditions have no event to set
            await asyncio.sleep(next(polls))
    except StopIteration as done:
        return done.value
