"""Runs a worker holds while they wait for their session's turn, and the lease
handed straight from a session's finished run to its next one held here.

A worker that finishes a session's run and holds that session's next run (the
next one in the session's order: the oldest stored after the finished one)
passes the lease to it instead of releasing it and letting every waiter race to
take it again: no release, no wake-up, no acquire, and the history it has
cached stays current (it never let the lease go). Order is kept because only the
session's head run may be handed the lease, and the head is read from the stream
as always; fairness across sessions is untouched, since only this session's
runs wait on its lease.

A run handed a lease it can no longer use (its client left meanwhile) must give
it up: :meth:`HeldRuns.leave` returns it to the caller to release.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

L = TypeVar("L")


class HeldRuns(Generic[L]):
    """Per session token: the stream sequence of each run held here, and a future
    that receives the lease when it is handed over."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, dict[int, asyncio.Future[L]]] = {}

    def hold(self, token: str, seq: int) -> asyncio.Future[L]:
        """Register a held run; the future its lease will be handed through."""
        future: asyncio.Future[L] = asyncio.get_running_loop().create_future()
        self._held.setdefault(token, {})[seq] = future
        return future

    def leave(self, token: str, seq: int) -> L | None:
        """Forget a held run; a lease handed to it and not taken (to release)."""
        runs = self._held.get(token)
        future = runs.pop(seq, None) if runs is not None else None
        if runs is not None and not runs:
            del self._held[token]
        if future is None or not future.done() or future.cancelled():
            return None
        return future.result()

    def sessions(self) -> list[str]:
        """The session tokens with a run held here."""
        return list(self._held)

    def oldest(self, token: str) -> int | None:
        """The oldest run of the session held here (None: none)."""
        runs = self._held.get(token)
        return min(runs) if runs else None

    def hand(self, token: str, seq: int, lease: L) -> bool:
        """Give ``lease`` to the run held at ``seq``; False if it is not waiting."""
        runs = self._held.get(token)
        future = runs.get(seq) if runs is not None else None
        if future is None or future.done():
            return False
        future.set_result(lease)
        return True
