"""``openai-completions``: any OpenAI-compatible ``POST {baseUrl}/chat/completions``.

Works against OpenAI, vLLM, Ollama, llama.cpp, LM Studio and the like. The request
always streams (``stream: true`` with ``stream_options.include_usage``); the SSE
reply is parsed into one :class:`TextDelta` per network read (the text of every
event that arrived together) and one :class:`Finish`.
One pooled :class:`~.http_client.HTTPClient` is shared by all runs (it connects
on the first request).

When the consumer is cancelled or closes the generator mid-stream, the response's
connection is closed at once (never returned to the pool half-read), so the upstream
sees the disconnect and stops generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Literal

import orjson

from bus.messages import Usage

from .base import Finish, ProviderError, ProviderRequest, StreamItem, TextDelta
from .http_client import HTTPError, Response
from .http_stream import (
    MAX_DETAIL,
    SSELines,
    decode_event,
    drain,
    env_proxy,
    finish_response,
    incomplete_stream,
    request_headers,
    status_error,
    transport_error,
    upstream_client,
)


class OpenAICompletionsProvider:
    def __init__(self, base_url: str, api_key: str | None, headers: dict[str, str],
                 timeout_seconds: float, connect_timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._url = f"{self.base_url}/chat/completions"
        defaults = {"accept": "text/event-stream", "content-type": "application/json"}
        if api_key:
            defaults["authorization"] = f"Bearer {api_key}"
        # configured headers win (case-insensitively)
        self._client = upstream_client(request_headers(defaults, headers), timeout_seconds,
                                       connect_timeout_seconds, env_proxy(self._url))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        state = _StreamState()
        body = orjson.dumps(_request_body(request))
        response: Response | None = None
        try:
            response = await self._client.post(self._url, body)
            if response.status >= 400:
                raise status_error(response, await response.read(), _error_detail)
            lines = SSELines(response)
            while not state.done and (batch := await lines.read()) is not None:
                # One TextDelta per network read, not per SSE event: what arrived
                # together travels together (a generator round trip per SSE event
                # costs more than the parsing).
                text, failure = _parse_batch(batch, state)
                # Nothing of this read outlives it while the next one is awaited
                # (with thousands of streams waiting, what a generator frame keeps
                # between tokens is what every young collection walks).
                del batch
                if text:
                    yield TextDelta(text)
                if failure is not None:
                    raise failure
            if state.done:
                await drain(lines)
            elif not state.finished:
                raise incomplete_stream(response, "[DONE] or a finish_reason")
        except HTTPError as exc:
            raise transport_error(exc, responded=response is not None, url=self._url) from exc
        finally:
            if response is not None:
                finish_response(response)
        yield Finish(reason=state.reason, usage=state.usage)


class _StreamState:
    """What one reply's events said so far."""

    __slots__ = ("done", "finished", "reason", "usage")

    def __init__(self) -> None:
        self.done = False  # [DONE] seen
        self.finished = False  # a finish_reason seen
        self.reason: Literal["stop", "length"] = "stop"
        self.usage = Usage()


def _parse_batch(batch: list[bytes], state: _StreamState) -> tuple[str, ProviderError | None]:
    """The text of one read's SSE lines, and the error one of them reported (after
    the text that came before it). The per-event work is inlined (one event per
    token): the helpers run only for what is not a plain JSON object chunk."""
    pieces: list[str] = []
    for line in batch:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            state.done = True
            break
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict) or chunk.get("error"):
            try:  # says what is wrong, or recovers invalid UTF-8
                chunk = _decode_chunk(data)
            except ProviderError as exc:
                return "".join(pieces), exc
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                pieces.append(text)
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str) and finish_reason:
                state.finished = True
                state.reason = "length" if finish_reason == "length" else "stop"
        raw_usage = chunk.get("usage")
        if raw_usage is not None:
            state.usage = _usage(raw_usage) or state.usage
    return "".join(pieces), None


def _request_body(request: ProviderRequest) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.extend({"role": m.role, "content": m.content} for m in request.messages)
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    params = request.params.model_dump(exclude_none=True)
    if "stop" in params:
        params["stop"] = list(params["stop"])
    body.update(params)
    return body


def _decode_chunk(data: bytes) -> dict[str, Any]:
    chunk = decode_event(data)
    if chunk.get("error"):
        raise ProviderError(
            "bad_response", f"upstream reported an error mid-stream: {_error_detail(chunk)}"
        )
    return chunk


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
    )


def _error_detail(envelope: object) -> str | None:
    """``error.message`` of an OpenAI error envelope (or the vLLM / Ollama variants)."""
    if not isinstance(envelope, dict):
        return None
    error = envelope.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:MAX_DETAIL]
    if isinstance(error, str):
        return error[:MAX_DETAIL]
    if isinstance(envelope.get("message"), str):
        return str(envelope["message"])[:MAX_DETAIL]
    return None
