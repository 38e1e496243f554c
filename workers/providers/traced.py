"""A provider seen through tracing (SPEC §13): each model call is a CLIENT span
with the GenAI attributes, current while the provider talks to its upstream (so
the HTTP client sends its ``traceparent``), its first token an event.

The worker wraps its providers in :class:`TracedProvider` only when tracing is
on; with tracing off nothing here is imported.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import orjson

from clawbus.spans import Span, Spans

from .base import Embedder, Finish, Provider, ProviderError, ProviderRequest, StreamItem, TextDelta

# gen_ai.system for each ``api`` of models.providers
SYSTEMS = {"openai-completions": "openai", "anthropic-messages": "anthropic", "echo": "echo"}


class TracedProvider:
    """``inner`` with a span around every :meth:`stream` and :meth:`embed`."""

    def __init__(self, inner: Provider, api: str, spans: Spans) -> None:
        self.inner = inner
        self.system = SYSTEMS.get(api, api)
        self._spans = spans

    def _start(self, operation: str, model: str) -> Span:
        return self._spans.start(f"{operation} {model}", kind="client", attributes={
            "gen_ai.operation.name": operation, "gen_ai.system": self.system,
            "gen_ai.request.model": model})

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        spans = self._spans
        span = self._start("chat", request.model)
        params = request.params
        if params.max_tokens is not None:
            span.set_attribute("gen_ai.request.max_tokens", params.max_tokens)
        if params.temperature is not None:
            span.set_attribute("gen_ai.request.temperature", params.temperature)
        if spans.capture_content:
            span.add_event("gen_ai.prompt", {"gen_ai.prompt": _prompt(request)})
        texts: list[str] | None = [] if spans.capture_content else None
        first = True
        items = self.inner.stream(request)
        try:
            while True:
                # Current only while the provider runs (not while our caller
                # handles what it yields).
                token = spans.attach(span)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    break
                finally:
                    spans.detach(token)
                if first and not isinstance(item, Finish):
                    first = False
                    span.add_event("gen_ai.first_token")
                if isinstance(item, Finish):
                    span.set_attributes({
                        "gen_ai.response.finish_reasons": (item.reason,),
                        "gen_ai.usage.input_tokens": item.usage.prompt_tokens,
                        "gen_ai.usage.output_tokens": item.usage.completion_tokens})
                elif texts is not None and isinstance(item, TextDelta):
                    texts.append(item.text)
                yield item
        except Exception as exc:
            spans.failed(span, exc)
            raise
        finally:
            await items.aclose()
            if texts:
                span.add_event("gen_ai.completion", {"gen_ai.completion": "".join(texts)})
            span.end()

    async def embed(self, model: str, inputs: Sequence[str],
                    dimensions: int | None) -> tuple[list[list[float]], int]:
        if not isinstance(self.inner, Embedder):
            raise ProviderError("failed", "this model provider has no embeddings API")
        span = self._start("embeddings", model)
        span.set_attribute("gen_ai.request.embedding.inputs", len(inputs))
        token = self._spans.attach(span)
        try:
            vectors, tokens = await self.inner.embed(model, inputs, dimensions)
            span.set_attribute("gen_ai.usage.input_tokens", tokens)
        except Exception as exc:
            self._spans.failed(span, exc)
            raise
        finally:
            self._spans.detach(token)
            span.end()
        return vectors, tokens

    async def aclose(self) -> None:
        await self.inner.aclose()


def _prompt(request: ProviderRequest) -> str:
    """The prompt as JSON messages (for ``captureContent`` only)."""
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages += [{"role": m.role, "content": m.content} for m in request.messages]
    return orjson.dumps(messages).decode()
