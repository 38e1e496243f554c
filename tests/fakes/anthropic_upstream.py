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
is rejected; content blocks must be well-formed (no blank text, base64 images of an
image type), ``tools`` need a name and an object ``input_schema``, ``tool_choice`` a
known type, tool blocks need ``tools``, and every ``tool_use`` must be answered by a
``tool_result`` in the next message, the results leading it (all 400
``invalid_request_error``).
Behaviour is set through plain attributes (read per request):

* ``token_delay`` - seconds between streamed tokens (one token per word);
* ``reply`` - request body -> reply text, or a :class:`FakeReply` (text, then tool
  calls: ``tool_use`` content blocks whose input comes in several
  ``input_json_delta`` fragments; stop reason ``tool_use``) (default:
  ``"echo: " + last user message``);
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
from collections.abc import Sequence
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

__all__ = ["FakeAnthropic", "FakeReply", "ReplyFn", "RequestRecord", "default_reply"]

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


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


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
    problem = _invalid_tools(body)
    if problem is not None:
        return problem
    expected = "user"
    pending: list[str] = []  # tool_use ids the next message must answer
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if role != expected:
            return ("messages: roles must alternate between \"user\" and \"assistant\", "
                    "but found multiple \"" + str(role) + "\" roles in a row"
                    if i else "messages: first message must use the \"user\" role")
        content = message.get("content")
        if _blank(content) and i < len(messages) - 1:
            return (f"messages.{i}: all messages must have non-empty content except for "
                    "the optional final assistant message")
        blocks = content if isinstance(content, list) else []
        problem = _invalid_blocks(f"messages.{i}.content", role, blocks)
        if problem is None and blocks and "tools" not in body and any(
                b.get("type") in ("tool_use", "tool_result") for b in blocks):
            problem = "Requests which include `tool_use` or `tool_result` blocks must define tools."
        if problem is None:
            problem = _unanswered(i, pending, blocks)
        if problem is not None:
            return problem
        pending = [b["id"] for b in blocks if b.get("type") == "tool_use"]
        expected = "assistant" if role == "user" else "user"
    return None


def _blank(content: Any) -> bool:
    if isinstance(content, list):
        return not content
    return not text_of(content).strip()


def _invalid_tools(body: dict[str, Any]) -> str | None:
    tools = body.get("tools", [])
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    names = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not _TOOL_NAME.fullmatch(str(tool.get("name"))):
            return f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"tools.{i}.custom.input_schema.type: Input should be 'object'"
        names.add(tool["name"])
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        return "tool_choice: Input tag does not match any of the expected tags"
    if choice["type"] == "tool" and choice.get("name") not in names:
        return f"tool_choice: tool '{choice.get('name')}' not found in tools"
    if choice["type"] == "none" and "disable_parallel_tool_use" in choice:
        return "tool_choice.none.disable_parallel_tool_use: Extra inputs are not permitted"
    return None


def _invalid_blocks(where: str, role: str, blocks: list[Any]) -> str | None:
    allowed = {"text", "image", "tool_result"} if role == "user" else {"text", "tool_use"}
    seen_other = False
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            return f"{where}.{j}.type: Input tag {kind!r} is not allowed in a {role} message"
        if kind == "text" and not (isinstance(block.get("text"), str)
                                   and block["text"].strip()):
            return f"{where}.{j}.text: text content blocks must contain non-whitespace text"
        if kind == "image":
            source = block.get("source")
            if not (isinstance(source, dict) and source.get("type") == "base64"
                    and source.get("media_type") in _IMAGE_TYPES
                    and isinstance(source.get("data"), str) and source["data"]):
                return f"{where}.{j}.source: Input should be a valid base64 image source"
        if kind == "tool_use" and not (isinstance(block.get("id"), str)
                                       and isinstance(block.get("name"), str)
                                       and isinstance(block.get("input"), dict)):
            return f"{where}.{j}: tool_use blocks need an id, a name and an object input"
        if kind == "tool_result":
            if seen_other:
                return (f"{where}.{j}: tool_result blocks must come first in the content, "
                        "before any other block")
            content = block.get("content")
            if content is not None and not isinstance(content, (str, list)):
                return f"{where}.{j}.content: Input should be a valid string or list"
        else:
            seen_other = True
    return None


def _unanswered(i: int, pending: list[str], blocks: list[Any]) -> str | None:
    """The API's check that message ``i`` answers the previous one's tool calls."""
    results = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
    missing = [call_id for call_id in pending if call_id not in results]
    if missing:
        return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(missing)}. Each `tool_use` block must have "
                "a corresponding `tool_result` block in the next message.")
    unexpected = [call_id for call_id in results if call_id not in pending]
    if unexpected:
        return (f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{unexpected[0]}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message.")
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
        message, tokens, calls = self._message(body)
        if self.stall:
            await self._head(record, writer, 200, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
            await forever()
        for _ in tokens[1:]:
            await asyncio.sleep(self.token_delay)
        content = [{"type": "text", "text": "".join(tokens)}] if tokens or not calls else []
        content.extend({"type": "tool_use", "id": call_id, "name": name,
                        "input": orjson.loads(arguments or "{}")}
                       for call_id, name, arguments in calls)
        await self._send_json(record, writer, 200, {**message, "content": content})

    def _message(self, body: dict[str, Any]
                 ) -> tuple[dict[str, Any], list[str], list[tuple[str, str, str]]]:
        """(the final message object, its reply tokens, its tool calls as (id, name,
        arguments)) for a messages request."""
        reply = as_reply(self.reply(body))
        text = reply.text
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
        # A reply cut short never gets to its calls.
        calls = [] if stop_reason == "max_tokens" else [
            (f"toolu_{uuid.uuid4().hex[:24]}", name, arguments)
            for name, arguments in reply.tool_calls]
        if calls:
            stop_reason, stop_sequence = "tool_use", None
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
            "usage": {"input_tokens": input_tokens, "output_tokens": len(tokens) + len(calls)},
        }
        return message, tokens, calls

    async def _stream(self, record: RequestRecord, writer: asyncio.StreamWriter,
                      body: dict[str, Any]) -> None:
        message, tokens, calls = self._message(body)
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
        block = 0
        if tokens or not calls:  # a reply that goes straight to its calls has no text block
            await event("content_block_start",
                        {"index": 0, "content_block": {"type": "text", "text": ""}})
            await event("ping", {})
            for i, token in enumerate(tokens):
                if i and self.token_delay:
                    await asyncio.sleep(self.token_delay)
                await event("content_block_delta",
                            {"index": 0, "delta": {"type": "text_delta", "text": token}})
            await event("content_block_stop", {"index": 0})
            block = 1
        else:
            await event("ping", {})
        for call_id, name, arguments in calls:
            await event("content_block_start", {"index": block, "content_block": {
                "type": "tool_use", "id": call_id, "name": name, "input": {}}})
            for piece in ["", *fragments(arguments)]:
                if piece and self.token_delay:
                    await asyncio.sleep(self.token_delay)
                await event("content_block_delta", {"index": block, "delta": {
                    "type": "input_json_delta", "partial_json": piece}})
            await event("content_block_stop", {"index": block})
            block += 1
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
