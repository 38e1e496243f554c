"""Cancelling a request's work when its client disconnects, without a task for the
work itself (this is on every streamed request's path).

``async with CancelOnDisconnect(receive) as watch:`` runs its body in the
calling task while one watcher task waits for ``http.disconnect`` and, if the
body is still running, cancels it. That cancellation ends the block quietly and
``watch.disconnected`` is True; any other cancellation (the server shutting
down) propagates as usual.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive


class CancelOnDisconnect:
    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._active = False
        self.disconnected = False

    async def __aenter__(self) -> CancelOnDisconnect:
        self._task = asyncio.current_task()
        self._active = True
        self._watcher = asyncio.create_task(self._watch(), name="watch-disconnect")
        return self

    def finish(self) -> None:
        """The work is done: a disconnect from now on cancels nothing (call it just
        before a last step that may let the server report the disconnect)."""
        self._active = False

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self._active and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool:
        self._active = False  # (no await since the body ended: no late cancel)
        # Dropping our reference to the watcher matters: its CancelledError keeps
        # a traceback whose frame holds this object, so watcher → error → frame →
        # self → watcher would be a reference cycle per request: kept in memory
        # until a full collection, which then stalls every stream for as long
        # as it takes to free them all.
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
        if exc_type is asyncio.CancelledError and self.disconnected:
            assert self._task is not None
            self._task.uncancel()
            return True  # the client left: a normal end for the caller
        return False
