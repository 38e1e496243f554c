"""A task started only if a run lasts: ``Deferred(delay, make)`` calls ``make()``
and runs the coroutine as a task after ``delay`` seconds, unless stopped first.

Most runs (short non-streaming calls) end before their keep-alive or their
deferred ``accepted`` notice is due: they then cost a timer, not a task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class Deferred:
    def __init__(self, delay: float, make: Callable[[], Coroutine[Any, Any, None]],
                 name: str) -> None:
        # Dropped once used or unwanted: ``make`` is often a bound method of the
        # object holding this Deferred, a reference cycle per run otherwise (left
        # for the garbage collector's full collections).
        self._make: Callable[[], Coroutine[Any, Any, None]] | None = make
        self._name = name
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            delay, self._start)

    def _start(self) -> None:
        self._timer = None
        make, self._make = self._make, None
        if make is not None:
            self.task = asyncio.create_task(make(), name=self._name)

    def stop_waiting(self) -> None:
        """Never start it (a task already started goes on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._make = None

    async def aclose(self) -> None:
        """Never start it, and cancel it if it did start (its errors are dropped)."""
        self.stop_waiting()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
