"""``openai-completions``: any OpenAI-compatible ``POST {baseUrl}/chat/completions``.

Works against OpenAI, vLLM, Ollama, llama.cpp, LM Studio and the like. The request
always streams (``stream: true`` with ``stream_options.include_usage``); the SSE
reply is parsed into one :class:`TextDelta` per network read (the text of every
event that arrived together) and one :class:`Finish`.
One pooled :class:`~.http_client.HTTPClient` is shared by all runs (it connects
on the first request).

Client tools (SPEC §7) and images (§8) go out in OpenAI's own terms: ``tools``,
``tool_choice`` and ``parallel_tool_calls`` (only with tools), assistant messages
with ``tool_calls``, ``role: "tool"`` results, and user content as text and
``image_url`` parts with data URIs. ``delta.tool_calls`` in the reply become
:class:`ToolCallChunk` items normalized by :class:`_ToolCalls` (the base.py
contract), in the upstream's order relative to the text of the same read; the
argument fragments of one call that arrive in one read are joined.

When the consumer is cancelled or closes the generator mid-stream, the response's
connection is closed at once (never returned to the pool half-read), so the upstream
sees the disconnect and stops generating.

Embeddings (SPEC §11) are one JSON ``POST {baseUrl}/embeddings`` on the same
pooled client, asking for ``encoding_format: base64`` as the official SDK does
(a quarter of the bytes of decimal floats); a server that answers with float
arrays anyway is understood too. Its failures map to the same kinds as chat's.
"""

from __future__ import annotations

import array
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

import orjson

from bus.messages import ImagePart, ToolCallChunk, ToolChoice, Usage, unpack_vector

from ..memo import IdentityMemo
from ..window_memo import WindowMemo
from .base import ChatMessage, Finish, ProviderError, ProviderRequest, StreamItem, TextDelta
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
    status_error,
    transport_error,
    upstream_client,
)

# The largest embeddings reply read (2,048 vectors of 3,072 values as decimal
# floats take about 130 MB); a larger one is a bad response.
MAX_EMBEDDINGS_BYTES = 256 * 1024 * 1024


class OpenAICompletionsProvider:
    def __init__(self, base_url: str, api_key: str | None, headers: dict[str, str],
                 timeout_seconds: float, connect_timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._url = f"{self.base_url}/chat/completions"
        self._embeddings_url = f"{self.base_url}/embeddings"
        defaults = {"accept": "text/event-stream", "content-type": "application/json"}
        if api_key:
            defaults["authorization"] = f"Bearer {api_key}"
        # configured headers win (case-insensitively)
        self._client = upstream_client(request_headers(defaults, headers), timeout_seconds,
                                       connect_timeout_seconds, env_proxy(self._url))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def embed(self, model: str, inputs: Sequence[str],
                    dimensions: int | None) -> tuple[list[list[float]], int]:
        request: dict[str, Any] = {"model": model, "input": list(inputs),
                                   "encoding_format": "base64"}
        if dimensions is not None:
            request["dimensions"] = dimensions
        url = self._embeddings_url
        response: Response | None = None
        try:
            response = await self._client.post(url, orjson.dumps(request))
            if response.status >= 400:
                raise status_error(response, await response.read(), _error_detail)
            body = await _read_all(response, MAX_EMBEDDINGS_BYTES)
        except HTTPError as exc:
            raise transport_error(exc, responded=response is not None, url=url) from exc
        finally:
            if response is not None:
                finish_response(response)
        return _embeddings(body, len(inputs))

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
                if state.items:  # tool-call pieces, and the text that came before them
                    items, state.items = state.items, []
                    for item in items:
                        yield item
                    del items
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
        yield Finish(reason="tool_calls" if state.reason == "stop" and state.calls.count
                     else state.reason, usage=state.usage)


class _StreamState:
    """What one reply's events said so far."""

    __slots__ = ("calls", "done", "finished", "items", "reason", "usage")

    def __init__(self) -> None:
        self.done = False  # [DONE] seen
        self.finished = False  # a finish_reason seen
        # "tool_calls" from the upstream counts as "stop": the reply's reason
        # is "tool_calls" when calls were seen, whatever the upstream said.
        self.reason: Literal["stop", "length"] = "stop"
        self.usage = Usage()
        self.calls = _ToolCalls()
        # Items of the current read that come before its trailing text: the
        # pieces of tool calls, and the text that preceded each of them.
        self.items: list[StreamItem] = []


class _ToolCalls:
    """Turns an upstream's ``delta.tool_calls`` fragments into normalized
    :class:`ToolCallChunk` items (base.py), absorbing the dialects of
    OpenAI-compatible servers (SPEC §7):

    * ``index`` is ours, 0-based in first-appearance order, whatever the
      upstream's indices were (offset, gaps) or when it sent none;
    * a fragment opens a new call when it names one not seen yet: an unseen
      ``index``; without an index, an unseen ``id``; with neither, a ``name``
      while the latest call already has one. Otherwise it continues the call it
      names (by ``id``, else ``index``), or the latest call;
    * a known ``index`` arriving with an unseen ``id`` *and* a ``name`` is a new
      call too (servers that number every call 0);
    * a call without an upstream ``id`` gets :func:`new_call_id`;
    * ``id`` and ``name`` go out once, on the call's first piece (its name on a
      later piece only when the upstream sent it late);
    * ``arguments`` that are a JSON object rather than its text are encoded.
    """

    __slots__ = ("_by_id", "_by_index", "_named")

    def __init__(self) -> None:
        self._by_index: dict[int, int] = {}  # upstream index -> ours
        self._by_id: dict[str, int] = {}
        self._named: list[bool] = []  # per call of ours: its name went out

    @property
    def count(self) -> int:
        return len(self._named)

    def feed(self, fragments: list[Any], out: list[StreamItem]) -> None:
        """Append the pieces of one delta's ``tool_calls`` to ``out``."""
        for fragment in fragments:
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                index = None
            call_id = fragment.get("id")
            if not isinstance(call_id, str) or not call_id:
                call_id = None
            function = fragment.get("function")
            if not isinstance(function, dict):
                function = {}
            name = function.get("name")
            if not isinstance(name, str) or not name:
                name = None
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = orjson.dumps(arguments).decode() if isinstance(
                    arguments, dict) else ""
            ours = self._find(index, call_id, name)
            if ours is None:
                ours = len(self._named)
                self._named.append(name is not None)
                if index is not None:
                    self._by_index[index] = ours
                call_id = call_id or new_call_id()
                self._by_id[call_id] = ours
                out.append(ToolCallChunk(index=ours, id=call_id, name=name,
                                         arguments=arguments))
                continue
            if call_id is not None:
                self._by_id.setdefault(call_id, ours)
            if name is not None and not self._named[ours]:
                self._named[ours] = True
                out.append(ToolCallChunk(index=ours, name=name, arguments=arguments))
            elif arguments:
                add_arguments(out, ours, arguments)

    def _find(self, index: int | None, call_id: str | None, name: str | None) -> int | None:
        """The call of ours a fragment continues; None: it opens a new one."""
        if call_id is not None and (known := self._by_id.get(call_id)) is not None:
            return known
        if index is not None:
            known = self._by_index.get(index)
            if known is not None and call_id is not None and name is not None:
                return None  # an index reused for another call
            return known
        if call_id is None and self._named and not (name is not None and self._named[-1]):
            return len(self._named) - 1
        return None


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
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    pieces.append(text)
                # Text deltas carry no such key: the tool path costs them one lookup.
                if "tool_calls" in delta:
                    fragments = delta["tool_calls"]
                    if isinstance(fragments, list) and fragments:
                        add_text(state.items, pieces)
                        state.calls.feed(fragments, state.items)
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str) and finish_reason:
                state.finished = True
                state.reason = "length" if finish_reason == "length" else "stop"
        raw_usage = chunk.get("usage")
        if raw_usage is not None:
            state.usage = _usage(raw_usage) or state.usage
    return "".join(pieces), None


def _request_body(request: ProviderRequest) -> dict[str, Any]:
    messages: list[Any] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    history = request.history
    # The session's history as one piece of JSON ("m1,m2,…": orjson copies a
    # Fragment as it is), extended from the previous run's (window_memo.py).
    joined = _histories(request.messages[:history]) if history > 0 else None
    if joined is not None:
        messages.append(orjson.Fragment(joined))
        messages.extend(map(_message_dict, request.messages[history:]))
    elif history < 0:  # a history paired as a whole (tool traffic): memoised one by one
        messages.extend(map(orjson.Fragment, _message_memo.many(request.messages)))
    else:  # no history: new messages, encoded once
        messages.extend(map(_message_dict, request.messages))
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
    if request.tools:
        body["tools"] = [{"type": "function", "function": tool.model_dump(exclude_none=True)}
                         for tool in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice)
            if request.tool_choice.parallel is not None:
                body["parallel_tool_calls"] = request.tool_choice.parallel
    return body


def _message(message: ChatMessage) -> bytes:
    """A message as the API's JSON, encoded once (see ``_message_memo``)."""
    return orjson.dumps(_message_dict(message))


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id,
                "content": message.content}
    if message.tool_calls:
        return {
            "role": message.role,
            "content": message.content or None,
            "tool_calls": [
                # "" is not JSON: strict servers reject it where "{}" means no arguments.
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments or "{}"}}
                for call in message.tool_calls],
        }
    if message.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] \
            if message.content else []
        parts.extend({"type": "image_url", "image_url": _image_url(image)}
                     for image in message.images)
        return {"role": message.role, "content": parts}
    return {"role": message.role, "content": message.content}


# A session's history arrives as the same ChatMessage objects run after run
# (workers/memo.py): each is encoded once, and the body built around the
# encoded messages (orjson copies a Fragment as it is); the history as a whole
# is kept encoded from one run to the next.
_message_memo = IdentityMemo(_message)
_histories: WindowMemo[ChatMessage, bytes, bytes] = WindowMemo(
    _message_memo.many, lambda piece: len(piece) + 1, b",".join,  # (+ its comma)
    lambda kept, new: kept + b"," + new)


def _image_url(image: ImagePart) -> dict[str, str]:
    url = {"url": f"data:{image.mime};base64,{image.data}"}
    if image.detail is not None:
        url["detail"] = image.detail
    return url


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.mode == "function":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode


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


async def _read_all(response: Response, limit: int) -> bytes:
    """The whole body; a bad response once it grows past ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while data := await response.readany():
        size += len(data)
        if size > limit:
            raise ProviderError("bad_response", f"upstream reply is larger than {limit} bytes")
        parts.append(data)
    return b"".join(parts)


def _embeddings(body: bytes, count: int) -> tuple[list[list[float]], int]:
    """The vectors of an OpenAI embeddings reply (``data[].embedding``: base64 of
    float32 values, or numbers), in input order, and its prompt tokens."""
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError:
        reply = None
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list):
        raise ProviderError("bad_response", "upstream embeddings reply has no `data` list: "
                            f"{body[:MAX_DETAIL]!r}")
    if len(data) != count:
        raise ProviderError("bad_response",
                            f"upstream returned {len(data)} embeddings for {count} inputs")
    vectors: list[list[float] | None] = [None] * count
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or vectors[index] is not None:
            raise ProviderError("bad_response", f"upstream embedding {position} has a bad "
                                "or repeated `index`")
        vectors[index] = _vector(item.get("embedding"), position)
    usage = reply.get("usage")
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return ([v for v in vectors if v is not None],
            prompt_tokens if isinstance(prompt_tokens, int) else 0)


def _vector(raw: object, position: int) -> list[float]:
    try:
        if isinstance(raw, str):
            return unpack_vector(raw)
        if isinstance(raw, list):
            return array.array("d", raw).tolist()
    except (TypeError, ValueError):  # (binascii.Error is a ValueError)
        pass
    raise ProviderError("bad_response", f"upstream embedding {position} is not a vector")
