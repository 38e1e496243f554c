"""The gateway's one run API: submit an agent run to the bus and follow its events.

HTTP, WebSocket and the ``clawbus agent`` CLI all go through :class:`RunClient`,
so a fix here is a fix for every door.

One wildcard subscription per process (``evt.<gatewayId>.*``) receives every
event for every run this process owns; the callback only answers liveness
probes and enqueues into the run's bounded queue (never parses, never blocks).
A run whose consumer falls too far behind (a stalled client) is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus import subjects
from bus.connection import BUS_UNAVAILABLE
from bus.direct import subscribe_direct
from bus.messages import (
    REPLY_GONE,
    REPLY_OK,
    Accepted,
    Delta,
    Done,
    Failed,
    Heartbeat,
    Queued,
    RunRequest,
    SamplingParams,
    decode_event,
)
from bus.publish import AckedPublisher
from clawbus.config import BusConfig
from clawbus.logs import run_context

from .metrics import GatewayMetrics

log = logging.getLogger("clawbus.gateway")

PUBLISH_TIMEOUT = 5.0
PUBLISH_RETRY_DELAY = 0.25


class NoWorkerError(Exception):
    """No worker accepted the run within the queue timeout (→ 503)."""


class RunRejected(Exception):
    """The run could not be queued (bus down, message too large)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What a door (HTTP, WS, CLI) asks for: one agent turn."""

    agent_id: str
    session_key: str
    message: str
    extra_system_prompt: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    run_id: str | None = None
    # The session key was generated for this call and never disclosed.
    ephemeral: bool = False
    # False for a non-streaming HTTP call: only the final text is needed.
    stream: bool = True


RunEvent = Accepted | Delta | Done | Failed | Heartbeat
# What :meth:`RunHandle.events` yields, when asked to, after ``keepalive`` seconds
# without yielding anything else (the SSE door turns it into ``: keep-alive``).
KEEPALIVE = Heartbeat(seq=0, attempt=0)


def _failed(status: int, error_type: str, message: str, code: str) -> Failed:
    return Failed(seq=0, attempt=0, status=status, error_type=error_type, message=message,
                  code=code)


class RunHandle:
    """One submitted run. Iterate :meth:`events` once; call :meth:`cancel` when the
    client goes away (safe to call at any time, any number of times)."""

    def __init__(self, client: RunClient, run_id: str, session_key: str, door: str) -> None:
        self.run_id = run_id
        self.door = door
        self.session_key = session_key
        self.created = time.time()
        # The run's bounded event queue, read by events(): a deque and one waiter
        # future, with one timer per run re-armed only when it fires — not an
        # asyncio.Queue and an asyncio.timeout per event (issue #5: 2,000 held
        # streams are ~4,000 events/s through this loop on one core).
        self._pending: deque[bytes] = deque()
        self._limit = client.bus.event_queue_size
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # monotonic: when the current wait gives up
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.overflowed = False
        self.finished = False  # nobody reads the events any more
        self.ended = False  # the run's last event (Done/Failed) arrived
        self.accepted = False
        self.streamed = False
        self.stream_seq: int | None = None
        self.queue_wait: float | None = None
        self._client = client
        self._cutting_off = False
        self._attempt = 0
        self._next_seq = 1

    @property
    def wanted(self) -> bool:
        return not self.finished

    def offer(self, data: bytes) -> None:
        """Called from the subscription callback: enqueue without blocking."""
        if self.finished or self.overflowed:
            return
        if len(self._pending) >= self._limit:
            self.overflowed = True
            self._pending.clear()
            # The client stopped reading: its response may be stuck in a blocked
            # send and never look at this queue again, so stop the run now rather
            # than let the worker generate (and store) a reply nobody reads.
            if not self._cutting_off and not self.ended:
                self._cutting_off = True
                self._client.in_background(self.cancel("slow_consumer"))
        else:
            self._pending.append(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next(self, deadline: float) -> bytes | None:
        """The next event's data, or None once ``deadline`` (monotonic) passed or
        the queue overflowed."""
        while not self._pending and not self.overflowed:
            now = time.monotonic()
            if now >= deadline:
                return None
            self._deadline = deadline
            if self._timer is None or self._timer_at > deadline:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer_at = deadline
                self._timer = asyncio.get_running_loop().call_later(deadline - now,
                                                                    self._on_timer)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.popleft() if self._pending else None

    def _on_timer(self) -> None:
        """Wake the waiter if its deadline passed; else wait on to the (later) deadline."""
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # nobody waits: the next wait arms a timer if it needs one
        now = time.monotonic()
        if now >= self._deadline:
            self._waiter.set_result(None)
        else:
            self._timer_at = self._deadline
            self._timer = asyncio.get_running_loop().call_later(self._deadline - now,
                                                                self._on_timer)

    async def events(self, keepalive: float | None = None) -> AsyncGenerator[RunEvent, None]:
        """Accepted, then Deltas, then exactly one Done or Failed (the last item).

        With ``keepalive``, :data:`KEEPALIVE` is also yielded whenever that long
        passed without anything else yielded (no extra task per event needed by
        the caller to time its keep-alives)."""
        bus = self._client.bus
        idle_timeout = 3 * bus.heartbeat_seconds + 1.0
        # Before any text reached the client, a silent worker may be a dead one
        # whose run JetStream redelivers after the ack wait: wait for that retry
        # (it is transparent to the client) rather than failing at once.
        redelivery_timeout = max(idle_timeout, bus.ack_wait_seconds + 2 * bus.heartbeat_seconds)
        resync = False  # an event was lost: relay no more deltas, finish from the final text
        sent = 0  # characters of reply text relayed so far
        last_event = last_yield = time.monotonic()
        try:
            while True:
                if not self.accepted:
                    timeout = bus.queue_timeout_seconds
                elif self.streamed:
                    timeout = idle_timeout
                else:
                    timeout = redelivery_timeout
                # Any message (heartbeats and queued notices too) restarts the
                # phase's timer; keep-alives count from the last thing yielded.
                phase_deadline = last_event + timeout
                tick_deadline = last_yield + keepalive if keepalive else phase_deadline
                data = await self._next(min(phase_deadline, tick_deadline))
                if data is None and not self.overflowed:
                    if time.monotonic() < phase_deadline:
                        last_yield = time.monotonic()
                        yield KEEPALIVE
                        continue
                    if not self.accepted:
                        await self.cancel("no_worker")
                        raise NoWorkerError() from None
                    await self.cancel("worker_lost")
                    self._client.bus_error("worker_lost")
                    yield _failed(503, "api_error", "agent worker stopped responding",
                                  "worker_lost")
                    return
                if self.overflowed:
                    await self.cancel("slow_consumer")
                    self._client.bus_error("slow_consumer")
                    yield _failed(503, "api_error", "client too slow: event queue overflowed",
                                  "slow_consumer")
                    return
                assert data is not None
                last_event = time.monotonic()
                event = decode_event(data)
                if event.attempt < self._attempt:
                    continue  # a stale attempt (its worker died or was fenced)
                if event.attempt > self._attempt:
                    if self.streamed:
                        # Output was already sent: a retry would duplicate text.
                        await self.cancel("interrupted")
                        self._client.bus_error("interrupted")
                        yield _failed(503, "api_error",
                                      "agent run interrupted: its worker was lost mid-reply",
                                      "interrupted")
                        return
                    self._attempt = event.attempt
                    self._next_seq = 1
                    resync = False
                if isinstance(event, Queued | Heartbeat):
                    continue
                if event.seq != self._next_seq and not resync:
                    # An event was lost on the way (core NATS is at most once: e.g. a
                    # NATS node died with it in its buffers). The final event carries
                    # the whole reply: relay no more deltas and send the missing tail
                    # from it, so the client still gets the text exactly once.
                    self._client.bus_error("event_gap")
                    resync = True
                self._next_seq = event.seq + 1
                if not self.accepted:
                    # A stateless run may skip its "accepted" notice: its first
                    # text or its end says a worker took it (workers/acceptance.py).
                    self.accepted = True
                    self.queue_wait = time.time() - self.created
                    self._client.observe("queue_wait", self.queue_wait)
                    last_yield = time.monotonic()
                    yield event if isinstance(event, Accepted) else Accepted(
                        seq=event.seq, attempt=event.attempt, worker_id="")
                if isinstance(event, Accepted):
                    continue  # (also a notice that came after the text)
                if isinstance(event, Delta):
                    if resync:
                        continue
                    sent += len(event.text)
                    if not self.streamed:
                        self.streamed = True
                        self._client.observe("ttft", time.time() - self.created)
                    last_yield = time.monotonic()
                    yield event
                    continue
                self.ended = True
                elapsed = time.time() - self.created
                if not self.streamed and isinstance(event, Done):
                    self._client.observe("ttft", elapsed)  # its text arrives all at once
                self._client.observe("run", elapsed)
                self._client.outcome(self, "ok" if isinstance(event, Done) else "error")
                if resync and isinstance(event, Done) and len(event.text) > sent:
                    self.streamed = True
                    yield Delta(seq=event.seq, attempt=event.attempt, text=event.text[sent:])
                yield event
                return
        finally:
            self.finished = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._client.forget(self)

    async def cancel(self, outcome: str = "cancelled") -> None:
        """Stop the run: tell its worker, and drop it from the queue if not started."""
        self.finished = True
        self._client.forget(self)
        if not self.ended:
            self.ended = True
            self._client.outcome(self, outcome)
            await self._client.cancel(self)


class RunClient:
    """Owns the event subscription of one gateway process and submits runs."""

    def __init__(self, nc: Client, js: JetStreamContext, bus: BusConfig,
                 gateway_id: str | None = None, metrics: GatewayMetrics | None = None) -> None:
        self.nc = nc
        self.js = js
        self.bus = bus
        self.gateway_id = gateway_id or f"gw{uuid.uuid4().hex[:12]}"
        self.metrics = metrics
        self._runs: dict[str, RunHandle] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._publisher = AckedPublisher(nc)

    async def start(self) -> None:
        await self._publisher.start()
        # Handled synchronously from the connection's reader (bus/direct.py): one
        # message per streamed token, and the handler only files it.
        self._sub = await subscribe_direct(
            self.nc, subjects.events_all(self.gateway_id), self._on_event,
            pending_msgs_limit=-1, pending_bytes_limit=-1)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` without blocking the caller (a subscription callback); the
        client owns the task and :meth:`close` waits for it."""
        task = asyncio.create_task(work, name="run-client-background")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for handle in list(self._runs.values()):
            with contextlib.suppress(Exception):
                await handle.cancel()
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        with contextlib.suppress(Exception):
            await self._publisher.close()

    @property
    def active_runs(self) -> int:
        return len(self._runs)

    def _on_event(self, msg: Msg) -> None:
        handle = self._runs.get(subjects.last_token(msg.subject))
        if msg.reply:  # a probe (accepted, heartbeat, queued): rare
            self.in_background(self.nc.publish(
                msg.reply, REPLY_OK if handle and handle.wanted else REPLY_GONE))
        if handle is not None:
            handle.offer(msg.data)

    def forget(self, handle: RunHandle) -> None:
        self._runs.pop(handle.run_id, None)

    # -- metrics hooks (no-ops without a registry, e.g. in `clawbus agent`) --------

    def observe(self, what: Literal["queue_wait", "ttft", "run"], seconds: float) -> None:
        if self.metrics is not None:
            if what == "ttft":
                self.metrics.ttft.observe(seconds)
            elif what == "run":
                self.metrics.run_latency.observe(seconds)
            else:
                self.metrics.queue_wait.observe(seconds)

    def outcome(self, handle: RunHandle, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.runs_by(handle.door, outcome).inc()

    def bus_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.bus_errors_by(kind).inc()

    def round_trip(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.bus_requests_by(op).inc()

    async def submit(self, spec: RunSpec, door: str = "http") -> RunHandle:
        """Queue a run on its session's subject; raises RunRejected if the bus refuses."""
        run_id = spec.run_id or f"chatcmpl_{uuid.uuid4()}"
        handle = RunHandle(self, run_id, spec.session_key, door)
        request = RunRequest(
            run_id=run_id, session_key=spec.session_key, agent_id=spec.agent_id,
            message=spec.message, extra_system_prompt=spec.extra_system_prompt,
            params=spec.params, events_subject=subjects.events(self.gateway_id, run_id),
            created=handle.created, ephemeral=spec.ephemeral, stream=spec.stream,
        )
        payload = request.model_dump_json().encode()
        if len(payload) > self.nc.max_payload:
            raise RunRejected("Payload too large", status=413)
        self._runs[run_id] = handle
        self.round_trip("publish_run")
        try:
            ack = await self._publish_run(
                subjects.run(subjects.session_token(spec.session_key)), payload, run_id)
        except Exception as exc:
            self.forget(handle)
            self.bus_error("publish")
            with run_context(run_id, spec.session_key):
                log.warning("could not queue run: %s", exc)
            raise RunRejected("No agent worker available.") from exc
        handle.stream_seq = int(ack["seq"])
        return handle

    async def _publish_run(self, subject: str, payload: bytes, run_id: str) -> dict[str, Any]:
        """Publish a run, retrying for up to the queue timeout while the bus is briefly
        unavailable (a NATS node died, a stream leader election): the run id as
        ``Nats-Msg-Id`` makes retrying a publish that did land a no-op."""
        deadline = time.monotonic() + self.bus.queue_timeout_seconds
        while True:
            try:
                return await self._publisher.publish(subject, payload, ack_wait=PUBLISH_TIMEOUT,
                                                     headers={"Nats-Msg-Id": run_id})
            except BUS_UNAVAILABLE:
                if time.monotonic() + PUBLISH_RETRY_DELAY >= deadline:
                    raise
                await asyncio.sleep(PUBLISH_RETRY_DELAY)

    async def cancel(self, handle: RunHandle) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.cancel(handle.run_id), b"")
        if not handle.accepted and handle.stream_seq is not None:
            self.round_trip("delete_run")
            with contextlib.suppress(NotFoundError, Exception):
                await self.js.delete_msg(subjects.RUNS_STREAM, handle.stream_seq)
