"""``echo``: a built-in, offline, deterministic provider for try-outs and tests.

It replies with the current user message, word by word (``tokenDelayMs`` between
words), and reports usage as whitespace-separated word counts. ``max_tokens``
cuts the reply to that many words with finish reason ``length``. Images of that
message are counted at the end of the echo (`` [1 image]``, `` [2 images]``), so an
offline user sees they arrived.

Client tools (SPEC §7) can be tried offline too:

* a last user message ``call <tool> <json>`` (the whole text; ``<json>`` a JSON
  object) where ``<tool>`` is one of the request's tools is answered with that
  call, and no text: one :class:`ToolCallChunk` (id ``call_`` and a hash of the
  message count, name and arguments, so reruns give the same id; ``arguments``
  the object compact-encoded) and finish reason ``tool_calls``. Not with
  ``tool_choice: none``;
* when the conversation ends with tool results, the reply is
  ``Tool results: <name or tool_call_id>: <content>; ...``.

Embeddings (SPEC §11): each text gets a unit vector of :data:`EMBED_DIMENSIONS`
values (or the ``dimensions`` asked, at most :data:`MAX_EMBED_DIMENSIONS`),
made from the SHAKE-256 stream of its UTF-8 bytes: the same text always gets
the same vector, in every process. Prompt tokens are word counts, as for chat.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import struct
from collections.abc import AsyncGenerator, Sequence

import orjson

from bus.messages import ToolCallChunk, Usage

from .base import Finish, ProviderError, ProviderRequest, StreamItem, TextDelta

EMBED_DIMENSIONS = 64
# Enough for any real model's size (3,072 is OpenAI's largest), and a bound on
# what one request may make a worker compute.
MAX_EMBED_DIMENSIONS = 4096

_WORDS = re.compile(r"\S+\s*")
_CALL = re.compile(r"call\s+(\S+)\s+(.*)", re.DOTALL)


def _count(text: str) -> int:
    return len(text.split())


class EchoProvider:
    def __init__(self, token_delay_ms: float = 0.0) -> None:
        self._delay = token_delay_ms / 1000.0

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        prompt_tokens = _count(request.system) + sum(_count(m.content) for m in request.messages)
        call = _requested_call(request)
        if call is not None:
            yield call
            yield Finish(reason="tool_calls",
                         usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=1))
            return
        limit = request.params.max_tokens
        words = _WORDS.findall(_reply(request))
        reason: str = "stop"
        if limit is not None and len(words) > limit:
            words, reason = words[:limit], "length"
        for i, word in enumerate(words):
            if self._delay and i:
                await asyncio.sleep(self._delay)
            yield TextDelta(word)
        yield Finish(
            reason="length" if reason == "length" else "stop",
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(words)),
        )

    async def embed(self, model: str, inputs: Sequence[str],
                    dimensions: int | None) -> tuple[list[list[float]], int]:
        size = EMBED_DIMENSIONS if dimensions is None else dimensions
        if not 0 < size <= MAX_EMBED_DIMENSIONS:
            raise ProviderError("failed", f"echo embeds in 1 to {MAX_EMBED_DIMENSIONS} "
                                f"dimensions, not {size}")
        return [echo_vector(text, size) for text in inputs], sum(_count(t) for t in inputs)

    async def aclose(self) -> None:
        return None


def echo_vector(text: str, dimensions: int) -> list[float]:
    """The unit vector echo gives ``text``: ``dimensions`` signed 32-bit integers
    read from the SHAKE-256 stream of the text, scaled to unit length."""
    raw = struct.unpack(f"<{dimensions}i",
                        hashlib.shake_256(text.encode()).digest(4 * dimensions))
    norm = math.hypot(*raw) or 1.0
    return [x / norm for x in raw]


def _requested_call(request: ProviderRequest) -> ToolCallChunk | None:
    """The call a last user message ``call <tool> <json>`` asks for, if the request
    offers that tool and allows calls."""
    if not request.messages or not request.tools:
        return None
    if request.tool_choice is not None and request.tool_choice.mode == "none":
        return None
    last = request.messages[-1]
    match = _CALL.fullmatch(last.content.strip()) if last.role == "user" else None
    if match is None:
        return None
    name, raw = match.groups()
    if name not in {tool.name for tool in request.tools}:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    arguments = orjson.dumps(value).decode()
    digest = hashlib.sha256(
        f"{len(request.messages)}\0{name}\0{arguments}".encode()).hexdigest()[:12]
    return ToolCallChunk(index=0, id=f"call_{digest}", name=name, arguments=arguments)


def _reply(request: ProviderRequest) -> str:
    messages = request.messages
    if not messages:
        return ""
    results: list[str] = []
    for message in reversed(messages):
        if message.role != "tool":
            break
        results.append(f"{message.name or message.tool_call_id}: {message.content}")
    if results:
        return "Tool results: " + "; ".join(reversed(results))
    last = messages[-1]
    if not last.images:
        return last.content
    count = len(last.images)
    label = f"[{count} image{'s' if count > 1 else ''}]"
    return f"{last.content} {label}" if last.content else label
