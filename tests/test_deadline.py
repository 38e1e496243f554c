"""clawbus.deadline.DeadlineWaiter: wake-ups, deadlines, and one timer per stream."""

from __future__ import annotations

import asyncio

from clawbus.deadline import DeadlineWaiter


async def test_wake_ends_the_wait_with_true() -> None:
    waiter = DeadlineWaiter()
    task = asyncio.create_task(waiter.wait(waiter.time() + 60))
    await asyncio.sleep(0)
    assert waiter.waiting
    waiter.wake()
    assert await task is True
    assert not waiter.waiting
    waiter.close()


async def test_a_passed_deadline_ends_the_wait_with_false() -> None:
    waiter = DeadlineWaiter()
    assert await waiter.wait(waiter.time() - 1) is False  # already passed: no wait
    assert await waiter.wait(waiter.time() + 0.01) is False


async def test_wake_without_a_waiter_is_a_no_op() -> None:
    waiter = DeadlineWaiter()
    waiter.wake()
    assert await waiter.wait(waiter.time() + 0.01) is False


async def test_postponed_deadline_is_honoured_by_the_same_timer() -> None:
    loop = asyncio.get_running_loop()
    waiter = DeadlineWaiter()
    start = waiter.time()
    task = asyncio.create_task(waiter.wait(start + 0.02))
    await asyncio.sleep(0)
    waiter.postpone(start + 0.06)
    waiter.postpone(start + 0.03)  # earlier: ignored
    assert await task is False
    assert loop.time() >= start + 0.06


async def test_the_timer_is_kept_across_waits_and_re_armed_only_when_it_fires() -> None:
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    real_call_at = loop.call_at

    def counting_call_at(when: float, callback, *args):  # type: ignore[no-untyped-def]
        armed.append(when)
        return real_call_at(when, callback, *args)

    loop.call_at = counting_call_at  # type: ignore[method-assign,assignment]
    try:
        waiter = DeadlineWaiter()
        for _ in range(50):  # a stream of items, each well before the deadline
            task = asyncio.create_task(waiter.wait(waiter.time() + 60))
            await asyncio.sleep(0)
            waiter.wake()
            assert await task is True
        assert len(armed) == 1
        # An earlier deadline than the armed timer re-arms it.
        assert await waiter.wait(waiter.time() + 0.01) is False
        assert len(armed) == 2
    finally:
        loop.call_at = real_call_at  # type: ignore[method-assign]
        waiter.close()


async def test_cancelling_the_waiting_task_leaves_the_waiter_reusable() -> None:
    waiter = DeadlineWaiter()
    task = asyncio.create_task(waiter.wait(waiter.time() + 60))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not waiter.waiting
    assert await waiter.wait(waiter.time() + 0.01) is False
    waiter.close()
