"""Telling the gateway that a worker took its run, and learning whether it still
wants it.

The ``accepted`` notice is a probe (see :mod:`workers.probes`): the gateway
answers ``ok``, ``gone`` (its client left), or nobody answers (it died). Its
answer is awaited only before anything durable happens (:meth:`confirm`); an
answer that the run is unwanted stops it at once (``on_abandoned``).

For a leased run (a session that continues) the notice goes out as the run starts
(:meth:`announce_now`): its answer guards the transcript. For a stateless run
(a session nobody can continue) it is deferred (:meth:`announce_later`): the
run's first text or its final event tells the gateway the run was taken just as
well, so a run that ends sooner — most stateless non-streaming calls — costs no
probe round trip at all. A longer run still sends it then, so a dead gateway is noticed within
the deferral plus a round trip. Such a run may go on for up to the deferral
after its client left; the gateway's ``cancel`` still stops it, and a run
cancelled before its end stores nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from .deferred import Deferred
from .events import Emitter, RunAbandoned
from .probes import Probe

# How long a stateless run may run before it tells the gateway it was taken.
ANNOUNCE_DELAY = 0.05


class Acceptance:
    def __init__(self, emitter: Emitter, worker_id: str,
                 on_abandoned: Callable[[bool], None], ack: str = "") -> None:
        self._emitter = emitter
        self._worker_id = worker_id
        self._on_abandoned = on_abandoned
        self._ack = ack
        self._probe: Probe | None = None
        self._later: Deferred | None = None

    async def announce_now(self) -> None:
        self._probe = await self._emitter.accepted(self._worker_id, self._ack,
                                                   self._on_abandoned)

    def announce_later(self, delay: float) -> None:
        self._later = Deferred(delay, self.announce_now, "run-accepted")

    async def confirm(self, cancelled: Callable[[], bool]) -> None:
        """Before anything durable: raises RunAbandoned if the gateway let go of the
        run (or, when no notice went out, if its client cancelled it)."""
        if self._later is not None:
            self._later.stop_waiting()
            if self._later.task is not None:
                await self._later.task  # it only publishes: never waits for the answer
        if self._probe is not None:
            await self._emitter.confirm(self._probe)
        elif cancelled():
            raise RunAbandoned("cancelled")
        # Taken for dead meanwhile? Then the run may be another worker's now.
        await self._emitter.confirm_ours()

    async def aclose(self) -> None:
        if self._later is not None:
            await self._later.aclose()
