"""The async poll helper the tests share (tests/support/wait.py ``until``): it returns the predicate's value,
lets other tasks run between polls, and fails naming what it waited for once the deadline passed."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.wait import WaitTimeout, until


async def test_until_returns_the_value_another_task_makes_true():
    box: list[int] = []

    async def later() -> None:
        await asyncio.sleep(0.02)
        box.append(7)

    task = asyncio.create_task(later())
    assert await until(lambda: box and box[0], "the value") == 7
    await task


async def test_until_names_what_it_waited_for_when_the_deadline_passes():
    calls = 0

    def never() -> bool:
        nonlocal calls
        calls += 1
        return False

    with pytest.raises(WaitTimeout, match="waiting for the impossible"):
        await until(never, "the impossible", timeout_s=0.05, interval_s=0.01)
    assert 2 <= calls <= 0.05 / 0.01 + 3  # polled, bounded in count


@pytest.mark.parametrize("timeout_s, interval_s", [(0, 0.01), (1, 0)])
async def test_until_refuses_a_bound_that_is_not_positive(timeout_s, interval_s):
    with pytest.raises(ValueError):
        await until(lambda: True, "x", timeout_s=timeout_s, interval_s=interval_s)
