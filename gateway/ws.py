"""The OpenClaw gateway WebSocket protocol (SPEC §4), on the HTTP port at ``/``.

Frames are JSON text: ``req {id, method, params}`` from the client, ``res {id,
ok, payload|error}`` and ``event {event, payload, seq}`` from the server. The
server speaks first (``connect.challenge``); the client's first request must be
``connect`` with valid auth, else the socket is closed with 1008.

Every ``agent`` run goes through the same :class:`~gateway.runs.RunClient` as
HTTP, and its ``images`` through the chat endpoint's
:class:`~gateway.images.ImageResolver` (same limits and URL policy). Several
runs may be in flight per socket; closing the socket cancels them. All frames
leave through one bounded outbox drained by one writer task: a client that stops
reading is disconnected instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from bus.messages import ToolEvent
from clawbus import tracing
from clawbus.config import Settings

from . import errors
from .agent_turn import agent_turn, image_sources, with_images
from .auth import Authenticator
from .chat import failure_error
from .chat_request import MAX_SESSION_KEY
from .errors import ApiError
from .images import ImageResolver
from .runs import NoWorkerError, RunClient, RunHandle, RunRejected, RunSpec
from .sessions import Sessions

if TYPE_CHECKING:
    from clawbus.spans import Context, Span

log = logging.getLogger("clawbus.gateway.ws")

PROTOCOL_VERSION = 3
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
CONNECT_TIMEOUT = 10.0
OUTBOX_FRAMES = 1024
MAX_RUNS_PER_SOCKET = 64
SERVER_NAME = "clawbus"
METHODS = ("health", "agents.list", "agent", "chat.abort", "sessions.list", "chat.history",
           "sessions.reset")
EVENTS = ("connect.challenge", "agent")  # only what this server actually sends
# A client that sends this in connect's `caps` also gets the agent's tool steps
# as `event agent {stream: "tool"}`.
TOOL_EVENTS_CAP = "tool-events"


def tool_event_data(event: ToolEvent) -> dict[str, Any]:
    """The ``data`` of a ``stream: "tool"`` agent event (SPEC §9)."""
    if event.phase == "start":
        return {"phase": "start", "name": event.name, "toolCallId": event.call_id,
                "args": event.args}
    return {"phase": "result", "name": event.name, "toolCallId": event.call_id,
            "isError": event.is_error, "result": event.result}

Handler = Callable[[Any], Awaitable[dict[str, Any]]]


class ProtocolError(Exception):
    """A frame the server cannot act on; answered with an error ``res``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_body(exc: ApiError) -> dict[str, Any]:
    """WS errors carry the same fields as the HTTP envelope, plus ``code``."""
    code = exc.code or exc.type
    return {"code": code, "message": exc.message, "type": exc.type, "status": exc.status}


class Connection:
    """One WebSocket client."""

    def __init__(self, ws: WebSocket, settings: Settings, *, auth: Authenticator,
                 runs: RunClient, sessions: Sessions, images: ImageResolver,
                 health: Callable[[], Awaitable[dict[str, Any]]],
                 trace_context: Context | None = None) -> None:
        self.ws = ws
        # The trace the upgrade request continued (tracing on): its `agent` runs join it.
        self.trace_context = trace_context
        self.settings = settings
        self.auth = auth
        self.runs = runs
        self.images = images
        self.sessions = sessions
        self.health = health
        self.conn_id = uuid.uuid4().hex
        self.tool_events = False  # the client asked for tool steps (connect caps)
        self._seq = 0
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue(OUTBOX_FRAMES)
        self._run_tasks: dict[str, asyncio.Task[None]] = {}
        self._handles: dict[str, RunHandle] = {}
        self._aborted: set[str] = set()
        self._closing = False
        self._handlers: dict[str, Handler] = {
            "health": self._health, "agents.list": self._agents_list, "agent": self._agent,
            "chat.abort": self._abort, "sessions.list": self._sessions_list,
            "chat.history": self._history, "sessions.reset": self._reset,
        }

    # -- sending ---------------------------------------------------------------

    def _send(self, frame: dict[str, Any]) -> None:
        if self._closing:
            return
        try:
            self._outbox.put_nowait(orjson.dumps(frame))
        except asyncio.QueueFull:
            log.warning("ws %s: client not reading; closing", self.conn_id)
            self._closing = True
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(None)

    def event(self, name: str, payload: dict[str, Any]) -> None:
        self._seq += 1
        self._send({"type": "event", "event": name, "payload": payload, "seq": self._seq})

    def res_ok(self, req_id: Any, payload: dict[str, Any]) -> None:
        self._send({"type": "res", "id": req_id, "ok": True, "payload": payload})

    def res_error(self, req_id: Any, error: dict[str, Any]) -> None:
        self._send({"type": "res", "id": req_id, "ok": False, "error": error})

    async def _writer(self) -> None:
        while True:
            data = await self._outbox.get()
            if data is None:
                await self.ws.close(TRY_AGAIN_LATER, "client too slow")
                return
            await self.ws.send_text(data.decode())

    # -- lifecycle -------------------------------------------------------------

    async def serve(self) -> None:
        await self.ws.accept()
        writer = asyncio.create_task(self._writer(), name="ws-writer")
        try:
            self.event("connect.challenge", {"nonce": secrets.token_urlsafe(16),
                                             "ts": int(time.time() * 1000)})
            if await self._handshake():
                await self._read_loop(writer)
        except WebSocketDisconnect:
            pass
        finally:
            self._closing = True
            for handle in list(self._handles.values()):
                await handle.cancel()
            for task in list(self._run_tasks.values()):
                task.cancel()
            await asyncio.gather(*self._run_tasks.values(), return_exceptions=True)
            if not writer.done():
                # Let queued frames (e.g. a final error res) go out, then stop.
                with contextlib.suppress(asyncio.QueueFull):
                    self._outbox.put_nowait(None)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(writer)
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _close(self, code: int, reason: str) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    async def _handshake(self) -> bool:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                text = await self.ws.receive_text()
        except TimeoutError:
            await self._flush_and_close(POLICY_VIOLATION, "connect timeout")
            return False
        except (KeyError, RuntimeError):  # a binary frame
            await self._flush_and_close(POLICY_VIOLATION, "first frame must be a connect request")
            return False
        frame = _parse(text)
        if not (isinstance(frame, dict) and frame.get("type") == "req"
                and frame.get("method") == "connect"):
            await self._flush_and_close(POLICY_VIOLATION, "first frame must be a connect request")
            return False
        params = frame.get("params")
        if not isinstance(params, dict):
            params = {}
        lo, hi = params.get("minProtocol", PROTOCOL_VERSION), params.get(
            "maxProtocol", PROTOCOL_VERSION)
        if not (isinstance(lo, int) and isinstance(hi, int) and lo <= PROTOCOL_VERSION <= hi):
            self.res_error(frame.get("id"), {"code": "PROTOCOL_MISMATCH",
                                             "message": f"server speaks protocol "
                                                        f"{PROTOCOL_VERSION}"})
            await self._flush_and_close(POLICY_VIOLATION, "protocol mismatch")
            return False
        auth = params.get("auth")
        presented = None
        if isinstance(auth, dict):
            value = auth.get("token") or auth.get("password")
            presented = value if isinstance(value, str) else None
        caps = params.get("caps")
        self.tool_events = isinstance(caps, list) and TOOL_EVENTS_CAP in caps
        client = self.ws.client.host if self.ws.client else None
        try:
            self.auth.verify_secret(presented, client)
        except ApiError as exc:
            self.res_error(frame.get("id"), error_body(exc))
            await self._flush_and_close(POLICY_VIOLATION, exc.message[:100])
            return False
        self.res_ok(frame.get("id"), {
            "type": "hello-ok", "protocol": PROTOCOL_VERSION,
            "server": {"name": SERVER_NAME, "connId": self.conn_id},
            "features": {"methods": list(METHODS), "events": list(EVENTS)},
        })
        return True

    async def _flush_and_close(self, code: int, reason: str) -> None:
        """Send what is queued (the error res), then close."""
        while not self._outbox.empty():
            data = self._outbox.get_nowait()
            if data is not None:
                with contextlib.suppress(Exception):
                    await self.ws.send_text(data.decode())
        await self._close(code, reason)

    async def _read_loop(self, writer: asyncio.Task[None]) -> None:
        while not self._closing and not writer.done():
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.res_error(None, {"code": "INVALID_REQUEST",
                                      "message": "frames must be JSON text"})
                continue
            frame = _parse(text)
            if not isinstance(frame, dict) or frame.get("type") != "req":
                self.res_error(frame.get("id") if isinstance(frame, dict) else None,
                               {"code": "INVALID_REQUEST",
                                "message": "expected {type: 'req', id, method, params}"})
                continue
            req_id = frame.get("id")
            method = frame.get("method")
            handler = self._handlers.get(method) if isinstance(method, str) else None
            if handler is None:
                self.res_error(req_id, {"code": "UNKNOWN_METHOD",
                                        "message": f"unknown method {method!r}"})
                continue
            try:
                self.res_ok(req_id, await handler((req_id, frame.get("params"))))
            except ApiError as exc:
                self.res_error(req_id, error_body(exc))
            except ProtocolError as exc:
                self.res_error(req_id, {"code": exc.code, "message": exc.message})
            except Exception:
                log.exception("ws method %s failed", method)
                self.res_error(req_id, {"code": "INTERNAL", "message": "internal error"})

    # -- methods ---------------------------------------------------------------

    async def _health(self, arg: Any) -> dict[str, Any]:
        return await self.health()

    async def _agents_list(self, arg: Any) -> dict[str, Any]:
        settings = self.settings
        agents = []
        for agent_id in settings.agent_ids:
            agent = settings.agent(agent_id)
            assert agent is not None
            agents.append({"id": agent_id, "default": agent_id == settings.default_agent_id,
                           "model": agent.model or settings.agents.defaults.model})
        return {"agents": agents, "defaultId": settings.default_agent_id}

    async def _agent(self, arg: Any) -> dict[str, Any]:
        req_id, params = arg
        spec = dataclasses.replace(agent_turn(params, self.settings),
                                   tool_events=self.tool_events)
        if len(self._run_tasks) >= MAX_RUNS_PER_SOCKET:
            raise ApiError(429, f"at most {MAX_RUNS_PER_SOCKET} runs per connection",
                           "rate_limit_error", "too_many_runs")
        sources = image_sources(params)
        if sources:
            spec = with_images(spec, await self.images.resolve(sources))
        span = tracing.spans().start(
            "agent", kind="server", context=self.trace_context,
            attributes={"rpc.method": "agent", "clawbus.agent_id": spec.agent_id,
                        "clawbus.session_key": spec.session_key}) if tracing.ENABLED else None
        try:
            handle = await self._submit(spec, span)
        except RunRejected as rej:
            if span is not None:
                tracing.spans().failed(span, rej)
                span.end()
            raise errors.no_worker() if rej.status != 413 else errors.payload_too_large() \
                from None
        self._handles[handle.run_id] = handle
        task = asyncio.create_task(self._follow(req_id, handle, span), name="ws-run")
        self._run_tasks[handle.run_id] = task
        return {"runId": handle.run_id, "status": "accepted", "sessionKey": spec.session_key,
                "agentId": spec.agent_id, "acceptedAt": int(handle.created * 1000)}

    async def _submit(self, spec: RunSpec, span: Span | None) -> RunHandle:
        """The run submitted, inside ``span`` (its trace) when tracing."""
        if span is None:
            return await self.runs.submit(spec, door="ws")
        token = tracing.spans().attach(span)
        try:
            return await self.runs.submit(spec, door="ws")
        finally:
            tracing.spans().detach(token)

    async def _follow(self, req_id: Any, handle: RunHandle, span: Span | None = None) -> None:
        """Stream one run's events, then answer the second ``res``; ``span`` (the
        run's, when tracing) ends with it."""
        run_id = handle.run_id
        seq = 0

        def agent_event(stream: str, data: dict[str, Any]) -> None:
            nonlocal seq
            seq += 1
            self.event("agent", {"runId": run_id, "seq": seq, "stream": stream, "data": data})

        try:
            async for event in handle.events():
                if event.type == "heartbeat":
                    continue
                if event.type == "accepted":
                    agent_event("lifecycle", {"phase": "start"})
                elif event.type == "delta":
                    agent_event("assistant", {"delta": event.text})
                elif event.type == "tool":
                    if self.tool_events:  # only for clients that asked (caps)
                        agent_event("tool", tool_event_data(event))
                elif event.type == "tool_delta":
                    continue  # (a WS turn declares no client tools)
                elif event.type == "done":
                    usage = {"prompt_tokens": event.usage.prompt_tokens,
                             "completion_tokens": event.usage.completion_tokens,
                             "total_tokens": event.usage.total_tokens}
                    agent_event("lifecycle", {"phase": "end",
                                              "finishReason": event.finish_reason})
                    self.res_ok(req_id, {"runId": run_id, "status": "ok",
                                         "result": {"text": event.text, "usage": usage,
                                                    "finishReason": event.finish_reason}})
                else:
                    exc = failure_error(event)
                    agent_event("lifecycle", {"phase": "error", "error": error_body(exc)})
                    self.res_error(req_id, {**error_body(exc), "runId": run_id})
                    if span is not None:
                        tracing.spans().failed(span, description=exc.message)
        except NoWorkerError:
            if span is not None:
                tracing.spans().failed(span, description="no worker")
            exc = errors.no_worker()
            agent_event("lifecycle", {"phase": "error", "error": error_body(exc)})
            self.res_error(req_id, {**error_body(exc), "runId": run_id})
        except asyncio.CancelledError:
            if run_id in self._aborted:
                agent_event("lifecycle", {"phase": "aborted"})
                self.res_error(req_id, {"code": "ABORTED", "message": "run aborted",
                                        "runId": run_id})
            raise
        finally:
            if span is not None:
                span.end()
            self._aborted.discard(run_id)
            self._handles.pop(run_id, None)
            self._run_tasks.pop(run_id, None)

    async def _abort(self, arg: Any) -> dict[str, Any]:
        _, params = arg
        run_id = params.get("runId") if isinstance(params, dict) else None
        if not isinstance(run_id, str) or not run_id:
            raise errors.invalid_request("`runId` must be a non-empty string.")
        handle = self._handles.get(run_id)
        if handle is None:
            return {"runId": run_id, "aborted": False}
        self._aborted.add(run_id)
        await handle.cancel()
        task = self._run_tasks.get(run_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return {"runId": run_id, "aborted": True}

    async def _sessions_list(self, arg: Any) -> dict[str, Any]:
        return {"sessions": [s.as_dict() for s in await self.sessions.summaries()]}

    def _session_key(self, params: Any) -> str:
        key = params.get("sessionKey") if isinstance(params, dict) else None
        if not isinstance(key, str) or not key.strip():
            raise errors.invalid_request("`sessionKey` must be a non-empty string.")
        if len(key.strip()) > MAX_SESSION_KEY:
            raise errors.invalid_request(
                f"`sessionKey` is longer than {MAX_SESSION_KEY} characters.")
        return key.strip()

    async def _history(self, arg: Any) -> dict[str, Any]:
        _, params = arg
        key = self._session_key(params)
        limit = params.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 0):
            raise errors.invalid_request("`limit` must be a non-negative integer.")
        return {"sessionKey": key, "messages": await self.sessions.history(key, limit)}

    async def _reset(self, arg: Any) -> dict[str, Any]:
        _, params = arg
        key = self._session_key(params)
        await self.sessions.reset(key)
        return {"sessionKey": key, "reset": True}


def _parse(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
