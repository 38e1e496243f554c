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
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus import heads, subjects
from bus.connection import BUS_UNAVAILABLE, lease_ttl_seconds
from bus.leases import Leases, lease_owner
from bus.messages import (
    REPLY_GONE,
    REPLY_OK,
    REPLY_STALE,
    Accepted,
    ChatItem,
    Delta,
    Done,
    Embedded,
    EmbedParams,
    Failed,
    Heartbeat,
    Queued,
    RunRequest,
    SamplingParams,
    ToolChoice,
    ToolDelta,
    ToolSpec,
    decode_event,
)
from bus.nats_adapter import AckedPublisher, subscribe_direct
from bus.payloads import PAYLOADS_BUCKET, Objects, fits
from bus.registry import WorkerWatch, dead_after
from clawbus import tracing
from clawbus.config import BusConfig
from clawbus.logs import run_context

from .event_queue import EventQueue
from .metrics import GatewayMetrics
from .sequencer import RunEvent, Sequencer, failure

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
    # Structured input (images, tool traffic), client tools, x-openclaw-model:
    # see bus.messages.RunRequest.
    input: tuple[ChatItem, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    model: str | None = None
    # An embeddings request (SPEC §11) instead of an agent turn: ephemeral, its
    # embedding model in ``model``; the run ends with ``Embedded``.
    embed: EmbedParams | None = None
    # The client shows the agent's tool steps (else the worker sends none).
    tool_events: bool = False


# What :meth:`RunHandle.events` yields, when asked to, after ``keepalive`` seconds
# without yielding anything else (the SSE door turns it into ``: keep-alive``).
KEEPALIVE = Heartbeat(seq=0, attempt=0)


class RunHandle:
    """One submitted run. Iterate :meth:`events` once; call :meth:`cancel` when the
    client goes away (safe to call at any time, any number of times)."""

    def __init__(self, client: RunClient, run_id: str, session_key: str, door: str, *,
                 ephemeral: bool = False) -> None:
        self.run_id = run_id
        self.door = door
        self.session_key = session_key
        self.ephemeral = ephemeral
        self.created = time.time()
        self._queue = EventQueue(client.bus.event_queue_size)
        self._sequencer = Sequencer()
        self.finished = False  # nobody reads the events any more
        self.ended = False  # the run's last event (Done/Failed) arrived
        self.stream_seq: int | None = None
        self.queue_wait: float | None = None
        self._client = client
        self._cutting_off = False
        self._text_shown = False
        # The worker that holds the run's current attempt (from its Accepted or
        # Queued notice), the attempt, and the reply subject to hand it back with.
        self.holder = ""
        self._holder_attempt = 0
        self._holder_ack = ""
        self._holder_lost = False  # after text was shown: the run fails
        self.handed_back_below = 0  # attempts below this were handed to others
        self.payload = ""  # the object holding the request, if it was too large

    @property
    def wanted(self) -> bool:
        return not self.finished

    @property
    def accepted(self) -> bool:
        """A worker took the run (its acceptance was shown)."""
        return self._sequencer.accepted

    @property
    def streamed(self) -> bool:
        """Reply text was shown to the client."""
        return self._sequencer.streamed

    def offer(self, data: bytes) -> None:
        """Called from the subscription callback: enqueue without blocking."""
        if self.finished or self._queue.offer(data) or not self._queue.overflowed:
            return
        # The client stopped reading: its response may be stuck in a blocked
        # send and never look at this queue again, so stop the run now rather
        # than let the worker generate (and store) a reply nobody reads.
        if not self._cutting_off and not self.ended:
            self._cutting_off = True
            self._client.in_background(self.cancel("slow_consumer"))

    def _timeout(self) -> float:
        """How long the run may stay silent in its current phase."""
        bus = self._client.bus
        if not self._sequencer.accepted:
            return bus.queue_timeout_seconds
        idle = 3 * bus.heartbeat_seconds + 1.0
        if self._sequencer.streamed:
            return idle
        # Before any text reached the client, a silent worker may be a dead one
        # whose run JetStream redelivers after the ack wait: wait for that retry
        # (it is transparent to the client) rather than failing at once.
        return max(idle, bus.ack_wait_seconds + 2 * bus.heartbeat_seconds)

    async def events(self, keepalive: float | None = None) -> AsyncGenerator[RunEvent, None]:
        """Accepted, then Deltas, then exactly one Done or Failed (the last item).

        With ``keepalive``, :data:`KEEPALIVE` is also yielded whenever that long
        passed without anything else yielded (no extra task per event needed by
        the caller to time its keep-alives)."""
        queue = self._queue
        sequencer = self._sequencer
        last_event = last_yield = queue.time()
        longest = self._client.longest_wait
        wait_until = last_event + longest if longest else float("inf")
        try:
            while True:
                # Any message (heartbeats and queued notices too) restarts the
                # phase's timer; keep-alives count from the last thing yielded.
                phase_deadline = last_event + self._timeout()
                if not sequencer.accepted:
                    phase_deadline = min(phase_deadline, wait_until)
                deadline = min(phase_deadline, last_yield + keepalive) if keepalive \
                    else phase_deadline
                data = await queue.get(deadline)
                if data is None:
                    if self._holder_lost:
                        yield await self._give_up("worker_lost",
                                                  "agent worker was lost mid-reply")
                        return
                    if queue.overflowed:
                        yield await self._give_up(
                            "slow_consumer", "client too slow: event queue overflowed")
                        return
                    if queue.time() < phase_deadline:
                        last_yield = queue.time()
                        yield KEEPALIVE
                        continue
                    if not sequencer.accepted:
                        if not self._client.workers_alive():
                            await self.cancel("no_worker")
                            raise NoWorkerError() from None
                        if queue.time() >= wait_until:
                            yield await self._give_up(
                                "turn_timeout", "the run's turn in its session never came "
                                "(an earlier run of the session did not end)")
                            return
                        if await self._client.still_queued(self) is False:
                            # Its message left the queue, yet no worker said it runs
                            # the run (a worker gave it up, finding the gateway
                            # unreachable): waiting would be waiting forever.
                            yield await self._give_up(
                                "run_lost", "the run left the queue without being served")
                            return
                        # A live worker may still take it (the session's earlier
                        # run is long, or being recovered): keep waiting.
                        last_event = queue.time()
                        continue
                    yield await self._give_up("worker_lost", "agent worker stopped responding")
                    return
                last_event = queue.time()
                event = decode_event(data)
                if isinstance(event, (Done, Embedded)) and event.body:
                    event = await self._client.whole_reply(event)
                if isinstance(event, Accepted | Queued):
                    self._track_holder(event)
                gaps = sequencer.gaps
                shown = sequencer.feed(event)
                if sequencer.gaps != gaps:
                    self._client.bus_error("event_gap")
                for event in shown:
                    last_yield = queue.time()
                    if isinstance(event, Accepted):
                        self.queue_wait = time.time() - self.created
                        self._client.observe("queue_wait", self.queue_wait)
                    elif isinstance(event, (Delta, ToolDelta)):  # (a tuple: no union built)
                        if not self._text_shown:
                            self._text_shown = True
                            self._client.observe("ttft", time.time() - self.created)
                    elif isinstance(event, (Done, Failed, Embedded)):  # the run's end
                        if sequencer.interrupted:
                            await self.cancel("interrupted")
                            self._client.bus_error("interrupted")
                        else:
                            self._finish(event)
                    yield event
                if sequencer.ended:
                    return
        finally:
            self.finished = True
            queue.close()
            self._client.forget(self)

    def _track_holder(self, event: Accepted | Queued) -> None:
        if event.attempt < max(self._holder_attempt, self.handed_back_below) \
                or not event.worker_id:
            return
        self.holder = event.worker_id
        self._holder_attempt = event.attempt
        self._holder_ack = event.ack
        self._client.worker_seen(event.worker_id)

    def holder_lost(self) -> None:
        """The worker holding the run was taken for dead: before any text, the run
        goes to a live worker at once (handed back on the dead one's behalf);
        after, it fails as interrupted (a retry would repeat text)."""
        if self.finished or self.ended:
            return
        worker, attempt, ack = self.holder, self._holder_attempt, self._holder_ack
        self.holder = ""
        if self._sequencer.streamed:
            self._holder_lost = True
            self._queue.stop()
            return
        self.handed_back_below = attempt + 1
        self._sequencer.retire(attempt)
        if ack:
            self._client.in_background(self._client.hand_back(self, worker, ack))

    def _finish(self, event: RunEvent) -> None:
        """The run's final event arrived: its metrics."""
        self.ended = True
        elapsed = time.time() - self.created
        if not self._text_shown and isinstance(event, Done):
            self._client.observe("ttft", elapsed)  # its text arrives all at once
        self._client.observe("run", elapsed)
        self._client.outcome(self, "ok" if isinstance(event, (Done, Embedded)) else "error")

    async def _give_up(self, code: str, message: str) -> Failed:
        """Stop the run on the gateway's side; the failure to show."""
        await self.cancel(code)
        self._client.bus_error(code)
        return failure(503, "api_error", message, code)

    async def cancel(self, outcome: str = "cancelled") -> None:
        """Stop the run: tell its worker, and drop it from the queue if not started."""
        self.finished = True
        self._client.forget(self)
        if not self.ended:
            self.ended = True
            self._client.outcome(self, outcome)
            await self._client.cancel(self)


def _probe_answer(handle: RunHandle | None, data: bytes) -> bytes:
    """Whether a worker should go on with the run it asks about: no (gone) once
    the client left; no (stale) if its attempt was handed to another worker."""
    if handle is None or not handle.wanted:
        return REPLY_GONE
    if handle.handed_back_below:
        try:
            attempt = int(orjson.loads(data)["attempt"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return REPLY_OK
        if attempt < handle.handed_back_below:
            return REPLY_STALE
    return REPLY_OK


class RunClient:
    """Owns the event subscription of one gateway process and submits runs."""

    def __init__(self, nc: Client, js: JetStreamContext, bus: BusConfig,
                 gateway_id: str | None = None, metrics: GatewayMetrics | None = None, *,
                 longest_run: float = 0.0) -> None:
        self.nc = nc
        self.js = js
        self.bus = bus
        # How long a run may wait for its turn while workers say it is queued: an
        # earlier run of its session may take the longest agent timeout, its
        # recovery an ack wait more; past that, something is stuck (0: no bound).
        self.longest_wait = (bus.queue_timeout_seconds + longest_run + bus.ack_wait_seconds
                             if longest_run > 0 else 0.0)
        self.gateway_id = gateway_id or f"gw{uuid.uuid4().hex[:12]}"
        self.metrics = metrics
        self._runs: dict[str, RunHandle] = {}
        self._busy = heads.BusySessions()  # (whose runs to publish as heads)
        self._background: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._publisher = AckedPublisher(nc)
        self._leases = Leases(js, lease_ttl_seconds(bus), self._publisher)
        self._payloads = Objects(js, PAYLOADS_BUCKET)
        self._workers = WorkerWatch(nc, js, bus.heartbeat_seconds, self._worker_lost)
        # Handing a run back is safe only while JetStream has not redelivered it
        # by itself, which it does an ack wait after the dead worker's last
        # progress report (every ackWait/3): death must be noticed well before.
        self._may_hand_back = (dead_after(bus.heartbeat_seconds) * 1.5 + 1.0
                               < bus.ack_wait_seconds * 2 / 3)

    def workers_alive(self) -> int:
        """Workers heard from lately (their registry heartbeats or events)."""
        return self._workers.alive

    def worker_seen(self, worker_id: str) -> None:
        self._workers.seen(worker_id)

    def _worker_lost(self, worker_id: str) -> None:
        for handle in list(self._runs.values()):
            if handle.holder == worker_id:
                handle.holder_lost()

    async def still_queued(self, handle: RunHandle) -> bool | None:
        """Whether the run's message is still in the queue (None: the bus cannot
        say now). A gateway told nothing for a queue timeout asks before waiting on."""
        if handle.stream_seq is None:
            return None
        self.round_trip("check_run")
        try:
            await self.js.get_msg(subjects.RUNS_STREAM, handle.stream_seq)
        except NotFoundError:
            return False
        except Exception:
            return None
        return True

    async def hand_back(self, handle: RunHandle, worker_id: str, ack: str) -> None:
        """Give a dead worker's run to a live one: free the session's lease if the
        dead worker holds it (compare-and-set: a live holder is never touched),
        then nak the dead worker's delivery so JetStream redelivers it now."""
        if not self._may_hand_back:
            return  # JetStream redelivers about as soon, and a nak could race it
        with run_context(handle.run_id, handle.session_key):
            log.warning("worker %s was lost; its run goes to another worker", worker_id)
            try:
                if not handle.ephemeral:
                    await self._leases.free_if_held_by(
                        subjects.session_token(handle.session_key), lease_owner(worker_id))
                await self.nc.publish(ack, b"-NAK")
            except Exception as exc:  # JetStream's own redelivery comes later anyway
                log.warning("could not hand the run back: %r", exc)
                return
        self.bus_error("handed_back")

    async def start(self) -> None:
        await self._publisher.start()
        await self._workers.start()
        # Handled synchronously from the connection's reader (subscribe_direct): one
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
        await self._workers.close()
        with contextlib.suppress(Exception):
            await self._publisher.close()

    @property
    def active_runs(self) -> int:
        return len(self._runs)

    def _on_event(self, msg: Msg) -> None:
        handle = self._runs.get(subjects.last_token(msg.subject))
        if msg.reply:  # a probe (accepted, heartbeat, queued): rare
            self.in_background(self.nc.publish(msg.reply, _probe_answer(handle, msg.data)))
        if handle is not None:
            handle.offer(msg.data)

    def forget(self, handle: RunHandle) -> None:
        if self._runs.pop(handle.run_id, None) is not None and not handle.ephemeral:
            self._busy.ended(handle.session_key)
        if handle.payload:  # the run is over for its client: its request goes too
            name, handle.payload = handle.payload, ""
            self.in_background(self._payloads.delete(name))

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
        handle = RunHandle(self, run_id, spec.session_key, door, ephemeral=spec.ephemeral)
        request = RunRequest(
            run_id=run_id, session_key=spec.session_key, agent_id=spec.agent_id,
            message=spec.message, extra_system_prompt=spec.extra_system_prompt,
            params=spec.params, events_subject=subjects.events(self.gateway_id, run_id),
            created=handle.created, ephemeral=spec.ephemeral, stream=spec.stream,
            input=spec.input, tools=spec.tools, tool_choice=spec.tool_choice, model=spec.model,
            embed=spec.embed, tool_events=spec.tool_events,
        )
        payload = request.model_dump_json().encode()
        session = not spec.ephemeral
        # (a session busy here or lately is not tried as the head: it would be refused)
        as_head_of = spec.session_key if session and not self._busy.busy(
            spec.session_key, time.monotonic()) else None
        self._runs[run_id] = handle
        if session:
            self._busy.started(spec.session_key)
        self.round_trip("publish_run")
        try:
            if not fits(len(payload), self.nc.max_payload):
                payload = await self._stored(handle, request, payload)
            subject = subjects.run(subjects.session_token(spec.session_key))
            if tracing.ENABLED:
                ack = await self._traced_publish(subject, payload, spec, run_id, as_head_of)
            else:
                ack = await self._publish_run(subject, payload, {"Nats-Msg-Id": run_id},
                                              as_head_of)
        except Exception as exc:
            self.forget(handle)
            self.bus_error("publish")
            with run_context(run_id, spec.session_key):
                log.warning("could not queue run: %s", exc)
            raise RunRejected("No agent worker available.") from exc
        handle.stream_seq = int(ack["seq"])
        return handle

    async def whole_reply(self, done: Done | Embedded) -> Done | Embedded | Failed:
        """A Done whose text (or an Embedded whose vectors) was too large for a bus
        message, read from the payloads bucket (then deleted); a failure if it
        cannot be read."""
        try:
            data = await self._payloads.get(done.body)
            update: dict[str, object] = {"text": data.decode()} if isinstance(done, Done) \
                else {"vectors": tuple(orjson.loads(data))}
        except Exception as exc:  # gone or unreadable: the run fails, cleanly
            log.warning("could not read a large reply (%s): %r", done.body, exc)
            failed = failure(502, "api_error", "the agent's reply could not be read", "internal")
            return failed.model_copy(update={"seq": done.seq, "attempt": done.attempt})
        self.in_background(self._payloads.delete(done.body))
        return done.model_copy(update={**update, "body": ""})

    async def _stored(self, handle: RunHandle, request: RunRequest, payload: bytes) -> bytes:
        """Put a request too large for a bus message in the payloads bucket; the
        run message that names it."""
        name = f"run-{request.run_id}"
        self.round_trip("put_payload")
        await self._payloads.put(name, payload)
        handle.payload = name
        stub = request.model_copy(update={"message": "", "extra_system_prompt": "", "input": (),
                                          "tools": (), "embed": None, "payload": name})
        return stub.model_dump_json().encode()

    async def _traced_publish(self, subject: str, payload: bytes, spec: RunSpec,
                              run_id: str, as_head_of: str | None) -> dict[str, Any]:
        """The run's publish in a PRODUCER span whose context rides in the message's
        headers (``traceparent``), so that the worker's spans join the trace, every
        attempt of the run alike (a redelivered message keeps its headers)."""
        spans = tracing.spans()
        attributes = {"clawbus.run_id": run_id, "clawbus.session_key": spec.session_key,
                      "clawbus.agent_id": spec.agent_id}
        spans.current().set_attributes(attributes)  # the request's (or WS run's) span
        with spans.active(f"publish {subjects.RUNS_STREAM}", kind="producer", attributes={
                **attributes, "messaging.system": "nats", "messaging.operation.type": "send",
                "messaging.destination.name": subject, "messaging.message.id": run_id}):
            headers = {"Nats-Msg-Id": run_id}
            spans.inject(headers)
            return await self._publish_run(subject, payload, headers, as_head_of)

    async def _publish_run(self, subject: str, payload: bytes, headers: dict[str, str],
                           as_head_of: str | None) -> dict[str, Any]:
        """Publish a run. With ``as_head_of`` (its session key) it goes first as its
        session's head, stored only if no other run of the session is (its worker
        then need not check its turn: bus/heads.py), else as it is."""
        if as_head_of is not None:
            try:
                return await self._publish_retrying(subject, payload, heads.as_head(headers))
            except Exception as exc:
                if not heads.not_head(exc):
                    raise
            self._busy.refused(as_head_of, time.monotonic())
            self.round_trip("publish_run")  # (the second publish)
        return await self._publish_retrying(subject, payload, headers)

    async def _publish_retrying(self, subject: str, payload: bytes,
                                headers: dict[str, str]) -> dict[str, Any]:
        """Publish, retrying for up to the queue timeout while the bus is briefly
        unavailable (a NATS node died, a stream leader election): the run id as
        ``Nats-Msg-Id`` makes retrying a publish that did land a no-op."""
        deadline = time.monotonic() + self.bus.queue_timeout_seconds
        while True:
            try:
                return await self._publisher.publish(subject, payload, ack_wait=PUBLISH_TIMEOUT,
                                                     headers=headers)
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
