"""``POST /v1/embeddings`` (SPEC §11): the chat endpoint's checks, then one
stateless bus run whose worker calls the embedding model.

Served while chat completions or responses are enabled, with their auth, error
envelope and check order: method → auth → size → JSON → ``model`` (an agent
target, as for chat) → agent → ``x-openclaw-model`` → the agent has an
embedding model → ``encoding_format`` → ``dimensions`` → ``user`` → ``input``.

The embedding model is ``x-openclaw-model`` (``provider/model``, or a bare model
id on the provider of the agent's embedding model, else of its chat model), else
the agent's ``embeddingModel``, else ``agents.defaults.embeddingModel``.

The run goes through :class:`~gateway.runs.RunClient` like any other (worker
selection, 503 without a worker, retries after a worker's loss, cancellation
when the client leaves) and ends with an ``Embedded`` event. Vectors travel as
base64 float32 (``bus.messages.pack_vector``): passed on as they are for
``encoding_format: base64``, unpacked into numbers for ``float``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from bus.messages import Embedded, EmbedParams, unpack_vector
from clawbus.config import Settings

from . import errors
from .auth import Authenticator
from .chat import checked_body, error_response, failure_error, not_served
from .chat_request import (
    BODY_NOT_OBJECT,
    MODEL_HEADER,
    USER_NOT_STRING,
    parse_model,
    resolve_agent,
    upstream_model_override,
)
from .disconnect import CancelOnDisconnect
from .errors import ApiError, invalid_request
from .runs import NoWorkerError, RunClient, RunHandle, RunRejected, RunSpec
from .sequencer import RunEvent

MAX_INPUTS = 2048
INPUT_INVALID = f"`input` must be a string or an array of 1 to {MAX_INPUTS} strings."
INPUT_TOKENS = "`input` as tokens (arrays of integers) is not supported: send text."
INPUT_EMPTY = "`input` must not be an empty string."
ENCODING_INVALID = "`encoding_format` must be `float` or `base64`."
DIMENSIONS_INVALID = "`dimensions` must be a positive integer."
_INT64_MAX = 2**63 - 1

Encoding = Literal["float", "base64"]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """One validated embeddings request: ``model`` is the request's, echoed back;
    ``embedding_model`` the ``provider/model`` that embeds ``inputs``."""

    model: str
    agent_id: str
    embedding_model: str
    inputs: tuple[str, ...]
    encoding: Encoding = "float"
    dimensions: int | None = None


def parse_embedding_request(body: object, headers: Mapping[str, str],
                            settings: Settings) -> EmbeddingRequest:
    """Validate ``body`` (parsed JSON) and ``headers`` in the module's check order;
    raises :class:`~gateway.errors.ApiError` (400) at the first failing check."""
    if not isinstance(body, dict):
        raise invalid_request(BODY_NOT_OBJECT)
    model, model_agent = parse_model(body.get("model"), settings)
    agent_id = resolve_agent(headers, model_agent, settings)
    embedding_model = _embedding_model(headers.get(MODEL_HEADER), agent_id, settings)
    encoding = _encoding(body.get("encoding_format"))
    dimensions = _dimensions(body.get("dimensions"))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid_request(USER_NOT_STRING)
    return EmbeddingRequest(model=model, agent_id=agent_id, embedding_model=embedding_model,
                            inputs=_inputs(body.get("input")), encoding=encoding,
                            dimensions=dimensions)


def _embedding_model(header: str | None, agent_id: str, settings: Settings) -> str:
    agent = settings.agent(agent_id)
    assert agent is not None  # resolved before
    own = settings.agent_embedding_model(agent)
    bare = (header or "").strip()
    if own is not None and bare and "/" not in bare:
        return f"{own.partition('/')[0]}/{bare}"
    model = upstream_model_override(header, agent_id, settings) or own
    if model is None:
        raise invalid_request(f"Agent '{agent_id}' has no embedding model.")
    return model


def _encoding(value: object) -> Encoding:
    if value is None or value == "float":
        return "float"
    if value == "base64":
        return "base64"
    raise invalid_request(ENCODING_INVALID)


def _dimensions(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _INT64_MAX:
        raise invalid_request(DIMENSIONS_INVALID)
    return value


def _inputs(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        if not value:
            raise invalid_request(INPUT_EMPTY)
        return (value,)
    if not isinstance(value, list) or not 0 < len(value) <= MAX_INPUTS:
        raise invalid_request(INPUT_INVALID)
    if isinstance(value[0], int | list) and not isinstance(value[0], bool):
        raise invalid_request(INPUT_TOKENS)
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise invalid_request(f"`input[{index}]` must be a string.")
        if not item:
            raise invalid_request(f"`input[{index}]` must not be an empty string.")
    return tuple(value)


def response_body(request: EmbeddingRequest, event: Embedded) -> bytes:
    """The OpenAI ``CreateEmbeddingResponse`` for a run's vectors."""
    packed = request.encoding == "base64"
    data = [{"object": "embedding", "index": index,
             "embedding": vector if packed else unpack_vector(vector)}
            for index, vector in enumerate(event.vectors)]
    tokens = event.usage.prompt_tokens
    body: dict[str, Any] = {"object": "list", "data": data, "model": request.model,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return orjson.dumps(body)


class Embeddings:
    """The endpoint, bound to one gateway's settings, authenticator and run client."""

    def __init__(self, settings: Settings, auth: Authenticator, runs: RunClient) -> None:
        self.settings = settings
        self.auth = auth
        self.runs = runs
        endpoints = settings.gateway.http.endpoints
        served = [config for config in (endpoints.chat_completions, endpoints.responses)
                  if config.enabled]
        self.enabled = bool(served)
        self.max_body_bytes = max((config.max_body_bytes for config in served), default=0)

    async def __call__(self, request: Request) -> Response:
        if (refused := not_served(request, self.enabled)) is not None:
            return refused
        try:
            body = await checked_body(request, self.auth, self.max_body_bytes)
            embedding = parse_embedding_request(body, request.headers, self.settings)
            handle = await self._submit(embedding)
        except ApiError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        event: RunEvent | None = None
        try:
            async with CancelOnDisconnect(request.receive) as watch:
                async for shown in handle.events():
                    event = shown  # the last one ends the run
        except asyncio.CancelledError:  # the server is shutting down
            self.runs.in_background(handle.cancel())
            raise
        except NoWorkerError:
            return error_response(errors.no_worker())
        if watch.disconnected or event is None:
            await handle.cancel()
            return Response(status_code=499)
        if event.type == "error":
            return error_response(failure_error(event))
        if event.type != "embedded":
            raise RuntimeError(f"an embeddings run ended with {event.type!r}")
        return Response(response_body(embedding, event), media_type="application/json")

    async def _submit(self, embedding: EmbeddingRequest) -> RunHandle:
        run_id = f"emb_{uuid.uuid4()}"
        spec = RunSpec(agent_id=embedding.agent_id,
                       session_key=f"agent:{embedding.agent_id}:openai-embeddings:{run_id}",
                       message="", run_id=run_id, ephemeral=True, stream=False,
                       model=embedding.embedding_model,
                       embed=EmbedParams(inputs=embedding.inputs,
                                         dimensions=embedding.dimensions))
        try:
            return await self.runs.submit(spec)
        except RunRejected as rej:
            if rej.status == 413:
                raise errors.payload_too_large() from None
            raise errors.no_worker() from None
