"""Sending one run attempt's events back to its gateway.

The emitter numbers events (``seq``) within an attempt, coalesces text deltas
(the first one goes out at once; later ones at most every ``coalesce_seconds``)
and stops sending anything once the run is *fenced* (its lease was lost) or
abandoned (the gateway said it no longer wants the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus.messages import REPLY_GONE, Accepted, Delta, Done, Failed, Heartbeat, Queued, Usage

log = logging.getLogger("clawbus.worker")

COALESCE_SECONDS = 0.02
COALESCE_MAX_CHARS = 4096
PROBE_TIMEOUT = 5.0


class RunAbandoned(Exception):
    """The gateway no longer wants this run (client gone, or gateway gone)."""


class Emitter:
    def __init__(self, nc: Client, subject: str, attempt: int,
                 coalesce_seconds: float = COALESCE_SECONDS, *, streaming: bool = True) -> None:
        self._nc = nc
        self._subject = subject
        self.attempt = attempt
        self._seq = 0
        self._coalesce = coalesce_seconds
        self._streaming = streaming
        self._buffer: list[str] = []
        self._buffered = 0
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.fenced = False
        self.sent_text = False
        # Monotonic time until which our session lease is certainly still ours
        # (renewed on every successful acquire/refresh; inf: no lease).
        self.lease_deadline = math.inf
        # Set by the worker for a leased run: refreshes the lease now and says
        # whether it is still ours (asked before a failure once the lease lapsed).
        self.confirm_lease: Callable[[], Awaitable[bool]] | None = None
        self.last_probe = time.monotonic()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _publish(self, data: bytes) -> None:
        if self.fenced:
            return
        await self._nc.publish(self._subject, data)

    async def _probe(self, data: bytes) -> None:
        """Send an event as a request: raises RunAbandoned if the gateway let go."""
        if self.fenced:
            raise RunAbandoned("fenced")
        self.last_probe = time.monotonic()
        try:
            reply = await self._nc.request(self._subject, data, timeout=PROBE_TIMEOUT)
        except NoRespondersError:
            raise RunAbandoned("gateway gone") from None
        except NatsTimeoutError:
            # A busy gateway is not a dead one: "no responders" is what says gone.
            return
        if reply.data == REPLY_GONE:
            raise RunAbandoned("client gone")

    async def queued(self) -> None:
        await self._probe(Queued(seq=0, attempt=self.attempt).model_dump_json().encode())

    async def accepted(self, worker_id: str) -> None:
        event = Accepted(seq=self._next_seq(), attempt=self.attempt, worker_id=worker_id)
        await self._probe(event.model_dump_json().encode())

    async def heartbeat(self) -> None:
        # seq 0: a heartbeat may overtake a delta on the wire, so it is not
        # part of the numbered sequence the gateway checks for gaps.
        event = Heartbeat(seq=0, attempt=self.attempt)
        await self._probe(event.model_dump_json().encode())

    def delta(self, text: str) -> None:
        """Queue text; the flusher sends it (the first piece without delay).
        Without a streaming client, text only travels in the final event."""
        if not text or not self._streaming:
            return
        self._buffer.append(text)
        self._buffered += len(text)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="emitter-flush")
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            # Coalesce what arrives in the next interval into one event, unless a
            # lot is waiting already.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._coalesce):
                    while self._buffered < COALESCE_MAX_CHARS:
                        await self._wake.wait()
                        self._wake.clear()
            # The window is over: what it collected goes out now, not with the
            # next token (which used to double the gap at steady token rates).
            if self._buffer:
                self._wake.set()

    def renew_lease(self, deadline: float) -> None:
        """The lease was (re)written at a time ≥ ``deadline`` - TTL: text may flow until then."""
        self.lease_deadline = deadline
        if self._buffer:
            self._wake.set()

    async def _flush(self) -> None:
        # Fencing by the clock: past the lease deadline (the worker stalled, e.g.
        # SIGSTOP or a long GC pause) another worker may own the session, so text
        # is held until a refresh proves the lease is still ours (or it is fenced).
        if not self._buffer or time.monotonic() >= self.lease_deadline:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        self.sent_text = True
        event = Delta(seq=self._next_seq(), attempt=self.attempt, text=text)
        await self._publish(event.model_dump_json().encode())

    async def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None

    async def drain(self) -> None:
        """Send any buffered text now (before a final event)."""
        await self._stop_flusher()
        await self._flush()

    async def done(self, text: str, usage: Usage, finish_reason: str) -> None:
        await self.drain()
        event = Done(seq=self._next_seq(), attempt=self.attempt, text=text, usage=usage,
                     finish_reason="length" if finish_reason == "length" else "stop")
        await self._publish(event.model_dump_json().encode())

    async def failed(self, event_fields: dict[str, object]) -> None:
        # A failure noticed after a stall (e.g. the provider's timeout firing as a
        # thawed worker resumes) must not end a run another worker now owns.
        if time.monotonic() >= self.lease_deadline and self.confirm_lease is not None \
                and not await self.confirm_lease():
            log.warning("run lost its session lease; its failure is not reported")
            self.fenced = True
            return
        await self.drain()
        event = Failed.model_validate(
            {"seq": self._next_seq(), "attempt": self.attempt, **event_fields})
        await self._publish(event.model_dump_json().encode())

    async def aclose(self) -> None:
        await self._stop_flusher()
