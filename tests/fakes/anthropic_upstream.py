"""A fake Anthropic Messages API upstream: a real HTTP/1.1 server on a free loopback port.

Used like :class:`tests.fakes.openai_upstream.FakeOpenAI`::

    with FakeAnthropic() as up:
        up.token_delay = 0.05
        ...  # point a client at up.base_url ("http://127.0.0.1:PORT/v1")
        up.wait_for(lambda reqs: reqs and reqs[-1].disconnected, timeout=1.0)

Route: ``POST /v1/messages`` (the real SSE event sequence when ``stream: true``,
else a JSON message). Requests are validated like the real API does: ``max_tokens``
is required, ``messages`` must alternate user/assistant starting with user and have
non-blank content (but for a final message), and a ``system`` role inside ``messages``
is rejected (all 400 ``invalid_request_error``).
Behaviour is set through plain attributes (read per request):

* ``token_delay`` - seconds between streamed tokens (one token per word);
* ``reply`` - request body -> reply text (default: ``"echo: " + last user message``);
* ``fail_status`` - answer with this status and an Anthropic error envelope
  (``retry-after: 1`` on 429);
* ``stall`` - send the response headers, then nothing until the client goes away;
* ``raw_sse`` - send these strings verbatim as the SSE body (for parser edge cases);
* ``api_key`` - when set, requests without ``x-api-key: <api_key>`` get 401.

``max_tokens`` cuts the reply with stop reason ``max_tokens``; ``stop_sequences`` cut
it with ``stop_sequence``. Usage counts whitespace words (system prompt included).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import orjson

from .http_upstream import FakeUpstream, RequestRecord, forever, send_chunk, text_of, words

__all__ = ["FakeAnthropic", "ReplyFn", "RequestRecord", "default_reply"]

ReplyFn = Callable[[dict[str, Any]], str]

_TOKENS = re.compile(r"\s*\S+\s*")

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "The request body is not valid."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def default_reply(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return "echo: " + text_of(message.get("content"))
    return "echo: "


def _invalid(body: Any) -> str | None:
    """Why the real API would reject this request body (None: it would not)."""
    if not isinstance(body, dict):
        return "The request body is not valid JSON."
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    expected = "user"
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if role != expected:
            return ("messages: roles must alternate between \"user\" and \"assistant\", "
                    "but found multiple \"" + str(role) + "\" roles in a row"
                    if i else "messages: first message must use the \"user\" role")
        if not text_of(message.get("content")).strip() and i < len(messages) - 1:
            return (f"messages.{i}: all messages must have non-empty content except for "
                    "the optional final assistant message")
        expected = "assistant" if role == "user" else "user"
    return None


class FakeAnthropic(FakeUpstream):
    name: ClassVar[str] = "fake-anthropic"

    def __init__(self, *, token_delay: float = 0.0, reply: ReplyFn = default_reply,
                 fail_status: int | None = None, stall: bool = False,
                 raw_sse: Sequence[str] | None = None, api_key: str | None = None) -> None:
        self.token_delay = token_delay
        self.reply = reply
        self.fail_status = fail_status
        self.stall = stall
        self.raw_sse = raw_sse
        self.api_key = api_key
        super().__init__()

    # -- responses -------------------------------------------------------------

    async def _answer(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        if self.api_key is not None and record.headers.get("x-api-key") != self.api_key:
            await self._send_error(record, writer, 401)
        elif record.path == "/v1/messages" and record.method == "POST":
            await self._messages(record, writer)
        else:
            await self._send_error(record, writer, 404, f"Unknown route: {record.path}")

    async def _messages(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        problem = _invalid(record.body)
        if problem is not None:
            await self._send_error(record, writer, 400, problem)
            return
        body: dict[str, Any] = record.body
        if self.fail_status is not None:
            await self._send_error(record, writer, self.fail_status)
            return
        if body.get("stream"):
            await self._stream(record, writer, body)
            return
        message, tokens = self._message(body)
        if self.stall:
            await self._head(record, writer, 200, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
            await forever()
        for _ in tokens[1:]:
            await asyncio.sleep(self.token_delay)
        await self._send_json(record, writer, 200, {
            **message, "content": [{"type": "text", "text": "".join(tokens)}],
        })

    def _message(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """(the final message object, its reply tokens) for a messages request."""
        text = self.reply(body)
        stop_reason, stop_sequence = "end_turn", None
        stops = body.get("stop_sequences")
        cuts = [(text.index(s), s) for s in stops if isinstance(s, str) and s and s in text] \
            if isinstance(stops, list) else []
        if cuts:
            at, stop_sequence = min(cuts)
            text, stop_reason = text[:at], "stop_sequence"
        tokens = _TOKENS.findall(text)
        if len(tokens) > body["max_tokens"]:
            tokens, stop_reason, stop_sequence = tokens[:body["max_tokens"]], "max_tokens", None
        input_tokens = words(text_of(body.get("system"))) + sum(
            words(text_of(m.get("content"))) for m in body["messages"])
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": len(tokens)},
        }
        return message, tokens

    async def _stream(self, record: RequestRecord, writer: asyncio.StreamWriter,
                      body: dict[str, Any]) -> None:
        message, tokens = self._message(body)
        await self._start_sse(record, writer)
        if self.stall:
            await forever()
        if self.raw_sse is not None:
            await self._replay_sse(writer, self.raw_sse, self.token_delay)
            return

        async def event(name: str, data: dict[str, Any]) -> None:
            await send_chunk(writer, b"event: " + name.encode() + b"\ndata: "
                             + orjson.dumps({"type": name, **data}) + b"\n\n")

        usage = message["usage"]
        await event("message_start", {"message": {
            **message, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1},
        }})
        await event("content_block_start",
                    {"index": 0, "content_block": {"type": "text", "text": ""}})
        await event("ping", {})
        for i, token in enumerate(tokens):
            if i and self.token_delay:
                await asyncio.sleep(self.token_delay)
            await event("content_block_delta",
                        {"index": 0, "delta": {"type": "text_delta", "text": token}})
        await event("content_block_stop", {"index": 0})
        await event("message_delta", {
            "delta": {"stop_reason": message["stop_reason"],
                      "stop_sequence": message["stop_sequence"]},
            "usage": {"output_tokens": usage["output_tokens"]},
        })
        await event("message_stop", {})
        await send_chunk(writer, b"")

    async def _send_error(self, record: RequestRecord, writer: asyncio.StreamWriter,
                          status: int, message: str | None = None) -> None:
        kind, default = _ERRORS.get(status, ("api_error", "Internal server error"))
        await self._send_json(
            record, writer, status,
            {"type": "error", "error": {"type": kind, "message": message or default}},
            {"retry-after": "1"} if status == 429 else None,
        )
