"""``POST /v1/chat/completions``: the SPEC §2 checks in order, then one bus run,
answered as one JSON completion or as an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive

from bus.messages import ChatItem, ToolCallChunk
from clawbus.config import Settings

from . import errors, openai_format
from .auth import Authenticator
from .chat_request import ChatRequest, parse_chat_request
from .disconnect import CancelOnDisconnect
from .errors import ApiError
from .images import ImageResolver, image_source
from .metrics import GatewayMetrics
from .runs import NoWorkerError, RunClient, RunHandle, RunRejected, RunSpec
from .sequencer import RunEvent
from .sse import SSEResponse


def error_response(exc: ApiError) -> Response:
    return Response(orjson.dumps(exc.envelope()), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise errors.payload_too_large()
        except ValueError:
            raise errors.invalid_request("Invalid Content-Length header.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.payload_too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> object:
    if not body.strip():
        return {}
    try:
        value: object = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise errors.invalid_request("Request body must be a JSON object.")
    return value


def not_served(request: Request, enabled: bool) -> Response | None:
    """What a JSON POST endpoint answers before any other check: 404 (plain text)
    when it is off, 405 for any method but POST; None to go on."""
    if not enabled:
        return PlainTextResponse("Not Found", status_code=404)
    if request.method != "POST":
        return error_response(ApiError(405, "Method Not Allowed", errors.INVALID_REQUEST,
                                       headers={"Allow": "POST"}))
    return None


async def checked_body(request: Request, auth: Authenticator, limit: int) -> object:
    """The next checks, in SPEC order: auth (401/429), size (413), JSON (400);
    the parsed body. Raises ApiError, or ClientDisconnect while reading."""
    auth.check(request.headers.get("authorization"),
               request.client.host if request.client else None)
    return parse_json(await read_body(request, limit))


def failure_error(event: RunEvent) -> ApiError:
    assert event.type == "error"
    exc = errors.from_run_failure(event.status, event.error_type, event.message, event.code)
    if event.retry_after:
        exc.headers["Retry-After"] = str(max(1, round(event.retry_after)))
    return exc


class ChatCompletions:
    """The endpoint, bound to one gateway's settings, authenticator and run client."""

    def __init__(self, settings: Settings, auth: Authenticator, runs: RunClient,
                 metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.auth = auth
        self.runs = runs
        self.metrics = metrics
        self.config = settings.gateway.http.endpoints.chat_completions
        self.images = ImageResolver(self.config.images)

    async def aclose(self) -> None:
        await self.images.aclose()

    async def with_images(self, chat: ChatRequest) -> tuple[ChatItem, ...]:
        """The request's input with its images resolved (data URIs checked, URLs
        fetched): raises ApiError (400) naming the first bad part."""
        if not chat.images:
            return chat.input
        parts = await self.images.resolve([image_source(ref.part, ref.where)
                                           for ref in chat.images])
        items = list(chat.input)
        for ref, part in zip(chat.images, parts, strict=True):
            items[ref.item] = items[ref.item].model_copy(
                update={"images": (*items[ref.item].images, part)})
        return tuple(items)

    async def __call__(self, request: Request) -> Response:
        if (refused := not_served(request, self.config.enabled)) is not None:
            return refused
        try:
            body = await checked_body(request, self.auth, self.config.max_body_bytes)
            chat = parse_chat_request(body, request.headers, self.settings)
            spec = RunSpec(agent_id=chat.agent_id, session_key=chat.session_key,
                           message=chat.message, extra_system_prompt=chat.extra_system_prompt,
                           params=chat.params, ephemeral=chat.ephemeral_session,
                           stream=chat.stream, input=await self.with_images(chat),
                           tools=chat.tools, tool_choice=chat.tool_choice,
                           model=chat.upstream_model)
            try:
                handle = await self.runs.submit(spec)
            except RunRejected as rej:
                if rej.status == 413:
                    raise errors.payload_too_large() from None
                raise errors.no_worker() from None
        except ApiError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        if chat.stream:
            return self._stream(request, chat, handle)
        return await self._complete(request.receive, chat, handle)

    async def _complete(self, receive: Receive, chat: ChatRequest, handle: RunHandle) -> Response:
        """Wait for the run's end, cancelling it if the client disconnects first.

        The run is awaited in this task (see :class:`CancelOnDisconnect`)."""
        created = int(handle.created)
        event: RunEvent | None = None
        try:
            async with CancelOnDisconnect(receive):
                event = await _last_event(handle)
        except asyncio.CancelledError:  # the server is shutting down
            self.runs.in_background(handle.cancel())
            raise
        except NoWorkerError:
            return error_response(errors.no_worker())
        if event is None:  # the client left
            await handle.cancel()
            return Response(status_code=499)
        if event.type == "error":
            return error_response(failure_error(event))
        assert event.type == "done"
        body = openai_format.completion(handle.run_id, created, chat.model, text=event.text,
                                        usage=event.usage, finish_reason=event.finish_reason,
                                        tool_calls=event.tool_calls)
        return Response(body, media_type="application/json")

    def _stream(self, request: Request, chat: ChatRequest, handle: RunHandle) -> Response:
        encoder = openai_format.ChunkEncoder(handle.run_id, int(handle.created), chat.model)
        keepalive = self.settings.gateway.keepalive_seconds
        return SSEResponse(
            _sse_frames(handle, encoder, chat.include_usage, keepalive, self.metrics),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _last_event(handle: RunHandle) -> RunEvent:
    last: RunEvent | None = None
    async for event in handle.events():
        last = event
    assert last is not None
    return last


async def _sse_frames(handle: RunHandle, encoder: openai_format.ChunkEncoder,
                      include_usage: bool, keepalive: float,
                      metrics: GatewayMetrics) -> AsyncGenerator[bytes, None]:
    """The SSE body. SSEResponse cancels this generator when the client disconnects;
    ``finally`` then cancels the run."""
    events = handle.events(keepalive)
    metrics.active_streams.inc()
    # The frames that end the stream travel as one, ending with [DONE] (one write,
    # and SSEResponse ends the body with it).
    tail: list[bytes] = []
    try:
        yield encoder.role()
        try:
            async for event in events:
                if event.type == "heartbeat":
                    yield openai_format.KEEPALIVE_FRAME
                elif event.type == "delta":
                    yield encoder.content(event.text)
                elif event.type == "tool_delta":
                    yield encoder.tool_calls(event.calls)
                elif event.type == "done":
                    if not handle.streamed:  # the reply comes whole (a non-streaming run)
                        if event.text:
                            tail.append(encoder.content(event.text))
                        if event.tool_calls:
                            tail.append(encoder.tool_calls(tuple(
                                ToolCallChunk(index=i, id=c.id, name=c.name,
                                              arguments=c.arguments)
                                for i, c in enumerate(event.tool_calls))))
                    tail.append(encoder.finish(event.finish_reason))
                    if include_usage:
                        tail.append(encoder.usage(event.usage))
                    break
                elif event.type == "error":
                    tail.append(encoder.error(failure_error(event).envelope()))
                    break
        except NoWorkerError:
            tail.append(encoder.error(errors.no_worker().envelope()))
        tail.append(openai_format.DONE_FRAME)
        yield b"".join(tail)
    finally:
        metrics.active_streams.dec()
        await handle.cancel()
        with contextlib.suppress(BaseException):
            await events.aclose()
