"""``POST /v1/responses`` (OpenResponses, SPEC §10): the chat endpoint's checks in
order, the previous response's session, then one bus run, answered as one
Response object or as its stream of events.

Every response id (also the run id) is recorded on the bus with its session
(:mod:`bus.response_ids`), so ``previous_response_id`` continues it through any
gateway. A request without a session of its own gets a fresh session key, and
its run is not ephemeral: it takes the session's lease and stores its turn like
any session run, so that a continuation finds the turn however soon it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive

from bus.response_ids import ResponseIds, ResponseIdsError, ResponseSession
from clawbus.config import Settings

from . import errors
from .chat import ChatCompletions, checked_body, error_response, failure_error, not_served
from .disconnect import CancelOnDisconnect
from .errors import ApiError
from .metrics import GatewayMetrics
from .openai_format import DONE_FRAME, KEEPALIVE_FRAME
from .responses_format import EventFrames, ResponseOutput, new_id, skeleton
from .responses_request import ResponsesRequest, parse_responses_request, previous_not_found
from .runs import NoWorkerError, RunHandle, RunRejected, RunSpec
from .sequencer import RunEvent
from .sse import SSEResponse

log = logging.getLogger("clawbus.gateway")


class Responses:
    """The endpoint, beside the chat endpoint whose settings, authenticator, run
    client, metrics and image resolver it shares."""

    def __init__(self, chat: ChatCompletions, ids: ResponseIds) -> None:
        self.chat = chat
        self.ids = ids
        self.settings: Settings = chat.settings
        self.config = chat.settings.gateway.http.endpoints.responses

    async def __call__(self, request: Request) -> Response:
        if (refused := not_served(request, self.config.enabled)) is not None:
            return refused
        response_id = new_id("resp")
        try:
            body = await checked_body(request, self.chat.auth, self.config.max_body_bytes)
            req = parse_responses_request(body, request.headers, self.settings)
            session = await self._session(req)
            spec = RunSpec(agent_id=session.agent_id, session_key=session.session_key,
                           message=req.chat.message,
                           extra_system_prompt=req.chat.extra_system_prompt,
                           params=req.chat.params, run_id=response_id, ephemeral=False,
                           stream=req.chat.stream, input=await self.chat.with_images(req.chat),
                           tools=req.chat.tools, tool_choice=req.chat.tool_choice,
                           model=req.chat.upstream_model)
            handle = await self._submit(response_id, session, spec)
        except ApiError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        output = ResponseOutput(skeleton(response_id, int(handle.created), req))
        if req.chat.stream:
            return SSEResponse(
                _sse_frames(handle, output, self.settings.gateway.keepalive_seconds,
                            self.chat.metrics),
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request.receive, handle, output)

    async def _session(self, req: ResponsesRequest) -> ResponseSession:
        """The request's session: its previous response's (400 when unknown or of
        another agent), else the one the request names or was given."""
        agent_id = req.chat.agent_id
        previous = req.previous_response_id
        if previous is None:
            return ResponseSession(req.chat.session_key, agent_id)
        try:
            found = await self.ids.lookup(previous)
        except ResponseIdsError as exc:  # the bus is down: as when a run cannot be queued
            log.warning("%s", exc)
            raise errors.no_worker() from None
        if found is None or found.agent_id != agent_id:
            raise previous_not_found(previous)
        return found

    async def _submit(self, response_id: str, session: ResponseSession,
                      spec: RunSpec) -> RunHandle:
        """Record the response's session (before the run: a client may continue a
        response as soon as its id is streamed), then queue the run."""
        try:
            await self.ids.record(response_id, session)
            return await self.chat.runs.submit(spec)
        except ResponseIdsError as exc:
            log.warning("%s", exc)
            raise errors.no_worker() from None
        except RunRejected as rej:
            if rej.status == 413:
                raise errors.payload_too_large() from None
            raise errors.no_worker() from None

    async def _complete(self, receive: Receive, handle: RunHandle,
                        output: ResponseOutput) -> Response:
        """Wait for the run's end, cancelling it if the client disconnects first.

        The run is awaited in this task (see :class:`CancelOnDisconnect`)."""
        last: RunEvent | None = None
        try:
            async with CancelOnDisconnect(receive) as watch:
                async for event in handle.events():
                    last = event
        except asyncio.CancelledError:  # the server is shutting down
            self.chat.runs.in_background(handle.cancel())
            raise
        except NoWorkerError:
            return error_response(errors.no_worker())
        if watch.disconnected or last is None:  # the client left
            await handle.cancel()
            return Response(status_code=499)
        event = last
        if event.type == "error":
            return error_response(failure_error(event))
        assert event.type == "done"
        output.reconcile(event.text, event.tool_calls)
        _, response = output.finish(event.finish_reason, event.usage)
        return Response(orjson.dumps(response), media_type="application/json")


def _error_code(exc: ApiError) -> str:
    """A failure's code among those a Response's ``error`` may carry."""
    return "rate_limit_exceeded" if exc.status == 429 else "server_error"


async def _sse_frames(handle: RunHandle, output: ResponseOutput, keepalive: float,
                      metrics: GatewayMetrics) -> AsyncGenerator[bytes, None]:
    """The SSE body. SSEResponse cancels this generator when the client disconnects;
    ``finally`` then cancels the run."""
    events = handle.events(keepalive)
    frames = EventFrames()
    metrics.active_streams.inc()
    tail: list[bytes] = []  # the frames that end the stream go out as one write
    try:
        yield frames.state("created", output.response) \
            + frames.state("in_progress", output.response)
        try:
            async for event in events:
                if event.type == "heartbeat":
                    yield KEEPALIVE_FRAME
                elif event.type == "delta":
                    yield frames(output.text(event.text))
                elif event.type == "tool_delta":
                    yield frames(output.tool_calls(event.calls))
                elif event.type == "done":
                    tail.append(frames(output.reconcile(event.text, event.tool_calls)))
                    closing, response = output.finish(event.finish_reason, event.usage)
                    tail.append(frames(closing))
                    tail.append(frames.state(response["status"], response))
                    break
                elif event.type == "error":
                    exc = failure_error(event)
                    tail.append(frames.state("failed",
                                             output.failed(_error_code(exc), exc.message)))
                    break
        except NoWorkerError:
            exc = errors.no_worker()
            tail.append(frames.state("failed", output.failed(_error_code(exc), exc.message)))
        tail.append(DONE_FRAME)
        yield b"".join(tail)
    finally:
        metrics.active_streams.dec()
        await handle.cancel()
        with contextlib.suppress(BaseException):
            await events.aclose()
