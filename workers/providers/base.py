"""The provider interface: what an agent run asks of an LLM backend.

A provider turns a :class:`ProviderRequest` into an async stream of
:class:`TextDelta` items followed by exactly one :class:`Finish`. Failures are
raised as :class:`ProviderError` with one of the kinds below; the worker maps the
kind to the client-facing error (SPEC §2) in one place (``workers/errors.py``).
Cancellation is plain asyncio cancellation of the consuming task: a provider
must release its HTTP request when its generator is closed or cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bus.messages import SamplingParams, Usage

ErrorKind = Literal["auth", "rate_limit", "unreachable", "timeout", "bad_response", "failed"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    model: str
    system: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: Literal["stop", "length"] = "stop"
    usage: Usage = field(default_factory=Usage)


StreamItem = TextDelta | Finish


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
