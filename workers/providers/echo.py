"""``echo``: a built-in, offline, deterministic provider for try-outs and tests.

It replies with the current user message, word by word (``tokenDelayMs`` between
words), and reports usage as whitespace-separated word counts. ``max_tokens``
cuts the reply to that many words with finish reason ``length``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from bus.messages import Usage

from .base import Finish, ProviderRequest, StreamItem, TextDelta

_WORDS = re.compile(r"\S+\s*")


def _count(text: str) -> int:
    return len(text.split())


class EchoProvider:
    def __init__(self, token_delay_ms: float = 0.0) -> None:
        self._delay = token_delay_ms / 1000.0

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        current = request.messages[-1].content if request.messages else ""
        prompt_tokens = _count(request.system) + sum(_count(m.content) for m in request.messages)
        reply = current
        limit = request.params.max_tokens
        words = _WORDS.findall(reply)
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

    async def aclose(self) -> None:
        return None
