"""OpenAI chat-completion objects and SSE frames, encoded with orjson.

Streaming chunks share one id/created/model, so their common prefix is encoded
once per stream and each token frame only encodes its text.
"""

from __future__ import annotations

from typing import Any

import orjson

from bus.messages import Usage

EMPTY_REPLY = "No response from OpenClaw."
DONE_FRAME = b"data: [DONE]\n\n"
KEEPALIVE_FRAME = b": keep-alive\n\n"


def usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def completion(run_id: str, created: int, model: str, *, text: str, usage: Usage,
               finish_reason: str) -> bytes:
    return orjson.dumps({
        "id": run_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text or EMPTY_REPLY, "refusal": None},
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

    def finish(self, finish_reason: str) -> bytes:
        return self._chunk({}, finish_reason)

    def usage(self, usage: Usage) -> bytes:
        return sse({**self._base, "choices": [], "usage": usage_dict(usage)})

    @staticmethod
    def error(envelope: dict[str, Any]) -> bytes:
        return sse(envelope)
