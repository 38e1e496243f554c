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

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal, cast

import httpx
import orjson

from bus.messages import Usage

from .base import Finish, ProviderError, ProviderRequest, StreamItem, TextDelta

# After ``[DONE]``, how long to wait for the (normally already received) end of the
# body so that the connection can go back to the pool instead of being dropped.
_DRAIN_SECONDS = 0.5
_MAX_DETAIL = 500


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
        self._client = httpx.AsyncClient(
            headers=default_headers,
            timeout=httpx.Timeout(timeout_seconds, connect=connect_timeout_seconds),
        )

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
                    raise _status_error(response)
                lines_iter = cast(AsyncGenerator[str, None], response.aiter_lines())
                async with contextlib.aclosing(lines_iter) as lines:
                    async for line in lines:
                        data = _sse_data(line)
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
                        await _drain(lines)
                if not done and not finished:
                    content_type = response.headers.get("content-type", "")
                    raise ProviderError(
                        "bad_response",
                        "upstream stream ended without [DONE] or a finish_reason"
                        + ("" if "event-stream" in content_type
                           else f" (content-type {content_type or 'missing'}, not SSE)"),
                    )
        except httpx.TimeoutException as exc:
            raise ProviderError("timeout", f"upstream timed out: {_describe(exc)}") from exc
        except httpx.HTTPError as exc:
            if responded:
                raise ProviderError(
                    "bad_response", f"upstream stream broke off: {_describe(exc)}"
                ) from exc
            raise ProviderError(
                "unreachable", f"cannot reach {self._url}: {_describe(exc)}"
            ) from exc
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


def _sse_data(line: str) -> str | None:
    """The payload of a ``data:`` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _decode_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderError(
            "bad_response", f"upstream sent a non-JSON SSE event: {data[:_MAX_DETAIL]!r}"
        ) from None
    if not isinstance(chunk, dict):
        raise ProviderError("bad_response", f"upstream sent a non-object event: {data[:100]!r}")
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


async def _drain(lines: AsyncIterator[str]) -> None:
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in lines:
                pass


def _error_detail(envelope: object) -> str | None:
    """``error.message`` of an OpenAI error envelope (or the vLLM / Ollama variants)."""
    if not isinstance(envelope, dict):
        return None
    error = envelope.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:_MAX_DETAIL]
    if isinstance(error, str):
        return error[:_MAX_DETAIL]
    if isinstance(envelope.get("message"), str):
        return str(envelope["message"])[:_MAX_DETAIL]
    return None


def _status_error(response: httpx.Response) -> ProviderError:
    status = response.status_code
    try:
        detail = _error_detail(orjson.loads(response.content))
    except orjson.JSONDecodeError:
        detail = None
    if detail is None:
        detail = response.text.strip()[:_MAX_DETAIL] or response.reason_phrase
    message = f"upstream returned HTTP {status}: {detail}"
    if status in (401, 403):
        return ProviderError("auth", message, status=status)
    if status == 429:
        return ProviderError("rate_limit", message, status=status,
                             retry_after=_retry_after(response.headers))
    return ProviderError("failed", message, status=status)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (delta-seconds or an HTTP date)."""
    with contextlib.suppress(ValueError):
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
