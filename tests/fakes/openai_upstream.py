"""A fake OpenAI-compatible upstream: a real HTTP/1.1 server on a free loopback port.

It runs its own asyncio loop in a background thread, so sync and async tests can
both use it::

    with FakeOpenAI() as up:
        up.token_delay = 0.05
        ...  # point a client at up.base_url ("http://127.0.0.1:PORT/v1")
        up.wait_for(lambda reqs: reqs and reqs[-1].disconnected, timeout=1.0)

Routes: ``POST /v1/chat/completions`` (SSE when ``stream: true``, else JSON),
``POST /v1/embeddings`` and ``GET /v1/models``. Behaviour is set through plain
attributes (read per request):

* ``token_delay`` - seconds between streamed tokens (one token per word);
* ``reply`` - request body -> reply text, or a :class:`FakeReply` (text, then tool
  calls: streamed as ``delta.tool_calls`` chunks, the first with ``index``, ``id``,
  ``type`` and ``function.name``, the arguments in several fragments; finish
  reason ``tool_calls``) (default: ``"echo: " + last user message``);
* ``tool_quirks`` - how tool calls are streamed wrong, as some OpenAI-compatible
  servers do: ``"no_index"`` (no ``index``), ``"no_id"`` (no ``id``),
  ``"stop_finish"`` (finish reason ``stop``), ``"whole_args"`` (the arguments
  whole in the first chunk), ``"split_utf8"`` (events with non-ASCII text written
  in pieces cut inside a UTF-8 character), ``"offset_index"`` (indices from 3);
* ``fail_status`` - answer chat completions with this status and an OpenAI error
  envelope (``Retry-After: 1`` on 429);
* ``garbage_after`` - after N content chunks send a non-JSON ``data:`` line and end;
* ``stall`` - send the response headers, then nothing until the client goes away;
* ``raw_sse`` - send these strings verbatim as the SSE body (for parser edge cases);
* ``api_key`` - when set, requests without ``Authorization: Bearer <api_key>`` get 401.

``POST /v1/embeddings`` answers each input with :func:`fake_vector` (``dimensions``
values if asked, else ``embedding_dimensions``), as float arrays or, with
``encoding_format: base64``, as base64 float32; ``fail_status`` and ``stall``
apply to it too, and ``embedding_delay`` seconds pass before it answers.

``max_tokens`` (or ``max_completion_tokens``) cuts the reply with finish reason
``length``; ``stop`` strings cut it with ``stop``. Usage counts whitespace words.

Every request is recorded (:attr:`FakeOpenAI.requests`); :meth:`FakeOpenAI.wait_for`
wakes on each record change. The server plumbing lives in :mod:`tests.fakes.http_upstream`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from .http_upstream import (
    FakeReply,
    FakeUpstream,
    ReplyFn,
    RequestRecord,
    as_reply,
    default_reply,
    forever,
    fragments,
    send_chunk,
    text_of,
    words,
)

__all__ = ["TOOL_QUIRKS", "FakeOpenAI", "FakeReply", "ReplyFn", "RequestRecord",
           "default_reply", "fake_vector"]

TOOL_QUIRKS = frozenset({"no_index", "no_id", "stop_finish", "whole_args", "split_utf8",
                         "offset_index"})

_TOKENS = re.compile(r"\s*\S+\s*")


@dataclass
class _Completion:
    model: str
    tokens: list[str]
    reason: str
    usage: dict[str, int]
    calls: list[tuple[str, str, str]]  # (id, name, arguments)


def _utf8_cuts(data: bytes) -> list[bytes]:
    """``data`` cut after the first byte of each multi-byte UTF-8 character."""
    cuts = [i + 1 for i, byte in enumerate(data) if byte >= 0xC0]
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def fake_vector(model: str, text: str, dimensions: int) -> list[float]:
    """The fake's embedding of ``text``: values in [-1, 1) from SHA-256 of the
    model, text and position, each exactly a float32 (so float and base64
    replies carry the same numbers)."""
    values: list[float] = []
    block = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{model}\0{text}\0{block}".encode()).digest()
        values.extend((x >> 8) / 2**23 for x in struct.unpack("<8i", digest))
        block += 1
    return values[:dimensions]


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
        self.tool_quirks: set[str] = set()
        self.embedding_dimensions = 32
        self.embedding_delay = 0.0
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
        elif record.path == "/v1/embeddings" and record.method == "POST":
            await self._embeddings(record, writer)
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
        reply = self._reply(body)
        if self.stall:
            await self._head(record, writer, 200, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
            await forever()
        for _ in reply.tokens[1:]:
            await asyncio.sleep(self.token_delay)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.tokens),
                                   "refusal": None}
        if reply.calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": arguments}}
                for call_id, name, arguments in reply.calls]
        await self._send_json(record, writer, 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model,
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reply.reason,
            }],
            "usage": reply.usage,
        })

    async def _embeddings(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        body = record.body
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            await self._send_error(record, writer, 400)
            return
        assert isinstance(body, dict)
        if self.fail_status is not None:
            await self._send_error(record, writer, self.fail_status)
            return
        if self.stall:
            await self._head(record, writer, 200, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
            await forever()
        await asyncio.sleep(self.embedding_delay)
        model = str(body.get("model") or "")
        size = body.get("dimensions") or self.embedding_dimensions
        packed = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = fake_vector(model, text, size)
            data.append({"object": "embedding", "index": index, "embedding":
                         base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
                         if packed else vector})
        tokens = sum(words(text) for text in inputs)
        await self._send_json(record, writer, 200, {
            "object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _completion(self, body: dict[str, Any]
                    ) -> tuple[str, list[str], str, dict[str, int]]:
        """(model, reply tokens, finish reason, usage) for a chat completion request."""
        reply = self._reply(body)
        return reply.model, reply.tokens, reply.reason, reply.usage

    def _reply(self, body: dict[str, Any]) -> _Completion:
        """The whole reply to a chat completion request."""
        model = str(body.get("model") or self.models[0])
        answer = as_reply(self.reply(body))
        text = answer.text
        reason = "stop"
        stop = body.get("stop")
        for s in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
            if isinstance(s, str) and s and s in text:
                text = text[:text.index(s)]
        tokens = _TOKENS.findall(text)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and len(tokens) > limit:
            tokens, reason = tokens[:limit], "length"
        # A reply cut short never gets to its calls.
        calls = [] if reason == "length" else [
            (f"call_{uuid.uuid4().hex[:24]}", name, arguments)
            for name, arguments in answer.tool_calls]
        if calls:
            reason = "stop" if "stop_finish" in self.tool_quirks else "tool_calls"
        prompt_tokens = sum(words(text_of(m.get("content")))
                            for m in body["messages"] if isinstance(m, dict))
        completion_tokens = len(tokens) + len(calls)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return _Completion(model, tokens, reason, usage, calls)

    async def _stream(self, record: RequestRecord, writer: asyncio.StreamWriter,
                      body: dict[str, Any]) -> None:
        reply = self._reply(body)
        model, tokens, reason, usage = reply.model, reply.tokens, reply.reason, reply.usage
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
            data = b"data: " + orjson.dumps(chunk) + b"\n\n"
            if "split_utf8" not in self.tool_quirks or data.isascii():
                await send_chunk(writer, data)
                return
            for piece in _utf8_cuts(data):
                await send_chunk(writer, piece)
                await asyncio.sleep(0.005)  # apart, so that they arrive in separate reads

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
        for number, call in enumerate(reply.calls):
            await self._stream_call(event, number, *call)
        await event({}, reason)
        if include_usage:
            final = {**base, "choices": [], "usage": usage}
            await send_chunk(writer, b"data: " + orjson.dumps(final) + b"\n\n")
        await send_chunk(writer, b"data: [DONE]\n\n")
        await send_chunk(writer, b"")

    async def _stream_call(self, event: Callable[[dict[str, Any], str | None], Awaitable[None]],
                           number: int, call_id: str, name: str, arguments: str) -> None:
        """Stream the ``delta.tool_calls`` chunks of the ``number``-th call."""
        quirks = self.tool_quirks
        position = {} if "no_index" in quirks else {
            "index": number + 3 if "offset_index" in quirks else number}
        rest = [] if "whole_args" in quirks else fragments(arguments)
        first: dict[str, Any] = {**position, "type": "function", "function": {
            "name": name, "arguments": arguments if "whole_args" in quirks else ""}}
        if "no_id" not in quirks:
            first["id"] = call_id
        await event({"tool_calls": [first]}, None)
        for piece in rest:
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            await event({"tool_calls": [{**position, "function": {"arguments": piece}}]}, None)

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
