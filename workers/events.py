"""Sending one run attempt's events back to its gateway.

The emitter numbers events (``seq``) within an attempt, paces text deltas to at
most one event per ``coalesce_seconds`` on average (text that comes faster waits,
joined with whatever else arrives meanwhile) and stops sending anything once the
run is *fenced* (its lease was lost) or abandoned (the gateway said it no longer
wants the run).

Pacing is a token bucket: one credit per window, up to :data:`PACING_BURST`
credits, one spent per text event. Text arriving once per window — a provider
streaming at exactly that rate, with up to half a window of jitter (peak to
peak) — always finds a credit and goes out at once. (A fixed window from the
last send would make such a stream fall behind: each token that came a little
early would wait for the window, the next window would start late, and the lag
would grow by the timer's lateness on every token.)

The ``accepted`` event is a probe whose answer the worker awaits only before
anything durable (see :mod:`workers.probes`); heartbeats and ``queued`` notices
are probes awaited at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Literal, Protocol

import orjson
from nats.aio.client import Client

from bus.messages import (
    REPLY_GONE,
    REPLY_STALE,
    Accepted,
    Done,
    Embedded,
    Failed,
    Heartbeat,
    Queued,
    ToolCall,
    ToolCallChunk,
    ToolDelta,
    ToolEvent,
    Usage,
    encode_delta,
)
from bus.nats_adapter import Requester
from bus.payloads import Objects, fits

from .liveness import Liveness
from .probes import NO_RESPONDERS, Probe, send_probe

log = logging.getLogger("clawbus.worker")

COALESCE_SECONDS = 0.02
COALESCE_MAX_CHARS = 4096
# Credits the pacing bucket holds: the first text goes at once, and steady text
# at the window's rate tolerates half a window of jitter.
PACING_BURST = 1.5
PROBE_TIMEOUT = 5.0


class Lease(Protocol):
    """What the emitter needs of the run's session lease (bus.leases.SessionLease)."""

    @property
    def deadline(self) -> float:
        """Monotonic time until which the lease is certainly still ours."""

    async def confirm(self) -> bool:
        """Refresh now: is the lease still ours?"""


class RunAbandoned(Exception):
    """The gateway no longer wants this run (client gone, or gateway gone), or
    gave it to another worker (``superseded``: its message must be left alone,
    since it now belongs to that other delivery)."""

    def __init__(self, why: str, *, superseded: bool = False) -> None:
        super().__init__(why)
        self.superseded = superseded


def _abandoned(reply: bytes | None) -> str | None:
    """Why a probe's answer means the gateway let go of the run (None: it did not)."""
    if reply == NO_RESPONDERS:
        return "gateway gone"
    if reply == REPLY_GONE:
        return "client gone"
    if reply == REPLY_STALE:
        return "superseded"
    return None  # ok, or no answer in time: a busy gateway is not a dead one


class Emitter:
    def __init__(self, nc: Client, requests: Requester, subject: str, attempt: int,
                 coalesce_seconds: float = COALESCE_SECONDS, *, streaming: bool = True,
                 liveness: Liveness | None = None, payloads: Objects | None = None,
                 tool_events: bool = True) -> None:
        self._nc = nc
        self._tool_events = tool_events  # the client shows tool steps
        self._requests = requests
        self._subject = subject
        self.attempt = attempt
        self._seq = 0
        self._coalesce = coalesce_seconds
        self._streaming = streaming
        self._payloads = payloads  # where a reply too large for one message goes
        self._buffer: list[str] = []
        self._buffered = 0
        # Tool-call pieces waiting to go (after the buffered text, which came first).
        self._tools: list[ToolCallChunk] = []
        # Pacing without a task or timer per token: text published
        # inline while there is credit; a timer only when text waits for some.
        self._credit = PACING_BURST  # text events allowed now (see PACING_BURST)
        self._credit_at = 0.0  # monotonic time _credit was last brought up to date
        self._timer: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self.fenced = False
        self.sent_text = False
        # The run's session lease (None: an ephemeral session has none). Text
        # flows only until its deadline unless a refresh renews it.
        self.lease: Lease | None = None
        # The worker's liveness and the lapse count when this attempt started (or
        # was last confirmed by its gateway): text waits while they disagree.
        self._liveness = liveness
        self._epoch = liveness.epoch if liveness is not None else 0
        self.last_probe = time.monotonic()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _publish(self, data: bytes) -> None:
        if self.fenced:
            return
        await self._nc.publish(self._subject, data)

    async def _send_probe(self, data: bytes) -> Probe:
        if self.fenced:
            raise RunAbandoned("fenced")
        self.last_probe = time.monotonic()
        return await send_probe(self._requests, self._subject, data, PROBE_TIMEOUT)

    async def _probe(self, data: bytes) -> None:
        """Send an event as a request: raises RunAbandoned if the gateway let go."""
        await self.confirm(await self._send_probe(data))

    @staticmethod
    async def confirm(probe: Probe) -> None:
        """Wait for a probe's answer: raises RunAbandoned if the gateway let go."""
        why = _abandoned(await probe.reply())
        if why is not None:
            raise RunAbandoned(why, superseded=why == "superseded")

    @property
    def sure(self) -> bool:
        """Certainly not taken for dead since this attempt was last confirmed."""
        return self._liveness is None or self._liveness.sure(self._epoch)

    async def confirm_ours(self) -> None:
        """Unless :attr:`sure`, ask the gateway whether the run is still ours (a
        heartbeat probe): raises RunAbandoned if not; then text may flow again."""
        if self.sure or self._liveness is None:
            return
        epoch = self._liveness.epoch
        await self.heartbeat()
        self._epoch = epoch
        self.lease_renewed()

    async def queued(self, worker_id: str, ack: str) -> None:
        event = Queued(seq=0, attempt=self.attempt, worker_id=worker_id, ack=ack)
        await self._probe(event.model_dump_json().encode())

    async def accepted(self, worker_id: str, ack: str,
                       on_abandoned: Callable[[bool], None]) -> Probe:
        """Tell the gateway the run started (and how to hand it back if this worker
        dies), without waiting for its answer: the caller works meanwhile and
        awaits :meth:`confirm` before anything durable. ``on_abandoned(superseded)``
        is called as soon as an answer says the run is unwanted."""
        event = Accepted(seq=self._next_seq(), attempt=self.attempt, worker_id=worker_id,
                         ack=ack)
        probe = await self._send_probe(event.model_dump_json().encode())

        def answered(reply: bytes | None) -> None:
            why = _abandoned(reply)
            if why is not None:
                on_abandoned(why == "superseded")

        probe.on_answer(answered)
        return probe

    async def heartbeat(self) -> None:
        # seq 0: a heartbeat may overtake a delta on the wire, so it is not
        # part of the numbered sequence the gateway checks for gaps.
        event = Heartbeat(seq=0, attempt=self.attempt)
        await self._probe(event.model_dump_json().encode())

    async def delta(self, text: str) -> None:
        """Send text now, or joined with what follows once the pacing allows.
        Without a streaming client, text only travels in the final event."""
        if not text or not self._streaming:
            return
        if self._tools:  # text after tool-call pieces: those go first
            await self._flush()
        self._buffer.append(text)
        self._buffered += len(text)
        delay = self._wait_for_credit()
        if delay <= 0 or self._buffered >= COALESCE_MAX_CHARS:
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._window_over)

    async def tool_delta(self, chunk: ToolCallChunk) -> None:
        """A tool-call piece: paced like text (pieces of one call that wait are
        joined). Without a streaming client, calls only travel in the final event."""
        if not self._streaming:
            return
        tools = self._tools
        if tools and chunk.id is None and tools[-1].index == chunk.index:
            last = tools[-1]
            tools[-1] = last.model_copy(update={"arguments": last.arguments + chunk.arguments})
        else:
            tools.append(chunk)
        delay = self._wait_for_credit()
        if delay <= 0:
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._window_over)

    async def tool_event(self, phase: Literal["start", "result"], name: str, call_id: str, *,
                         args: str = "", result: str = "", is_error: bool = False) -> None:
        """A step of the agent's tool loop, sent at once after the text before it
        (only to clients that show them: RunRequest.tool_events)."""
        if not self._tool_events:
            return
        await self.drain()
        if time.monotonic() >= self.lease_deadline or not self.sure:
            return  # held text would go first; a step is not worth waiting for
        event = ToolEvent(seq=self._next_seq(), attempt=self.attempt, phase=phase, name=name,
                          call_id=call_id, args=args, result=result, is_error=is_error)
        await self._publish(event.model_dump_json().encode())

    def _wait_for_credit(self) -> float:
        """Seconds until a text event may go (0: now); brings the credit up to date."""
        if self._coalesce <= 0:
            return 0.0
        now = time.monotonic()
        credit = min(PACING_BURST, self._credit + (now - self._credit_at) / self._coalesce)
        self._credit, self._credit_at = credit, now
        return 0.0 if credit >= 1.0 else (1.0 - credit) * self._coalesce

    def _window_over(self) -> None:
        self._timer = None
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Flush from a callback (no await there): one short task, if text waits."""
        if (self._buffer or self._tools) \
                and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self._flush(), name="emitter-flush")

    @property
    def lease_deadline(self) -> float:
        """Monotonic time until which the run's lease is certainly still ours."""
        return math.inf if self.lease is None else self.lease.deadline

    def lease_renewed(self) -> None:
        """The lease was refreshed: text held while it could have lapsed may go."""
        if self._timer is None:
            self._flush_soon()

    async def _flush(self) -> None:
        # Fencing by the clock: past the lease deadline (the worker stalled, e.g.
        # SIGSTOP or a long GC pause) another worker may own the session, so text
        # is held until a refresh proves the lease is still ours (or it is fenced).
        if not (self._buffer or self._tools) or time.monotonic() >= self.lease_deadline \
                or not self.sure:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.sent_text = True
        self._wait_for_credit()
        self._credit = max(0.0, self._credit - 1.0)  # forced sends never build a debt
        if self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            await self._publish(encode_delta(self._next_seq(), self.attempt, text))
        if self._tools:
            calls = tuple(self._tools)
            self._tools.clear()
            event = ToolDelta(seq=self._next_seq(), attempt=self.attempt, calls=calls)
            await self._publish(event.model_dump_json().encode())
        if (self._buffer or self._tools) and self._timer is None:  # came while publishing
            self._timer = asyncio.get_running_loop().call_later(
                self._wait_for_credit(), self._window_over)

    def _stop_flushing(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_task is not None:
            # Not run yet (it never awaits before publishing): whoever flushes
            # next takes its text, in order.
            self._flush_task.cancel()
            self._flush_task = None

    async def drain(self) -> None:
        """Send any buffered text now (before a final event)."""
        self._stop_flushing()
        await self._flush()

    async def done(self, text: str, usage: Usage, finish_reason: str,
                   tool_calls: tuple[ToolCall, ...] = ()) -> None:
        await self.drain()
        # A call cut by max tokens stays "length" (its arguments are broken).
        reason = "length" if finish_reason == "length" else \
            "tool_calls" if tool_calls else "stop"
        event = Done(seq=self._next_seq(), attempt=self.attempt, text=text, usage=usage,
                     finish_reason=reason, tool_calls=tool_calls)
        data = event.model_dump_json().encode()
        if self._payloads is not None and not fits(len(data), self._nc.max_payload):
            # The gateway reads the text from the payloads bucket (and deletes it).
            name = f"reply-{self._subject.rpartition('.')[2]}-{self.attempt}"
            await self._payloads.put(name, text.encode())
            data = event.model_copy(update={"text": "", "body": name}).model_dump_json().encode()
        await self._publish(data)

    async def embedded(self, vectors: tuple[str, ...], usage: Usage) -> None:
        """An embeddings run's answer (its vectors packed as ``pack_vector`` does);
        too large for one bus message, the vectors go through the payloads bucket."""
        event = Embedded(seq=self._next_seq(), attempt=self.attempt, vectors=vectors,
                         usage=usage)
        data = event.model_dump_json().encode()
        if self._payloads is not None and not fits(len(data), self._nc.max_payload):
            name = f"embeddings-{self._subject.rpartition('.')[2]}-{self.attempt}"
            await self._payloads.put(name, orjson.dumps(vectors))
            data = event.model_copy(update={"vectors": (), "body": name}) \
                .model_dump_json().encode()
        await self._publish(data)

    async def failed(self, event_fields: dict[str, object]) -> None:
        # A failure noticed after a stall (e.g. the provider's timeout firing as a
        # thawed worker resumes) must not end a run another worker now owns.
        lease = self.lease
        if lease is not None and time.monotonic() >= lease.deadline \
                and not await lease.confirm():
            log.warning("run lost its session lease; its failure is not reported")
            self.fenced = True
            return
        await self.drain()
        event = Failed.model_validate(
            {"seq": self._next_seq(), "attempt": self.attempt, **event_fields})
        await self._publish(event.model_dump_json().encode())

    async def aclose(self) -> None:
        self._stop_flushing()
