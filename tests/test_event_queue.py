"""gateway.event_queue.EventQueue: bounded, never blocks the offering side, cuts a
reader that fell behind off, and reads with a deadline."""

from __future__ import annotations

import asyncio

from gateway.event_queue import EventQueue


async def test_items_come_out_in_order_and_a_waiting_reader_is_woken() -> None:
    queue = EventQueue(8)
    reader = asyncio.create_task(queue.get(queue.time() + 60))
    await asyncio.sleep(0)
    assert queue.offer(b"1") and queue.offer(b"2")
    assert await reader == b"1"
    assert await queue.get(queue.time() + 60) == b"2"
    queue.close()


async def test_a_read_past_its_deadline_returns_none() -> None:
    queue = EventQueue(8)
    assert await queue.get(queue.time() + 0.01) is None
    assert await queue.get(queue.time() - 1) is None
    queue.offer(b"x")
    assert await queue.get(queue.time() - 1) == b"x"  # what is there is still read
    queue.close()


async def test_overflow_drops_everything_and_ends_reads_at_once() -> None:
    queue = EventQueue(2)
    assert queue.offer(b"1") and queue.offer(b"2")
    assert not queue.offer(b"3")
    assert queue.overflowed
    assert not queue.offer(b"4")
    assert await queue.get(queue.time() + 60) is None


async def test_overflow_wakes_a_waiting_reader() -> None:
    queue = EventQueue(0)
    reader = asyncio.create_task(queue.get(queue.time() + 60))
    await asyncio.sleep(0)
    assert not queue.offer(b"1")
    assert await reader is None
