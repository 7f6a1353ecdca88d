import asyncio

import pytest

from node.runtime.mailbox import LatestCell, Mailbox, MailboxFull, Overflow
from tests.support.fakes import FakeClock, settle


async def test_reject_policy_refuses_when_full():
    box: Mailbox[int] = Mailbox("t", 2, Overflow.REJECT)
    assert box.offer(1) and box.offer(2)
    assert not box.offer(3)
    with pytest.raises(MailboxFull):
        await box.put(3)
    assert [await box.get(), await box.get()] == [1, 2]


async def test_drop_oldest_keeps_newest_and_counts():
    box: Mailbox[int] = Mailbox("t", 2, Overflow.DROP_OLDEST)
    for i in range(5):
        assert box.offer(i)
    assert box.dropped == 3
    assert [await box.get(), await box.get()] == [3, 4]


async def test_block_policy_applies_backpressure():
    box: Mailbox[int] = Mailbox("t", 1, Overflow.BLOCK)
    await box.put(1)
    second = asyncio.create_task(box.put(2))
    await settle()
    assert not second.done(), "put on a full BLOCK mailbox must wait"
    assert await box.get() == 1
    await asyncio.wait_for(second, 1)
    assert await box.get() == 2


async def test_latest_cell_skips_to_newest():
    cell: LatestCell[int] = LatestCell()
    for i in range(10):
        cell.publish(i)
    version, value = await cell.wait_newer(0)
    assert (version, value) == (10, 9)
    waiter = asyncio.create_task(cell.wait_newer(version))
    await settle()
    assert not waiter.done()
    cell.publish(42)
    assert await asyncio.wait_for(waiter, 1) == (11, 42)


async def test_fake_clock_wakes_sleepers_in_order():
    clock = FakeClock(0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, dt: float) -> None:
        await clock.sleep(dt)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper(n, dt)) for n, dt in (("b", 2.0), ("a", 1.0), ("c", 5.0))]
    await clock.advance(3.0)
    assert woke == [("a", 1.0), ("b", 2.0)]
    assert clock.now() == 3.0
    await clock.advance(2.0)
    assert woke[-1] == ("c", 5.0)
    await asyncio.gather(*tasks)
