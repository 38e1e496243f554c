"""A fake OpenAI-compatible upstream: a real HTTP/1.1 server on a free loopback port.

It runs its own asyncio loop in a background thread, so sync and async tests can
both use it::

    with FakeOpenAI() as up:
        up.token_delay = 0.05
        ...  # point a client at up.base_url ("http://127.0.0.1:PORT/v1")
        up.wait_for(lambda reqs: reqs and reqs[-1].disconnected, timeout=1.0)

Routes: ``POST /v1/chat/completions`` (SSE when ``stream: true``, else JSON) and
``GET /v1/models``. Behaviour is set through plain attributes (read per request):

* ``token_delay`` - seconds between streamed tokens (one token per word);
* ``reply`` - request body -> reply text (default: ``"echo: " + last user message``);
* ``fail_status`` - answer chat completions with this status and an OpenAI error
  envelope (``Retry-After: 1`` on 429);
* ``garbage_after`` - after N content chunks send a non-JSON ``data:`` line and end;
* ``stall`` - send the response headers, then nothing until the client goes away;
* ``raw_sse`` - send these strings verbatim as the SSE body (for parser edge cases);
* ``api_key`` - when set, requests without ``Authorization: Bearer <api_key>`` get 401.

``max_tokens`` (or ``max_completion_tokens``) cuts the reply with finish reason
``length``; ``stop`` strings cut it with ``stop``. Usage counts whitespace words.

Every request is recorded (:attr:`FakeOpenAI.requests`); :meth:`FakeOpenAI.wait_for`
wakes on each record change. The server plumbing lives in :mod:`tests.fakes.http_upstream`.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import orjson

from .http_upstream import (
    FakeUpstream,
    RequestRecord,
    forever,
    send_chunk,
    text_of,
    words,
)

__all__ = ["FakeOpenAI", "ReplyFn", "RequestRecord", "default_reply"]

ReplyFn = Callable[[dict[str, Any]], str]

_TOKENS = re.compile(r"\s*\S+\s*")


def default_reply(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return "echo: " + text_of(message.get("content"))
    return "echo: "


class FakeOpenAI(FakeUpstream):
    name: ClassVar[str] = "fake-openai"

    def __init__(self, *, token_delay: float = 0.0, reply: ReplyFn = default_reply,
                 fail_status: int | None = None, garbage_after: int | None = None,
                 stall: bool = False, raw_sse: Sequence[str] | None = None,
                 api_key: str | None = None, models: Sequence[str] = ("fake-model",)) -> None:
        self.token_delay = token_delay
        self.reply = reply
        self.fail_status = fail_status
        self.garbage_after = garbage_after
        self.stall = stall
        self.raw_sse = raw_sse
        self.api_key = api_key
        self.models = tuple(models)
        super().__init__()

    # -- responses -------------------------------------------------------------

    async def _answer(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        if self.api_key is not None and (
            record.headers.get("authorization") != f"Bearer {self.api_key}"
        ):
            await self._send_error(record, writer, 401)
        elif record.path == "/v1/models" and record.method == "GET":
            await self._send_json(record, writer, 200, {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                         for m in self.models],
            })
        elif record.path == "/v1/chat/completions" and record.method == "POST":
            await self._chat(record, writer)
        else:
            await self._send_error(record, writer, 404)

    async def _chat(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        body = record.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await self._send_error(record, writer, 400)
            return
        if self.fail_status is not None:
            await self._send_error(record, writer, self.fail_status)
            return
        if body.get("stream"):
            await self._stream(record, writer, body)
            return
        model, tokens, reason, usage = self._completion(body)
        if self.stall:
            await self._head(record, writer, 200, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
            await forever()
        for _ in tokens[1:]:
            await asyncio.sleep(self.token_delay)
        await self._send_json(record, writer, 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                "logprobs": None,
                "finish_reason": reason,
            }],
            "usage": usage,
        })

    def _completion(self, body: dict[str, Any]
                    ) -> tuple[str, list[str], str, dict[str, int]]:
        """(model, reply tokens, finish reason, usage) for a chat completion request."""
        model = str(body.get("model") or self.models[0])
        text = self.reply(body)
        reason = "stop"
        stop = body.get("stop")
        for s in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
            if isinstance(s, str) and s and s in text:
                text = text[:text.index(s)]
        tokens = _TOKENS.findall(text)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and len(tokens) > limit:
            tokens, reason = tokens[:limit], "length"
        prompt_tokens = sum(words(text_of(m.get("content")))
                            for m in body["messages"] if isinstance(m, dict))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        return model, tokens, reason, usage

    async def _stream(self, record: RequestRecord, writer: asyncio.StreamWriter,
                      body: dict[str, Any]) -> None:
        model, tokens, reason, usage = self._completion(body)
        await self._start_sse(record, writer)
        if self.stall:
            await forever()
        if self.raw_sse is not None:
            await self._replay_sse(writer, self.raw_sse, self.token_delay)
            return
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        base: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
        }

        async def event(delta: dict[str, Any], finish: str | None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]}
            if include_usage:
                chunk["usage"] = None
            await send_chunk(writer, b"data: " + orjson.dumps(chunk) + b"\n\n")

        await event({"role": "assistant", "content": "", "refusal": None}, None)
        for i, token in enumerate(tokens):
            if i == self.garbage_after:
                break
            if i and self.token_delay:
                await asyncio.sleep(self.token_delay)
            await event({"content": token}, None)
        if self.garbage_after is not None and self.garbage_after <= len(tokens):
            await send_chunk(writer, b"data: {this is not json\n\n")
            await send_chunk(writer, b"")
            return
        await event({}, reason)
        if include_usage:
            final = {**base, "choices": [], "usage": usage}
            await send_chunk(writer, b"data: " + orjson.dumps(final) + b"\n\n")
        await send_chunk(writer, b"data: [DONE]\n\n")
        await send_chunk(writer, b"")
    async def _send_error(self, record: RequestRecord, writer: asyncio.StreamWriter,
                          status: int) -> None:
        kind, code, message = {
            400: ("invalid_request_error", None, "The request body is not valid."),
            401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
            403: ("invalid_request_error", "unsupported_country_region_territory",
                  "Access denied."),
            404: ("invalid_request_error", "unknown_url", f"Unknown request URL: {record.path}"),
            429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
        }.get(status, ("server_error", None, "The server had an error processing your request."))
        await self._send_json(
            record, writer, status,
            {"error": {"message": message, "type": kind, "param": None, "code": code}},
            {"retry-after": "1"} if status == 429 else None,
        )
