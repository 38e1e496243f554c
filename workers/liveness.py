"""A worker's own view of whether others may have taken it for dead.

The worker's registry heartbeats (bus/registry.py) tell the gateways it is alive.
When they stop for long enough — the process was frozen (SIGSTOP), starved of
CPU, or cut off — a gateway may declare it dead and hand its runs to other
workers. The worker cannot tell whether that happened; it only knows that it
*may* have, from its own clock: :class:`Liveness` says until when that is ruled
out, and counts the *lapses* (a registry write that comes after that time). A run
started before a lapse shows nothing more and stores nothing until its gateway
confirms the run is still its own (a probe answered ``ok``, not ``stale``)."""

from __future__ import annotations

import time

from bus.registry import self_alive_until


class Liveness:
    __slots__ = ("_heartbeat", "epoch", "until")

    def __init__(self, heartbeat_seconds: float) -> None:
        self._heartbeat = heartbeat_seconds
        self.until = 0.0  # monotonic: nobody can have declared us dead before this
        self.epoch = 0  # lapses so far

    def wrote(self, asked_at: float) -> None:
        """A registry write asked at ``asked_at`` succeeded."""
        if time.monotonic() >= self.until:
            self.epoch += 1
        self.until = self_alive_until(asked_at, self._heartbeat)

    def sure(self, epoch: int) -> bool:
        """Is a run started in ``epoch`` certainly still ours to show and store?"""
        return epoch == self.epoch and time.monotonic() < self.until
