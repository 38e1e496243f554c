"""``openai-completions``: any OpenAI-compatible ``POST {baseUrl}/chat/completions``.

Works against OpenAI, vLLM, Ollama, llama.cpp, LM Studio and the like. The request
always streams (``stream: true`` with ``stream_options.include_usage``); the SSE
reply is parsed line by line into :class:`TextDelta` items and one :class:`Finish`.
One ``httpx.AsyncClient`` (and so one connection pool) is shared by all runs.

The HTTP response lives inside ``async with client.stream(...)``: when the consumer
is cancelled or closes the generator, the connection is closed at once, so the
upstream sees the disconnect and stops generating.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any, Literal, cast

import httpx
import orjson

from bus.messages import Usage

from .base import Finish, ProviderError, ProviderRequest, StreamItem, TextDelta
from .http_stream import (
    MAX_DETAIL,
    decode_event,
    drain,
    incomplete_stream,
    make_client,
    sse_data,
    status_error,
    transport_error,
)


class OpenAICompletionsProvider:
    def __init__(self, base_url: str, api_key: str | None, headers: dict[str, str],
                 timeout_seconds: float, connect_timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._url = f"{self.base_url}/chat/completions"
        default_headers = httpx.Headers({
            "accept": "text/event-stream",
            "content-type": "application/json",
        })
        if api_key:
            default_headers["authorization"] = f"Bearer {api_key}"
        default_headers.update(headers)  # configured headers win (case-insensitively)
        self._client = make_client(default_headers, timeout_seconds, connect_timeout_seconds)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        reason: Literal["stop", "length"] = "stop"
        usage = Usage()
        finished = done = False
        responded = False
        try:
            async with self._client.stream(
                "POST", self._url, content=orjson.dumps(_request_body(request))
            ) as response:
                responded = True
                if response.status_code >= 400:
                    await response.aread()
                    raise status_error(response, _error_detail)
                lines_iter = cast(AsyncGenerator[str, None], response.aiter_lines())
                async with contextlib.aclosing(lines_iter) as lines:
                    async for line in lines:
                        data = sse_data(line)
                        if data is None:
                            continue
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = _decode_chunk(data)
                        choices = chunk.get("choices")
                        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                            choice = choices[0]
                            delta = choice.get("delta")
                            text = delta.get("content") if isinstance(delta, dict) else None
                            if isinstance(text, str) and text:
                                yield TextDelta(text)
                            finish_reason = choice.get("finish_reason")
                            if isinstance(finish_reason, str) and finish_reason:
                                finished = True
                                reason = "length" if finish_reason == "length" else "stop"
                        usage = _usage(chunk.get("usage")) or usage
                    if done:
                        await drain(lines)
                if not done and not finished:
                    raise incomplete_stream(response, "[DONE] or a finish_reason")
        except httpx.HTTPError as exc:
            raise transport_error(exc, responded=responded, url=self._url) from exc
        yield Finish(reason=reason, usage=usage)


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


def _decode_chunk(data: str) -> dict[str, Any]:
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
