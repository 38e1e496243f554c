"""The provider interface: what an agent run asks of an LLM backend.

A provider turns a :class:`ProviderRequest` into an async stream of
:class:`TextDelta` and :class:`ToolCallChunk` items followed by exactly one
:class:`Finish`. Tool-call pieces come normalized whatever the upstream's dialect
or quirks: ``index`` 0-based in call order, a call's first piece carrying its
``id`` (generated when the upstream gave none) and ``name``, later pieces only
``index`` and the next ``arguments`` fragment; ``Finish.reason`` is
``tool_calls`` whenever calls were made. Failures are
raised as :class:`ProviderError` with one of the kinds below; the worker maps the
kind to the client-facing error (SPEC §2) in one place (``workers/errors.py``).
Cancellation is plain asyncio cancellation of the consuming task: a provider
must release its HTTP request when its generator is closed or cancelled.

Every provider also implements :class:`Embedder` (``POST /v1/embeddings``, SPEC
§11), raising :class:`ProviderError` when its API has no embeddings. It is a
protocol of its own so that a model that only chats (a test's scripted one) is
still a :class:`Provider`; the worker checks for it where it embeds.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from bus.messages import (
    ImagePart,
    SamplingParams,
    ToolCall,
    ToolCallChunk,
    ToolChoice,
    ToolSpec,
    Usage,
)

ErrorKind = Literal["auth", "rate_limit", "unreachable", "timeout", "bad_response", "failed"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the conversation sent upstream: user text (+ images), an
    assistant reply (text + ``tool_calls``) or a tool result (``role="tool"``,
    ``tool_call_id``, ``name`` when known, the result in ``content``)."""

    role: Literal["user", "assistant", "tool"]
    content: str
    images: tuple[ImagePart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    model: str
    system: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    # The client's function tools and tool_choice (SPEC §7), in OpenAI's terms:
    # each provider translates them to its own dialect.
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    # How many of the leading ``messages`` are the session's stored turns, the
    # same objects run after run while its window is cached (a provider may keep
    # their encoding: workers/window_memo.py); 0: none; -1: a history whose
    # messages were rebuilt as a whole (paired tool traffic), many of them still
    # the same objects run after run.
    history: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: Literal["stop", "length", "tool_calls"] = "stop"
    usage: Usage = field(default_factory=Usage)


StreamItem = TextDelta | ToolCallChunk | Finish

__all__ = ["ChatMessage", "Embedder", "ErrorKind", "Finish", "ImagePart", "Provider",
           "ProviderError", "ProviderRequest", "StreamItem", "TextDelta", "ToolCall",
           "ToolCallChunk", "ToolChoice", "ToolSpec"]


class ProviderError(Exception):
    """An upstream failure, classified so it maps to one SPEC §2 error row."""

    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after


class Provider(Protocol):
    def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        """Stream the reply; yields TextDelta items then one Finish."""
        ...

    async def aclose(self) -> None:
        """Release connections (called once at worker shutdown)."""
        ...


@runtime_checkable
class Embedder(Protocol):
    async def embed(self, model: str, inputs: Sequence[str],
                    dimensions: int | None) -> tuple[list[list[float]], int]:
        """One vector per input, in order (``dimensions`` values each when given,
        else the model's own), and the prompt tokens the upstream counted (0 if it
        reports none). Failures raise :class:`ProviderError`, as :meth:`Provider.stream`."""
        ...
