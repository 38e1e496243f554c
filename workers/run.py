"""One agent run attempt on a worker: prompt assembly, the provider call, the turn.

:func:`generate` streams the provider's reply through an :class:`Emitter` and
returns the finished text; the caller (``workers/worker.py``) owns the lease,
the ack and cancellation.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from bus.messages import RunRequest, Turn, Usage

from .events import Emitter
from .providers.base import ChatMessage, Finish, Provider, ProviderRequest, TextDelta


@dataclass(slots=True)
class Reply:
    text: str
    usage: Usage
    finish_reason: str
    first_token_seconds: float | None = None
    seconds: float = 0.0


def build_request(model: str, system_prompt: str, run: RunRequest,
                  history: list[Turn]) -> ProviderRequest:
    """What the agent sees: its system prompt + the extra system prompt, the
    session's earlier turns (already cut to the budget), then the current input."""
    system = "\n\n".join(p for p in (system_prompt.strip(), run.extra_system_prompt.strip()) if p)
    messages: list[ChatMessage] = []
    for turn in history:
        messages.append(ChatMessage("user", turn.user))
        messages.append(ChatMessage("assistant", turn.assistant))
    messages.append(ChatMessage("user", run.message))
    return ProviderRequest(model=model, system=system, messages=tuple(messages), params=run.params)


async def generate(provider: Provider, request: ProviderRequest, emitter: Emitter) -> Reply:
    parts: list[str] = []
    finish = Finish()
    started = time.monotonic()
    first: float | None = None
    # aclosing: on cancellation the provider's generator is closed at once, which
    # closes its upstream HTTP request (instead of whenever it is garbage collected).
    async with contextlib.aclosing(provider.stream(request)) as stream:
        async for item in stream:
            if isinstance(item, TextDelta):
                if first is None:
                    first = time.monotonic() - started
                parts.append(item.text)
                await emitter.delta(item.text)
            elif isinstance(item, Finish):
                finish = item
    return Reply(text="".join(parts), usage=finish.usage, finish_reason=finish.reason,
                 first_token_seconds=first, seconds=time.monotonic() - started)
