"""A run's bounded event buffer: filled from the bus subscription's callback,
read by the one coroutine following the run, with a deadline per read."""

from __future__ import annotations

from collections import deque

from clawbus.deadline import DeadlineWaiter


class EventQueue:
    """Events (raw message data) of one run, at most ``limit`` waiting.

    :meth:`offer` never blocks (it runs in the connection's reader). Past the
    limit the queue *overflows*: its content is dropped and every later read
    returns None at once — a client that stops reading is cut off, never
    allowed to hold memory or the reader. Reads wait through a
    :class:`~clawbus.deadline.DeadlineWaiter` (one timer per run, not one per
    event)."""

    __slots__ = ("_items", "_limit", "_waiter", "overflowed", "stopped")

    def __init__(self, limit: int) -> None:
        self._items: deque[bytes] = deque()
        self._limit = limit
        self._waiter = DeadlineWaiter()
        self.overflowed = False
        self.stopped = False

    def time(self) -> float:
        """Now, on the clock read deadlines are given in."""
        return self._waiter.time()

    def offer(self, data: bytes) -> bool:
        """Enqueue; False if this item overflowed the queue (it is then empty)."""
        if self.overflowed:
            return False
        if len(self._items) >= self._limit:
            self.overflowed = True
            self._items.clear()
            self._waiter.wake()
            return False
        self._items.append(data)
        self._waiter.wake()
        return True

    async def get(self, deadline: float) -> bytes | None:
        """The next item; None once ``deadline`` (see :meth:`time`) passed, when
        the queue overflowed, or after :meth:`stop` once it is empty."""
        while not self._items:
            if self.overflowed or self.stopped or not await self._waiter.wait(deadline):
                return None
        return self._items.popleft()

    def stop(self) -> None:
        """End reads: what is queued is still read, then reads return None at once."""
        self.stopped = True
        self._waiter.wake()

    def close(self) -> None:
        """Drop the timer (the queue may still be read; waits then end only by
        an offer)."""
        self._waiter.close()
