"""``anthropic-messages``: the Anthropic Messages API, ``POST {baseUrl}/messages``.

The request always streams (``stream: true``). The system prompt goes in the
top-level ``system`` field; blank text messages are dropped and consecutive messages
of the same role merged, so the API's user/assistant alternation always holds;
``max_tokens`` (required by the API) defaults to :data:`DEFAULT_MAX_TOKENS`.
OpenAI-only sampling parameters (``frequency_penalty``, ``presence_penalty``, ``seed``)
are not sent.

Client tools (SPEC §7) and images (§8) are translated from OpenAI's terms:
``tools`` to ``{name, description, input_schema}``; ``tool_choice`` auto / none /
required / a function to ``{type: auto | none | any | tool}``, with
``disable_parallel_tool_use`` when parallel calls are off; assistant tool calls to
``tool_use`` blocks (``input`` parsed from the arguments, see :func:`_tool_input`);
tool results to ``tool_result`` blocks leading one user message; images to base64
``image`` blocks before the text.

The SSE reply is a sequence of typed events (``message_start``,
``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``,
``message_stop``, ``ping``, ``error``); text deltas become :class:`TextDelta` items,
``tool_use`` blocks :class:`ToolCallChunk` items (see :class:`_Reply`), and the
stream ends with one :class:`Finish` once ``message_stop`` arrives (reason
``tool_calls`` when the model called tools).

As in ``openai-completions``, one pooled HTTP client is shared by all runs,
and cancelling or closing the generator mid-stream closes the response's connection
at once, so the upstream stops generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

import orjson

from bus.messages import ToolCallChunk, ToolChoice, ToolSpec, Usage

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
    add_arguments,
    add_text,
    decode_event,
    drain,
    env_proxy,
    finish_response,
    incomplete_stream,
    new_call_id,
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

    async def embed(self, model: str, inputs: Sequence[str],
                    dimensions: int | None) -> tuple[list[list[float]], int]:
        raise ProviderError("failed", "anthropic-messages has no embeddings API")

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        reply = _Reply()
        body = orjson.dumps(_request_body(request))
        response: Response | None = None
        try:
            response = await self._client.post(self._url, body)
            if response.status >= 400:
                raise status_error(response, await response.read(), _error_detail,
                                   rate_limit_statuses=_RATE_LIMIT_STATUSES)
            lines = SSELines(response)
            while not reply.done and (batch := await lines.read()) is not None:
                # One TextDelta per network read (see openai_completions).
                text, failure = reply.parse(batch)
                del batch
                if reply.items:  # tool-call pieces, and the text that came before them
                    items, reply.items = reply.items, []
                    for item in items:
                        yield item
                    del items
                if text:
                    yield TextDelta(text)
                if failure is not None:
                    raise failure
            if not reply.done:
                raise incomplete_stream(response, "message_stop")
            await drain(lines)
        except HTTPError as exc:
            raise transport_error(exc, responded=response is not None, url=self._url) from exc
        finally:
            if response is not None:
                finish_response(response)
        yield Finish(reason=reply.finish_reason(), usage=Usage(
            prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens))


class _Reply:
    """What one reply's events said so far.

    A ``tool_use`` content block becomes a call of ours: its ``index`` counts the
    ``tool_use`` blocks before it (Anthropic numbers all blocks, text and thinking
    included); its start gives the first :class:`ToolCallChunk` (``id``, ``name``,
    ``arguments=""``) and each ``input_json_delta`` the next fragment. A block that
    ends without any input text gets ``"{}"``, so ``arguments`` is always JSON.
    """

    __slots__ = ("_blocks", "_empty", "_event_name", "completion_tokens", "done", "items",
                 "prompt_tokens", "reason")

    def __init__(self) -> None:
        self.done = False  # message_stop seen
        # "tool_use" counts as "stop": the reply's reason is "tool_calls" when
        # calls were seen (and only then).
        self.reason: Literal["stop", "length"] = "stop"
        self.prompt_tokens = self.completion_tokens = 0
        # Items of the current read that come before its trailing text (as in
        # openai_completions).
        self.items: list[StreamItem] = []
        self._event_name = ""
        self._blocks: dict[object, int] = {}  # tool_use block index -> call index
        self._empty: set[int] = set()  # calls whose input has had no text yet

    def finish_reason(self) -> Literal["stop", "length", "tool_calls"]:
        return "tool_calls" if self._blocks and self.reason == "stop" else self.reason

    def parse(self, batch: list[bytes]) -> tuple[str, ProviderError | None]:
        """The text of one read's SSE lines, and the error one of them reported
        (after what came before it); tool-call pieces go to :attr:`items`."""
        pieces: list[str] = []
        for line in batch:
            name = sse_field(line, b"event:")
            if name is not None:
                self._event_name = name
                continue
            data = sse_payload(line)
            if data is None:
                continue
            try:
                event = decode_event(data)
            except ProviderError as exc:
                return "".join(pieces), exc
            kind = event.get("type")
            if not isinstance(kind, str):
                kind = self._event_name
            self._event_name = ""
            if kind == "content_block_delta":
                delta = event.get("delta")
                if not isinstance(delta, dict):
                    continue
                delta_type = delta.get("type")
                if delta_type == "text_delta":
                    text = delta.get("text")
                    if isinstance(text, str) and text:
                        pieces.append(text)
                elif delta_type == "input_json_delta":
                    self._input(event.get("index"), delta.get("partial_json"), pieces)
            elif kind == "content_block_start":
                block = event.get("content_block")
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    self._start_call(event.get("index"), block, pieces)
            elif kind == "content_block_stop":
                call = self._blocks.get(event.get("index"))
                if call in self._empty:
                    self._input(event.get("index"), "{}", pieces)
            elif kind == "message_start":
                message = event.get("message")
                if isinstance(message, dict):
                    self._usage(message.get("usage"))
            elif kind == "message_delta":
                delta = event.get("delta")
                stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
                if isinstance(stop_reason, str):
                    self.reason = "length" if stop_reason in _LENGTH_STOP_REASONS else "stop"
                self._usage(event.get("usage"))
            elif kind == "message_stop":
                self.done = True
                break
            elif kind == "error":
                return "".join(pieces), _stream_error(event)
            # ping and unknown events: ignored
        return "".join(pieces), None

    def _start_call(self, block_index: object, block: dict[str, Any],
                    pieces: list[str]) -> None:
        call = len(self._blocks)
        self._blocks[block_index] = call
        self._empty.add(call)
        call_id, name = block.get("id"), block.get("name")
        add_text(self.items, pieces)
        self.items.append(ToolCallChunk(
            index=call, id=call_id if isinstance(call_id, str) and call_id else new_call_id(),
            name=name if isinstance(name, str) else None, arguments=""))

    def _input(self, block_index: object, fragment: object, pieces: list[str]) -> None:
        call = self._blocks.get(block_index)
        if call is None or not isinstance(fragment, str) or not fragment:
            return
        self._empty.discard(call)
        add_text(self.items, pieces)
        add_arguments(self.items, call, fragment)

    def _usage(self, raw: object) -> None:
        self.prompt_tokens, self.completion_tokens = _usage(
            raw, self.prompt_tokens, self.completion_tokens)


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
    if request.tools:
        body["tools"] = [_tool(tool) for tool in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice)
    elif used := _tools_in_history(request):
        # The API refuses tool blocks in `messages` without `tools` (a session's
        # later turn sent without them): the tools the history used are declared,
        # bare, and the model may not call them.
        body["tools"] = [{"name": name, "input_schema": {"type": "object", "properties": {}}}
                         for name in used]
        body["tool_choice"] = {"type": "none"}
    return body


def _tools_in_history(request: ProviderRequest) -> list[str]:
    """The names of the tools the conversation's calls used, in first-use order."""
    names: dict[str, None] = {}
    for message in request.messages:
        for call in message.tool_calls:
            names.setdefault(call.name, None)
    return list(names)


def _tool(tool: ToolSpec) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        spec["description"] = tool.description
    # The API requires an object schema; OpenAI lets a tool without parameters omit it.
    spec["input_schema"] = tool.parameters or {"type": "object", "properties": {}}
    return spec


_CHOICE_TYPES = {"auto": "auto", "none": "none", "required": "any", "function": "tool"}


def _tool_choice(choice: ToolChoice) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": _CHOICE_TYPES[choice.mode]}
    if choice.mode == "function":
        spec["name"] = choice.name
    if choice.parallel is False and choice.mode != "none":
        spec["disable_parallel_tool_use"] = True
    return spec


def _merge_roles(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """Messages as the API accepts them: blank text messages dropped (it rejects empty
    or whitespace-only text), tool results sent as user messages, then consecutive
    same-role messages joined (it requires user/assistant alternation): plain texts
    by a blank line, anything else as one list of content blocks in which the
    ``tool_result`` blocks come first (the API requires them to lead the message
    that answers the calls)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        content = _content(message)
        if isinstance(content, str) and not content.strip():
            continue
        role = "user" if message.role == "tool" else message.role
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] = _join(merged[-1]["content"], content)
        else:
            merged.append({"role": role, "content": content})
    return merged


def _content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """A message's content: its text, or content blocks when it carries more."""
    text = message.content
    blocks: list[dict[str, Any]]
    if message.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if text.strip():  # the API rejects blank text; an empty result is just omitted
            result["content"] = text
        return [result]
    if message.tool_calls:
        blocks = [{"type": "text", "text": text}] if text.strip() else []
        blocks.extend({"type": "tool_use", "id": call.id, "name": call.name,
                       "input": _tool_input(call.arguments)} for call in message.tool_calls)
        return blocks
    if message.images:
        blocks = [{"type": "image", "source": {"type": "base64", "media_type": image.mime,
                                               "data": image.data}}
                  for image in message.images]
        if text.strip():
            blocks.append({"type": "text", "text": text})
        return blocks
    return text


def _tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's ``arguments`` (JSON text) as the object ``tool_use.input`` must be.

    Blank arguments are ``{}``. Arguments that are not a JSON object (broken or cut
    JSON, an array, a number) come as ``{"_raw_arguments": <the text>}`` rather than
    ``{}``: the model then sees the call it really made, and can make sense of the
    tool result that reported the bad arguments."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"_raw_arguments": arguments}


def _join(first: str | list[dict[str, Any]],
          second: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second
    blocks = _blocks(first) + _blocks(second)
    return ([b for b in blocks if b["type"] == "tool_result"]
            + [b for b in blocks if b["type"] != "tool_result"])


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    return content


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
