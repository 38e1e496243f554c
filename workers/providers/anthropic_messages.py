"""``anthropic-messages``: the Anthropic Messages API, ``POST {baseUrl}/messages``.

The request always streams (``stream: true``). The system prompt goes in the
top-level ``system`` field; blank messages are dropped and consecutive messages of the
same role merged, so the API's user/assistant alternation always holds;
``max_tokens`` (required by the API) defaults to :data:`DEFAULT_MAX_TOKENS`.
OpenAI-only sampling parameters (``frequency_penalty``, ``presence_penalty``, ``seed``)
are not sent.

The SSE reply is a sequence of typed events (``message_start``,
``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``,
``message_stop``, ``ping``, ``error``); text deltas become :class:`TextDelta` items
and the stream ends with one :class:`Finish` once ``message_stop`` arrives.

As in ``openai-completions``, one pooled HTTP client is shared by all runs,
and cancelling or closing the generator mid-stream closes the response's connection
at once, so the upstream stops generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Literal

import orjson

from bus.messages import Usage

from .base import (
    ChatMessage,
    Finish,
    ProviderError,
    ProviderRequest,
    StreamItem,
    TextDelta,
)
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
    sse_field,
    sse_payload,
    status_error,
    transport_error,
    upstream_client,
)

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
# HTTP statuses reported as rate_limit; 529 is Anthropic's "overloaded".
_RATE_LIMIT_STATUSES = frozenset({429, 529})
# Stop reasons meaning "cut short", reported as finish reason "length".
_LENGTH_STOP_REASONS = frozenset({"max_tokens", "model_context_window_exceeded"})


class AnthropicMessagesProvider:
    def __init__(self, base_url: str, api_key: str | None, headers: dict[str, str],
                 timeout_seconds: float, connect_timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._url = f"{self.base_url}/messages"
        defaults = {
            "accept": "text/event-stream",
            "content-type": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
        }
        if api_key:
            defaults["x-api-key"] = api_key
        # configured headers win (case-insensitively)
        self._client = upstream_client(request_headers(defaults, headers), timeout_seconds,
                                       connect_timeout_seconds, env_proxy(self._url))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        reason: Literal["stop", "length"] = "stop"
        prompt_tokens = completion_tokens = 0
        done = False
        body = orjson.dumps(_request_body(request))
        response: Response | None = None
        try:
            response = await self._client.post(self._url, body)
            if response.status >= 400:
                raise status_error(response, await response.read(), _error_detail,
                                   rate_limit_statuses=_RATE_LIMIT_STATUSES)
            lines = SSELines(response)
            event_name = ""
            while not done and (batch := await lines.read()) is not None:
                # One TextDelta per network read (see openai_completions).
                pieces: list[str] = []
                failure: ProviderError | None = None
                for line in batch:
                    name = sse_field(line, b"event:")
                    if name is not None:
                        event_name = name
                        continue
                    data = sse_payload(line)
                    if data is None:
                        continue
                    try:
                        event = decode_event(data)
                    except ProviderError as exc:
                        failure = exc
                        break
                    kind = event.get("type")
                    if not isinstance(kind, str):
                        kind = event_name
                    event_name = ""
                    if kind == "content_block_delta":
                        delta = event.get("delta")
                        if isinstance(delta, dict) and delta.get("type") == "text_delta":
                            text = delta.get("text")
                            if isinstance(text, str) and text:
                                pieces.append(text)
                    elif kind == "message_start":
                        message = event.get("message")
                        if isinstance(message, dict):
                            prompt_tokens, completion_tokens = _usage(
                                message.get("usage"), prompt_tokens, completion_tokens)
                    elif kind == "message_delta":
                        delta = event.get("delta")
                        stop_reason = delta.get("stop_reason") if isinstance(
                            delta, dict) else None
                        if isinstance(stop_reason, str):
                            reason = ("length" if stop_reason in _LENGTH_STOP_REASONS
                                      else "stop")
                        prompt_tokens, completion_tokens = _usage(
                            event.get("usage"), prompt_tokens, completion_tokens)
                    elif kind == "message_stop":
                        done = True
                        break
                    elif kind == "error":
                        failure = _stream_error(event)
                        break
                    # ping, content_block_start/stop and unknown events: ignored
                if pieces:
                    yield TextDelta("".join(pieces))
                if failure is not None:
                    raise failure
            if not done:
                raise incomplete_stream(response, "message_stop")
            await drain(lines)
        except HTTPError as exc:
            raise transport_error(exc, responded=response is not None, url=self._url) from exc
        finally:
            if response is not None:
                finish_response(response)
        yield Finish(reason=reason, usage=Usage(prompt_tokens=prompt_tokens,
                                                completion_tokens=completion_tokens))


def _request_body(request: ProviderRequest) -> dict[str, Any]:
    params = request.params
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": params.max_tokens if params.max_tokens is not None
        else DEFAULT_MAX_TOKENS,
        "messages": _merge_roles(request.messages),
        "stream": True,
    }
    if request.system:
        body["system"] = request.system
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    return body


def _merge_roles(messages: tuple[ChatMessage, ...]) -> list[dict[str, str]]:
    """Messages as the API accepts them: blank ones dropped (it rejects empty or
    whitespace-only text), then consecutive same-role turns joined by a blank line
    (it requires user/assistant alternation)."""
    merged: list[dict[str, str]] = []
    for message in messages:
        if not message.content.strip():
            continue
        if merged and merged[-1]["role"] == message.role:
            merged[-1]["content"] += "\n\n" + message.content
        else:
            merged.append({"role": message.role, "content": message.content})
    return merged


def _usage(raw: object, prompt: int, completion: int) -> tuple[int, int]:
    """(prompt, completion) tokens updated from an Anthropic ``usage`` object.

    Counts are cumulative; prompt tokens include cache reads and writes, which
    Anthropic reports apart from ``input_tokens``.
    """
    if not isinstance(raw, dict):
        return prompt, completion
    if isinstance(raw.get("input_tokens"), int):
        prompt = sum(raw[key] for key in ("input_tokens", "cache_creation_input_tokens",
                                          "cache_read_input_tokens")
                     if isinstance(raw.get(key), int))
    if isinstance(raw.get("output_tokens"), int):
        completion = raw["output_tokens"]
    return prompt, completion


def _error_detail(envelope: object) -> str | None:
    """``"<error.type>: <error.message>"`` of an Anthropic error envelope."""
    if not isinstance(envelope, dict):
        return None
    error = envelope.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = error.get("type")
        message = str(error["message"])
        return (f"{kind}: {message}" if isinstance(kind, str) and kind else message)[
            :MAX_DETAIL]
    if isinstance(envelope.get("message"), str):
        return str(envelope["message"])[:MAX_DETAIL]
    return None


def _stream_error(event: dict[str, Any]) -> ProviderError:
    """An ``error`` event mid-stream (e.g. ``overloaded_error``)."""
    error = event.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    detail = _error_detail(event) or "unknown error"
    if kind in ("overloaded_error", "rate_limit_error"):
        return ProviderError("rate_limit", f"upstream reported an error mid-stream: {detail}")
    return ProviderError("bad_response", f"upstream reported an error mid-stream: {detail}")
