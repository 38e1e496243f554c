"""Embeddings on a worker (SPEC §11).

An embeddings request reaches a worker as a stateless run (``RunRequest.embed``,
always ephemeral: no session, no lease, no transcript) so that worker selection,
retries after a worker's loss, liveness probes and cancellation are the ones
every run has. The worker runs :func:`embed` where an agent turn would generate
a reply, under the same timeout, and answers with one ``Embedded`` event
(:meth:`workers.events.Emitter.embedded`) instead of ``Done``. Nothing is stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bus.messages import EmbedParams, pack_vector

from .providers.base import Embedder, Provider, ProviderError


@dataclass(frozen=True, slots=True)
class Embedding:
    """The vectors of one embeddings run, as they travel (``pack_vector``)."""

    vectors: tuple[str, ...]
    prompt_tokens: int
    seconds: float


async def embed(provider: Provider, model: str, params: EmbedParams) -> Embedding:
    """The vectors of ``params.inputs`` from ``provider``'s ``model``; raises
    :class:`ProviderError` as a reply's generation does."""
    if not isinstance(provider, Embedder):
        raise ProviderError("failed", "this model provider has no embeddings API")
    started = time.monotonic()
    vectors, prompt_tokens = await provider.embed(model, params.inputs, params.dimensions)
    if len(vectors) != len(params.inputs):
        raise ProviderError("bad_response", f"upstream returned {len(vectors)} embeddings "
                            f"for {len(params.inputs)} inputs")
    return Embedding(tuple(pack_vector(vector) for vector in vectors), prompt_tokens,
                     time.monotonic() - started)
