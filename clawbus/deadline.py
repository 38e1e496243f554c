"""Waiting for "something happened, or a deadline passed" without a timer per wait.

Streams wait once per item: a gateway follows every streamed token of every run
(thousands a second), the workers' HTTP client waits for every chunk of an
upstream reply. ``asyncio.timeout`` or ``wait_for`` around each wait creates and
cancels a timer handle every time, and most waits end long before their
deadline. :class:`DeadlineWaiter` keeps one timer per stream instead, re-armed
only when it fires: when it fires before the current deadline (the deadline
moved on since it was armed) it sleeps again until that deadline.
"""

from __future__ import annotations

import asyncio

__all__ = ["DeadlineWaiter"]


class DeadlineWaiter:
    """One waiter at a time, woken by :meth:`wake` or by the passing of its deadline.

    Deadlines are on the event loop's clock (``loop.time()``). The deadline of
    the wait in progress may be moved later with :meth:`postpone` (e.g. by each
    read of a connection with a read timeout) at the cost of a float store.
    """

    __slots__ = ("_loop", "_timer", "_timer_at", "_waiter", "deadline")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._waiter: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.deadline = 0.0

    def time(self) -> float:
        """Now, on the clock deadlines are given in."""
        return self._loop.time()

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    async def wait(self, deadline: float) -> bool:
        """Until :meth:`wake` (True) or until ``deadline`` passed (False)."""
        now = self._loop.time()
        self.deadline = deadline
        if now >= deadline:
            return False
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(deadline)
        waiter = self._waiter = self._loop.create_future()
        try:
            woken: bool = await waiter
        finally:
            self._waiter = None
        return woken

    def postpone(self, deadline: float) -> None:
        """Move the current wait's deadline (later only; the timer catches up)."""
        if deadline > self.deadline:  # noqa: PLR1730 - called per read: cheaper than max()
            self.deadline = deadline

    def wake(self) -> None:
        """End the wait in progress, if any, with True."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def close(self) -> None:
        """Cancel the timer (a wait in progress then only ends by :meth:`wake`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, at: float) -> None:
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms a timer if it needs one
        if self._loop.time() >= self.deadline:
            waiter.set_result(False)
        else:
            self._arm(self.deadline)
