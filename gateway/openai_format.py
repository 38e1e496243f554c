"""OpenAI chat-completion objects and SSE frames, encoded with orjson.

Streaming chunks share one id/created/model, so their common prefix is encoded
once per stream and each token frame only encodes its text.
"""

from __future__ import annotations

from typing import Any

import orjson

from bus.messages import ToolCall, ToolCallChunk, Usage

EMPTY_REPLY = "No response from OpenClaw."
DONE_FRAME = b"data: [DONE]\n\n"
KEEPALIVE_FRAME = b": keep-alive\n\n"


def usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def completion(run_id: str, created: int, model: str, *, text: str, usage: Usage,
               finish_reason: str, tool_calls: tuple[ToolCall, ...] = ()) -> bytes:
    """A chat.completion; with tool calls, ``content`` is the commentary before
    them (null when there was none)."""
    message: dict[str, Any] = {"role": "assistant", "content": text or EMPTY_REPLY,
                               "refusal": None}
    if tool_calls:
        message["content"] = text or None
        message["tool_calls"] = [tool_call_dict(call) for call in tool_calls]
    return orjson.dumps({
        "id": run_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": usage_dict(usage),
    })


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class ChunkEncoder:
    """Frames of one streamed completion."""

    def __init__(self, run_id: str, created: int, model: str) -> None:
        self._base = {"id": run_id, "object": "chat.completion.chunk", "created": created,
                      "model": model}
        head = orjson.dumps(self._base)[:-1]  # without the closing brace
        self._content_prefix = (
            b"data: " + head + b',"choices":[{"index":0,"delta":{"content":')
        self._content_suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return sse({**self._base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    def role(self) -> bytes:
        return self._chunk({"role": "assistant"}, None)  # exactly as SPEC §2 shows it

    def content(self, text: str) -> bytes:
        return self._content_prefix + orjson.dumps(text) + self._content_suffix

    def tool_calls(self, chunks: tuple[ToolCallChunk, ...]) -> bytes:
        """One chunk per piece: a call's first piece carries ``index``, ``id``,
        ``type``, ``function.name`` and its first argument fragment; the others
        ``index`` and the next fragment."""
        frames: list[bytes] = []
        for chunk in chunks:
            entry: dict[str, Any] = {"index": chunk.index}
            if chunk.id is not None:
                entry["id"] = chunk.id
                entry["type"] = "function"
                entry["function"] = {"name": chunk.name or "", "arguments": chunk.arguments}
            else:
                entry["function"] = {"arguments": chunk.arguments}
            frames.append(self._chunk({"tool_calls": [entry]}, None))
        return b"".join(frames)

    def finish(self, finish_reason: str) -> bytes:
        return self._chunk({}, finish_reason)

    def usage(self, usage: Usage) -> bytes:
        return sse({**self._base, "choices": [], "usage": usage_dict(usage)})

    @staticmethod
    def error(envelope: dict[str, Any]) -> bytes:
        return sse(envelope)
