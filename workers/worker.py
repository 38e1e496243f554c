"""The agent worker: takes runs from the shared ``RUNS`` consumer and executes them.

Scheduling (DESIGN "The run, end to end", steps 2, 3, 6–8):

- The worker fetches at most as many runs as it has free slots
  (``agents.defaults.maxConcurrent``); held runs occupy slots too.
- A run starts only if it is the oldest stored message of its session subject
  *and* the worker wins the session lease. Otherwise the worker holds it (up to
  a quarter of its slots), telling the gateway it is queued, until the
  session's lease is let go (``workers/lease_watch.py``) or handed over by the
  session's run before it here, or a periodic re-check; beyond that it naks
  (``workers/session_turns.py``, which also keeps sessions' history windows).
- While a run executes: ``in_progress`` acks and a fenced lease refresh every
  ``ackWait/3``, liveness probes to the gateway while silent, a per-run timeout,
  and ``cancel.<runId>`` honoured at once.
- SIGTERM (:meth:`Worker.stop`): stop fetching, let in-flight runs finish for
  the grace period, then cancel the rest (naked for a transparent retry on
  another worker if they had streamed nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from bus import heads, subjects
from bus.connection import BUS_UNAVAILABLE, JS_TIMEOUT, ensure_bus, lease_ttl_seconds
from bus.leases import Leases, SessionLease, lease_owner
from bus.messages import RunRequest, Turn, Usage
from bus.nats_adapter import AckedPublisher, LeaderGet, subscribe_direct
from bus.payloads import PAYLOADS_BUCKET, Objects, PayloadMissingError
from bus.pull import PullConsumer
from bus.registry import WorkerWatch, beat_period
from bus.transcripts import StaleTranscriptError, Transcripts, Window
from clawbus import tracing
from clawbus.config import Settings
from clawbus.logs import run_context

from . import errors
from .acceptance import ANNOUNCE_DELAY, Acceptance
from .agent_loop import LoopExceededError, run_agent
from .deferred import Deferred
from .embeddings import embed
from .events import Emitter, RunAbandoned
from .liveness import Liveness
from .metrics import WorkerMetrics
from .providers import make_provider
from .providers.base import Provider, ProviderError
from .run import (
    Reply,
    build_request,
    generate,
    missed_tool_choice,
    unmatched_tool_result,
    with_tool_names,
)
from .session_turns import NAK_DELAY, SessionTurns

if TYPE_CHECKING:
    from .mcp.toolbox import AgentTools

log = logging.getLogger("clawbus.worker")

BUS_RETRY_DELAY = 0.5
# Pull credit is topped up this many runs at a time (bus/pull.py): few enough that
# a credit estimate drifting above the server's cannot starve the worker until
# the silence check notices (a batch of a quarter of a large worker's slots can).
PULL_MIN_BATCH = 16
CANCELLED_MEMORY = 10_000

T = TypeVar("T")
StopReason = Literal["cancelled", "fenced", "abandoned", "superseded", "shutdown", "timeout"]


@dataclass(slots=True)
class Execution:
    """A run being executed: its provider task and why it was stopped, if it was."""

    run_id: str
    task: asyncio.Task[Any] | None = None
    reason: StopReason | None = None
    timeout: float = 0.0
    ended: bool = False  # the attempt is over: its keep-alive must stop

    def stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
        if self.task is not None:
            self.task.cancel()


class Worker:
    def __init__(self, settings: Settings, nc: Client, env: Mapping[str, str] | None = None,
                 *, worker_id: str | None = None, grace_seconds: float = 30.0) -> None:
        self.settings = settings
        self._provider_names: dict[str, str] = {}
        self.nc = nc
        self.env = dict(os.environ if env is None else env)
        self.worker_id = worker_id or (
            f"w-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.grace_seconds = grace_seconds
        self.max_concurrent = settings.agents.defaults.max_concurrent
        self.max_holds = max(1, self.max_concurrent // 4)
        self.metrics = WorkerMetrics()
        self.metrics.active.set_function(lambda: len(self._active))
        self.metrics.held.set_function(lambda: self._turns.holds if self._turns else 0)
        self._owner = lease_owner(self.worker_id)
        self.liveness = Liveness(settings.bus.heartbeat_seconds)
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[str, Execution] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._providers: dict[str, Provider] = {}
        self._system_prompts: dict[str, str] = {}
        self._js: JetStreamContext | None = None
        self._puller: PullConsumer | None = None
        # The worker's one request inbox: JetStream acks, leader gets, probes.
        self._requests = AckedPublisher(nc)
        self._transcripts: Transcripts | None = None
        self._turns: SessionTurns | None = None
        self._payloads: Objects | None = None
        # The agents' MCP tools (SPEC §9), when any agent has some.
        self._tools: AgentTools | None = None
        agents = [settings.agent(agent_id) for agent_id in settings.agent_ids]
        if any(settings.agent_tools(a).mcp_servers for a in agents if a is not None):
            # Imported only then: the MCP SDK is ~100 modules (and ~15 MiB) a worker
            # without agent tools never needs.
            from .mcp.toolbox import AgentTools
            self._tools = AgentTools(settings, self.env, self.metrics)
        self.ready = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------

    def stop(self) -> None:
        """Stop taking work; :meth:`run` then drains and returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve runs until :meth:`stop`, then shut down gracefully."""
        bus = self.settings.bus
        js = await ensure_bus(self.nc, bus, self.settings.session)
        self._js = js
        publisher = self._requests
        await publisher.start()
        self._transcripts = Transcripts(js, self.nc, publisher)
        self._turns = SessionTurns(
            self.nc, Leases(js, lease_ttl_seconds(bus), publisher),
            LeaderGet(publisher, wait=JS_TIMEOUT), self._transcripts, owner=self._owner,
            worker_id=self.worker_id, bus=bus,
            budget=self.settings.session.history_budget_chars, max_holds=self.max_holds,
            metrics=self.metrics, stopping=self._stopping, cancelled=self._cancelled)
        self._payloads = Objects(js, PAYLOADS_BUCKET)
        if self._tools is not None:
            await self._tools.start()  # (a server that fails is retried on use)
        cancel_sub = await self.nc.subscribe(subjects.cancel_all(), cb=self._on_cancel,
                                             pending_msgs_limit=-1, pending_bytes_limit=-1)
        turns = self._turns
        # Handled in the reader, in message order: before any run published after
        # the reset (gateway/sessions.py).
        reset_sub = await subscribe_direct(
            self.nc, subjects.session_resets(),
            lambda msg: turns.reset_seen(subjects.last_token(msg.subject)),
            pending_msgs_limit=-1, pending_bytes_limit=-1)
        # Which workers are alive: alone, this one keeps session leases warm
        # between runs (workers/warm_leases.py).
        workers = WorkerWatch(self.nc, js, bus.heartbeat_seconds, on_lost=self._worker_lost,
                              on_found=self._worker_found)
        await workers.start()
        turns.alone = lambda: workers.alone(self.worker_id)
        turns.warm.liveness = self.liveness
        # Advertised before the first run: gateways know us, and our runs start
        # with a known liveness.
        await self._advertise(await js.key_value(subjects.WORKERS_BUCKET))
        puller = PullConsumer(self.nc, subjects.RUNS_STREAM, subjects.RUNS_CONSUMER,
                              self._take, lambda: self.max_concurrent - len(self._tasks),
                              min_batch=max(1, min(PULL_MIN_BATCH, self.max_concurrent // 4)))
        self._puller = puller
        await puller.start()
        registry = asyncio.create_task(self._registry_loop(js), name="worker-registry")
        log.info("worker %s ready (maxConcurrent=%d)", self.worker_id, self.max_concurrent)
        self.ready.set()
        try:
            await self._stopping.wait()
        finally:
            await puller.stop()
            await self._drain()
            await turns.close()
            await workers.close()
            self._drained.set()
            # The registry ends by itself once drained. Never wait on a cancel
            # alone: Python 3.11's asyncio.wait_for (inside every nats-py
            # request) swallows a cancel that arrives as its reply does, and the
            # worker then never exited on SIGTERM.
            registry.cancel()
            await asyncio.wait({registry}, timeout=10.0)
            await self._deregister(js)
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await reset_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await publisher.close()
            for provider in self._providers.values():
                await provider.aclose()
            if self._tools is not None:
                await self._tools.aclose()
            log.info("worker %s stopped", self.worker_id)

    async def _take(self, msg: Msg) -> None:
        """A run delivered by the pull consumer: one task per run, owned here."""
        if self._stopping.is_set():
            await msg.nak()  # stopping: hand it straight back for another worker
            return
        task = asyncio.create_task(self._serve(msg), name="serve-run")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._puller is not None:
            self._puller.room_changed()
        if not task.cancelled() and task.exception() is not None:
            log.error("run task crashed", exc_info=task.exception())

    async def _wait_either(self, event: asyncio.Event, seconds: float) -> None:
        """Wait for ``event`` or stop(), at most ``seconds`` (or for ``event`` alone
        when it is the drain's end)."""
        waiters = [asyncio.ensure_future(event.wait())]
        if event is not self._drained:
            waiters.append(asyncio.ensure_future(self._stopping.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("draining %d run(s) for up to %.1f s", len(self._tasks), self.grace_seconds)
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace_seconds)
        if pending:
            for execution in list(self._active.values()):
                execution.stop("shutdown")
            await asyncio.wait(pending, timeout=10.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _registry_loop(self, js: JetStreamContext) -> None:
        kv = await js.key_value(subjects.WORKERS_BUCKET)
        period = beat_period(self.settings.bus.heartbeat_seconds)
        # A draining worker goes on advertising itself, marked as draining (it
        # takes no new runs), until its runs are done: it is not dead.
        while not self._drained.is_set():
            await self._advertise(kv)
            await self._wait_either(self._drained, period)

    async def _advertise(self, kv: KeyValue) -> None:
        """Write our registry entry (bus/registry.py): gateways take a worker that
        stops writing it for dead."""
        info = {"id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                "running": len(self._active), "maxConcurrent": self.max_concurrent,
                "draining": self._stopping.is_set(), "ts": time.time()}
        asked = time.monotonic()
        try:
            await kv.put(subjects.session_token(self.worker_id), orjson.dumps(info))
        except Exception as exc:
            log.warning("worker heartbeat failed: %s", exc)
        else:
            self.liveness.wrote(asked)

    async def _deregister(self, js: JetStreamContext) -> None:
        with contextlib.suppress(Exception):
            kv = await js.key_value(subjects.WORKERS_BUCKET)
            await kv.purge(subjects.session_token(self.worker_id))

    # -- bus signals ---------------------------------------------------------

    def _worker_found(self, worker_id: str) -> None:
        if worker_id != self.worker_id and self._turns is not None:
            self._turns.other_worker_found()

    def _worker_lost(self, worker_id: str) -> None:
        # (never our own id: stalled past our own heartbeats, we must not free the
        # leases our running runs hold; their fenced refreshes judge those)
        if worker_id != self.worker_id and self._turns is not None:
            self._turns.worker_lost(worker_id)

    async def _on_cancel(self, msg: Msg) -> None:
        run_id = subjects.last_token(msg.subject)
        self._cancelled[run_id] = None
        while len(self._cancelled) > CANCELLED_MEMORY:
            self._cancelled.popitem(last=False)
        execution = self._active.get(run_id)
        if execution is not None:
            log.info("run %s cancelled by its client", run_id)
            execution.stop("cancelled")

    # -- one run -------------------------------------------------------------

    async def _serve(self, msg: Msg) -> None:
        try:
            run = RunRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            log.error("dropping malformed run message on %s: %s", msg.subject, exc)
            await msg.term()
            return
        if run.payload:
            whole = await self._whole_request(msg, run)
            if whole is None:
                return
            run = whole
        with run_context(run.run_id, run.session_key):
            if tracing.ENABLED:
                await self._traced_serve_run(msg, run)
            else:
                await self._serve_run(msg, run)

    async def _traced_serve_run(self, msg: Msg, run: RunRequest) -> None:
        """:meth:`_serve_run` in the run's CONSUMER span, a child of the gateway's
        publish (its context rides in the message's headers): every attempt of a
        run joins the same trace, ``clawbus.attempt`` telling them apart."""
        spans = tracing.spans()
        # On every span of the attempt (its own may never end: a killed worker's).
        attempt: dict[str, str | int] = {"clawbus.run_id": run.run_id,
                                         "clawbus.attempt": msg.metadata.num_delivered}
        queued_ms = max(0.0, time.time() - run.created) * 1000
        with spans.run_attributes(attempt), spans.active(
                f"run {run.agent_id}", kind="consumer", context=spans.extract(msg.headers),
                attributes={"clawbus.session_key": run.session_key,
                            "clawbus.agent_id": run.agent_id,
                            "messaging.system": "nats", "messaging.operation.type": "process",
                            "messaging.destination.name": msg.subject,
                            "clawbus.queue_wait_ms": round(queued_ms, 3)}):
            await self._serve_run(msg, run)

    async def _whole_request(self, msg: Msg, stub: RunRequest) -> RunRequest | None:
        """A request too large for a bus message, read from the payloads bucket;
        None (the message dropped) when it is gone: its run is over."""
        assert self._payloads is not None
        try:
            return RunRequest.model_validate_json(await self._payloads.get(stub.payload))
        except PayloadMissingError:
            with run_context(stub.run_id, stub.session_key):
                log.info("dropping run: its request is gone (the run ended)")
            await msg.term()
            return None
        except BUS_UNAVAILABLE:
            await msg.nak(delay=NAK_DELAY)
            return None

    async def _serve_run(self, msg: Msg, run: RunRequest) -> None:
        token = subjects.last_token(msg.subject)
        meta = msg.metadata
        emitter = Emitter(self.nc, self._requests, run.events_subject, attempt=meta.num_delivered,
                          streaming=run.stream, liveness=self.liveness,
                          payloads=self._payloads, tool_events=run.tool_events)
        try:
            if run.ephemeral:
                # A gateway-generated stateless session: this is its only run, so
                # there is no order to keep and no lease to take.
                if run.run_id in self._cancelled:
                    await msg.term()
                    return
                await self._execute(msg, run, token, None, emitter)
                return
            assert self._turns is not None
            with tracing.span("session lease"):
                lease = await self._turns.wait(msg, run, token, meta.sequence.stream, emitter,
                                               head=heads.published_as_head(msg.headers))
            if lease is None:
                return
            outcome = ""
            try:
                outcome = await self._execute(msg, run, token, lease, emitter)
            finally:
                await self._turns.pass_on(token, meta.sequence.stream, lease, outcome)
        except Exception as exc:
            if isinstance(exc, BUS_UNAVAILABLE):
                await self._bus_unavailable(msg, emitter, exc)
                return
            if isinstance(exc, MaxPayloadError):
                # Input + reply do not fit one bus message: a limit, not a crash.
                limit = self.nc.max_payload
                log.warning("run failed: its turn exceeds the bus's %d-byte message limit",
                            limit)
                with contextlib.suppress(Exception):
                    await emitter.failed(errors.internal(
                        f"agent turn too large to store (the bus takes at most {limit} "
                        "bytes per message)"))
                with contextlib.suppress(Exception):
                    await msg.term()
                return
            log.exception("run failed inside the worker")
            if tracing.ENABLED:
                tracing.spans().failed(tracing.spans().current(), exc)
            with contextlib.suppress(Exception):
                await emitter.failed(errors.internal("internal worker error"))
            with contextlib.suppress(Exception):
                await msg.term()
        finally:
            await emitter.aclose()

    @staticmethod
    async def _bus_unavailable(msg: Msg, emitter: Emitter, exc: Exception) -> None:
        """JetStream was unavailable for longer than we could wait (a NATS node died,
        a stream leader election). Before the client saw any text the run is handed
        back for a transparent retry (if its turn did get stored, the retry finds it
        in the transcript and reports it done); after, it fails as interrupted."""
        if not emitter.sent_text:
            log.warning("bus unavailable (%r); run handed back for a retry", exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=BUS_RETRY_DELAY)
            return
        log.warning("bus unavailable (%r) after the reply started; run failed", exc)
        with contextlib.suppress(Exception):
            await emitter.failed(errors.interrupted("the message bus was unavailable"))
        with contextlib.suppress(Exception):
            await msg.term()

    async def _execute(self, msg: Msg, run: RunRequest, token: str,
                       lease: SessionLease | None, emitter: Emitter) -> str:
        """Run an attempt; ``lease`` is our session lease (None: ephemeral session),
        left for the caller to pass on. The outcome (``completed``, ``failed``,
        ``cancelled``, ``abandoned``, ``superseded``, ``fenced``, ``requeued``)."""
        execution = Execution(run.run_id)
        self._active[run.run_id] = execution
        started = time.monotonic()
        # The keep-alive's first duty (a lease refresh, an in_progress ack or a
        # liveness probe) is due after min(ackWait/3, heartbeat) at the earliest:
        # a run that ends sooner — most non-streaming calls — never needs its task.
        bus = self.settings.bus
        keeper = Deferred(
            min(bus.ack_wait_seconds / 3, bus.heartbeat_seconds) / 2,
            lambda: self._keep_alive(msg, lease, emitter, execution, started=started),
            "run-keepalive")
        acceptance = Acceptance(
            emitter, self.worker_id, ack=msg.reply,
            on_abandoned=lambda superseded: execution.stop(
                "superseded" if superseded else "abandoned"))
        outcome = "failed"
        try:
            log.debug("run attempt %d started", emitter.attempt)
            await self._announce(run, acceptance)
            outcome = await self._attempt(msg, run, token, lease, emitter,
                                          execution=execution, acceptance=acceptance)
        except RunAbandoned as exc:
            if exc.superseded:  # handed to another worker: its message is theirs now
                outcome = "superseded"
            else:
                outcome = "abandoned"
                await msg.term()
        except ProviderError as exc:
            self.metrics.errors_by(self._provider_name(run), exc.kind).inc()
            if tracing.ENABLED:
                tracing.spans().failed(tracing.spans().current(), exc)
            await emitter.failed(errors.provider_failure(exc))
            await msg.term()
        except LoopExceededError as exc:
            if tracing.ENABLED:
                tracing.spans().failed(tracing.spans().current(), exc)
            await emitter.failed(errors.loop_exceeded(str(exc)))
            await msg.term()
        finally:
            self._active.pop(run.run_id, None)
            execution.ended = True  # (in case the cancel below is swallowed: see run())
            await acceptance.aclose()
            await keeper.aclose()
            self.metrics.runs_by(outcome).inc()
            if tracing.ENABLED:
                tracing.spans().current().set_attribute("clawbus.outcome", outcome)
            log.debug("run attempt %d ended: %s", emitter.attempt, outcome)
        return outcome

    async def _attempt(self, msg: Msg, run: RunRequest, token: str, lease: SessionLease | None,
                       emitter: Emitter, *, execution: Execution,
                       acceptance: Acceptance) -> str:
        """The attempt's phases: read the history window → generate → confirm the
        gateway still wants the run → store the turn and report it done."""
        assert self._turns is not None

        def cancelled() -> bool:
            return run.run_id in self._cancelled

        if run.embed is not None:  # SPEC §11: vectors, and nothing stored
            return await self._embed(msg, run, emitter, execution,
                                     acceptance=acceptance, cancelled=cancelled)
        # Only the turns the history budget lets the agent see are read (or the
        # worker's cached copy of them, when the lease proves it current).
        if lease is None:
            window = Window()
        else:
            with tracing.span("history read"):
                window = await self._turns.window(token, lease)
        if window.last is not None and window.last.run_id == run.run_id:
            # Completed before (the ack was lost): report, never run twice.
            await acceptance.confirm(cancelled)
            await emitter.done(window.last.assistant, window.last.usage, "stop",
                               window.last.tool_calls)
            await msg.ack()
            return "completed"
        unmatched = None if lease is None else unmatched_tool_result(run, window.last)
        if unmatched is not None:
            await emitter.failed(errors.unmatched_tool_result(unmatched))
            await msg.term()
            return "failed"
        if lease is not None:
            run = with_tool_names(run, window.last)
        reply = await self._generate(run, window.turns, emitter, execution)
        if reply is None:
            return await self._stopped(msg, emitter, execution)
        self._observe(run, reply)
        if missed_tool_choice(run, reply):
            await emitter.failed(errors.missed_tool_choice())
            await msg.term()
            return "failed"
        await acceptance.confirm(cancelled)  # nothing is stored for an unwanted run
        return await self._store(msg, run, token, lease=lease, window=window, reply=reply,
                                 emitter=emitter)

    async def _announce(self, run: RunRequest, acceptance: Acceptance) -> None:
        """Tell the gateway a worker took the run. A stateless run defers the
        notice (its first text says as much; see workers/acceptance.py); a leased
        run sends it now, its answer guarding the transcript."""
        if run.ephemeral:
            budget = run.created + self.settings.bus.queue_timeout_seconds - time.time()
            acceptance.announce_later(max(0.0, min(ANNOUNCE_DELAY, budget / 2)))
        else:
            await acceptance.announce_now()

    async def _store(self, msg: Msg, run: RunRequest, token: str, *,
                     lease: SessionLease | None, window: Window, reply: Reply,
                     emitter: Emitter) -> str:
        """Store the turn, then report it done and ack the run; the outcome."""
        assert self._transcripts is not None
        turn = Turn(run_id=run.run_id, agent_id=run.agent_id, user=run.message,
                    assistant=reply.text, ts=time.time(), usage=reply.usage,
                    input=tuple(item.stored() for item in run.input),
                    tool_calls=reply.tool_calls, steps=reply.steps, reply=reply.final_text)
        if lease is None:
            # Ephemeral: nobody can read this session back through the API, so
            # the turn is recorded without waiting for the store's ack.
            with tracing.span("transcript append"):
                await self._transcripts.record(token, turn)
        else:
            # Fencing: only the lease holder may append (and the append itself is
            # conditional on the transcript being as we read it).
            assert self._turns is not None
            try:
                with tracing.span("transcript append"):
                    seq = await self._append(lease, turn, window, emitter)
            except StaleTranscriptError:
                self._turns.unknown(token)
                await emitter.failed(errors.internal(
                    "session changed while the run was in progress; the turn was not saved"))
                await msg.term()
                return "failed"
            except BaseException:
                self._turns.unknown(token)  # stored or not: the next run reads it
                raise
            if seq is None:
                emitter.fenced = True
                return "fenced"
            self._turns.stored(token, window.after(turn, seq))
        await emitter.done(reply.text, reply.usage, reply.finish_reason, reply.tool_calls)
        await msg.ack()
        return "completed"

    async def _append(self, lease: SessionLease, turn: Turn, window: Window,
                      emitter: Emitter) -> int | None:
        """Refresh our lease (None: it was lost, we are fenced), then append the
        turn; its stream sequence. Both are retried while the bus is briefly
        unavailable and the lease cannot have expired yet; a retried append is
        deduplicated by its run id."""
        assert self._transcripts is not None
        refreshed = False
        while True:
            try:
                if not refreshed:
                    if not await lease.refresh():
                        return None
                    emitter.lease_renewed()
                    refreshed = True
                return await self._transcripts.append(lease.token, turn, window.last_seq,
                                                      window)
            except BUS_UNAVAILABLE:
                if time.monotonic() + BUS_RETRY_DELAY >= lease.deadline:
                    raise
                await asyncio.sleep(BUS_RETRY_DELAY)

    async def _generate(self, run: RunRequest, turns: list[Turn], emitter: Emitter,
                        execution: Execution) -> Reply | None:
        """The provider call under the run timeout; None if stopped (see execution.reason)."""
        settings = self.settings
        agent = settings.agent(run.agent_id)
        if agent is None:
            raise ProviderError("failed", f"agent '{run.agent_id}' is not configured here")
        provider_name, _, model = settings.agent_model(agent)
        if run.model:  # x-openclaw-model
            provider_name, _, model = run.model.partition("/")
            if provider_name not in settings.providers:
                raise ProviderError("failed", f"model provider '{provider_name}' is not "
                                    "configured here")
        provider = self._provider(provider_name)
        prompt = self._system_prompts.get(agent.id)
        if prompt is None:  # read once per process (systemPromptFile is a file read)
            prompt = self._system_prompts[agent.id] = settings.agent_system_prompt(agent)
        request = build_request(model, prompt, run, turns)  # (turns fit the budget)
        execution.timeout = settings.agent_timeout(agent)
        agent_tools = await self._tools.tools_for(agent.id) if self._tools is not None else ()
        if agent_tools:
            assert self._tools is not None
            client = {tool.name for tool in request.tools}  # a client's tool wins a clash
            request = dataclasses.replace(request, tools=(
                *request.tools, *(t for t in agent_tools if t.name not in client)))
            work = run_agent(provider, request, emitter, toolbox=self._tools, agent_id=agent.id,
                             run_id=run.run_id,
                             max_rounds=self._tools.limits(agent.id).max_rounds)
        else:
            work = generate(provider, request, emitter)
        return await self._awaited(execution, work)

    async def _awaited(self, execution: Execution, work: Coroutine[Any, Any, T]) -> T | None:
        """``work`` as the execution's task, under its timeout; None if stopped (see
        execution.reason)."""
        task = asyncio.create_task(work, name="generate")
        execution.task = task
        if execution.reason is not None:  # cancelled while we were getting ready
            task.cancel()
        try:
            async with asyncio.timeout(execution.timeout):
                return await task
        except asyncio.CancelledError:
            if execution.reason is None:
                raise  # our own task is being cancelled: propagate
            return None
        except TimeoutError:
            execution.reason = "timeout"
            return None

    async def _embed(self, msg: Msg, run: RunRequest, emitter: Emitter, execution: Execution,
                     *, acceptance: Acceptance, cancelled: Callable[[], bool]) -> str:
        """An embeddings run (workers/embeddings.py): the vectors under the agent's
        run timeout, sent once the gateway still wants them; the outcome."""
        assert run.embed is not None
        agent = self.settings.agent(run.agent_id)
        provider_name, _, model = (run.model or "").partition("/")
        if agent is None or provider_name not in self.settings.providers:
            raise ProviderError("failed", f"embedding model '{run.model}' of agent "
                                f"'{run.agent_id}' is not configured here")
        execution.timeout = self.settings.agent_timeout(agent)
        result = await self._awaited(
            execution, embed(self._provider(provider_name), model, run.embed))
        if result is None:
            return await self._stopped(msg, emitter, execution)
        self.metrics.run_duration_by(provider_name).observe(result.seconds)
        self.metrics.tokens_by(provider_name, "prompt").inc(result.prompt_tokens)
        await acceptance.confirm(cancelled)
        await emitter.embedded(result.vectors, Usage(prompt_tokens=result.prompt_tokens))
        await msg.ack()
        return "completed"

    async def _stopped(self, msg: Msg, emitter: Emitter, execution: Execution) -> str:
        reason = execution.reason
        if reason == "timeout":
            await emitter.failed(errors.run_timeout(execution.timeout))
            await msg.term()
            return "failed"
        if reason == "shutdown":
            if emitter.sent_text:
                await emitter.failed(errors.interrupted("the worker shut down"))
                await msg.term()
                return "failed"
            await msg.nak()  # nothing streamed yet: another worker restarts it
            return "requeued"
        if reason == "fenced":
            emitter.fenced = True
            return "fenced"
        if reason == "abandoned":
            await msg.term()
            return "abandoned"
        if reason == "superseded":
            return "superseded"
        # cancelled by the client, or the gateway is gone
        await msg.term()
        return "cancelled"

    async def _keep_alive(self, msg: Msg, lease: SessionLease | None, emitter: Emitter,
                          execution: Execution, *, started: float) -> None:
        """in_progress acks + fenced lease refresh every ackWait/3, and a liveness
        probe to the gateway every heartbeat interval (also while text flows, so a
        dead gateway is noticed mid-stream)."""
        bus = self.settings.bus
        refresh_every = bus.ack_wait_seconds / 3
        beat_every = bus.heartbeat_seconds
        next_refresh = started + refresh_every
        while not execution.ended:
            now = time.monotonic()
            wake = min(next_refresh, emitter.last_probe + beat_every)
            await asyncio.sleep(max(0.05, wake - now))
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + refresh_every
                try:
                    await msg.in_progress()
                    kept = lease is None or await lease.refresh()
                except Exception as exc:  # the bus is unreachable: try again next round
                    log.warning("lease refresh for run %s failed: %s", execution.run_id, exc)
                    kept = True
                else:
                    if lease is not None and kept:
                        emitter.lease_renewed()
                if not kept:
                    log.warning("run %s lost its session lease; stopping it", execution.run_id)
                    emitter.fenced = True
                    execution.stop("fenced")
                    return
            if now - emitter.last_probe >= beat_every or not emitter.sure:
                try:
                    if emitter.sure:
                        await emitter.heartbeat()
                    else:
                        await emitter.confirm_ours()
                except RunAbandoned as exc:
                    execution.stop("superseded" if exc.superseded else "abandoned")
                    return

    def _provider_name(self, run: RunRequest) -> str:
        """The provider label of a run's agent (settings never change in a process)."""
        if run.model:
            return run.model.partition("/")[0]
        name = self._provider_names.get(run.agent_id)
        if name is None:
            agent = self.settings.agent(run.agent_id)
            name = self.settings.agent_model(agent)[0] if agent is not None else "unknown"
            if len(self._provider_names) < 1024:  # agent ids come from the bus
                self._provider_names[run.agent_id] = name
        return name

    def _observe(self, run: RunRequest, reply: Reply) -> None:
        provider = self._provider_name(run)
        m = self.metrics
        if reply.first_token_seconds is not None:
            m.provider_latency_by(provider).observe(reply.first_token_seconds)
        m.run_duration_by(provider).observe(reply.seconds)
        m.tokens_by(provider, "prompt").inc(reply.usage.prompt_tokens)
        m.tokens_by(provider, "completion").inc(reply.usage.completion_tokens)

    def _provider(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is None:
            cfg = self.settings.providers[name]
            provider = make_provider(cfg, self.settings.provider_api_key(cfg, self.env))
            if tracing.ENABLED:
                from .providers.traced import TracedProvider

                provider = TracedProvider(provider, cfg.api, tracing.spans())
            self._providers[name] = provider
        return provider

