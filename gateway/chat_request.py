"""Validate a ``POST /v1/chat/completions`` body into one agent turn.

:func:`parse_chat_request` is pure: it takes the parsed JSON body, the request
headers and the settings, and either returns a :class:`ChatRequest` or raises
:class:`~gateway.errors.ApiError`. The HTTP layer has already checked method,
auth, size and JSON syntax; the checks here follow SPEC §2 from the "body" row
on, in order: body → model → agent (and ``x-openclaw-model``) → session header
→ params (and client tools) → messages, so a request with several problems
always reports the first one. ``messages`` become the agent's input in
:mod:`gateway.conversation`.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bus.messages import ChatItem, SamplingParams, ToolChoice, ToolSpec
from clawbus.config import AGENT_ID_RE, Settings
from gateway.errors import invalid_request

from .conversation import ImageRef, read_conversation
from .tool_params import parse_tools

DEFAULT_MODEL = "openclaw"
AGENT_HEADERS = ("x-openclaw-agent-id", "x-openclaw-agent")
SESSION_KEY_HEADER = "x-openclaw-session-key"
MODEL_HEADER = "x-openclaw-model"

BODY_NOT_OBJECT = "Request body must be a JSON object."
INVALID_MODEL = "Invalid `model`. Use `openclaw` or `openclaw/<agentId>`."
RESERVED_SESSION_KEY = (
    "`x-openclaw-session-key` cannot use reserved internal session namespaces."
)
USER_NOT_STRING = "`user` must be a string."
# Session keys become NATS subject tokens (4/3 of their UTF-8 size): bounded so that
# every subject and API line stays far below NATS's 4 kB control-line limit (past
# it the server drops the connection, which would take the gateway off the bus).
MAX_SESSION_KEY = 512
SESSION_KEY_TOO_LONG = f"`x-openclaw-session-key` is longer than {MAX_SESSION_KEY} characters."
USER_TOO_LONG = f"`user` is longer than {MAX_SESSION_KEY} characters."
STREAM_NOT_BOOL = "`stream` must be a boolean."
STREAM_OPTIONS_NOT_OBJECT = "`stream_options` must be an object."
INCLUDE_USAGE_NOT_BOOL = "`stream_options.include_usage` must be a boolean."
STOP_INVALID = "`stop` must be a string or an array of at most 4 strings."

_AGENT_ID = r"[a-z0-9][a-z0-9_-]{0,63}"
_MODEL_AGENT_RE = re.compile(rf"^(?:openclaw[:/]|agent:)(?P<id>{_AGENT_ID})$", re.IGNORECASE)
_RESERVED_SESSION_RE = re.compile(r"^(?:agent:[^:]*:)?(?:subagent|cron|acp):", re.IGNORECASE)
_MAX_STOP = 4
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# (field, low, high) of the float sampling parameters.
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("temperature", 0.0, 2.0),
    ("top_p", 0.0, 1.0),
    ("frequency_penalty", -2.0, 2.0),
    ("presence_penalty", -2.0, 2.0),
)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One validated chat-completions request, ready to become a ``RunRequest``.

    ``model`` is the request's ``model`` echoed back in responses (``openclaw``
    when absent or blank). ``message`` is the agent input as text: the current
    message, preceded by earlier turns as context when there are any; ``input``
    the structured input when there is more than text (see
    :mod:`gateway.conversation`), with ``images`` still to resolve.
    ``include_usage`` is ``stream_options.include_usage`` and is only ever true
    for a streaming request. ``upstream_model`` is ``x-openclaw-model`` resolved
    to ``provider/model``.
    """

    model: str
    agent_id: str
    session_key: str
    message: str
    extra_system_prompt: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    # True when the session key was generated here (no header, no ``user``): a
    # stateless call whose session no other request can ever join.
    ephemeral_session: bool = False
    input: tuple[ChatItem, ...] = ()
    images: tuple[ImageRef, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    upstream_model: str | None = None


def parse_chat_request(
    body: object, headers: Mapping[str, str], settings: Settings
) -> ChatRequest:
    """Validate ``body`` (parsed JSON) and ``headers`` (lower-cased names) per SPEC §2.

    Raises :class:`~gateway.errors.ApiError` (400 ``invalid_request_error``) at the
    first failing check.
    """
    if not isinstance(body, dict):
        raise invalid_request(BODY_NOT_OBJECT)
    model, model_agent = parse_model(body.get("model"), settings)
    agent_id = resolve_agent(headers, model_agent, settings)
    upstream_model = upstream_model_override(headers.get(MODEL_HEADER), agent_id, settings)
    session_key, ephemeral = _resolve_session_key(headers, body.get("user"), agent_id)
    stream, include_usage, params = _parse_params(body)
    tools, tool_choice = parse_tools(body)
    conversation = read_conversation(body.get("messages"), stateless=ephemeral)
    return ChatRequest(
        model=model,
        agent_id=agent_id,
        session_key=session_key,
        message=conversation.message,
        extra_system_prompt=conversation.extra_system_prompt,
        params=params,
        stream=stream,
        include_usage=include_usage,
        ephemeral_session=ephemeral,
        input=conversation.input,
        images=conversation.images,
        tools=tools,
        tool_choice=tool_choice,
        upstream_model=upstream_model,
    )


# --- model and agent -------------------------------------------------------------


def parse_model(raw: object, settings: Settings) -> tuple[str, str]:
    """(the model to echo, the agent the model names)."""
    if raw is None:
        return DEFAULT_MODEL, settings.default_agent_id
    if not isinstance(raw, str):
        raise invalid_request(INVALID_MODEL)
    model = raw.strip()
    if not model:
        # As in OpenClaw, a blank model counts as an absent one.
        return DEFAULT_MODEL, settings.default_agent_id
    if model.lower() in ("openclaw", "openclaw/default"):
        return raw, settings.default_agent_id
    match = _MODEL_AGENT_RE.match(model)
    if match is None:
        raise invalid_request(INVALID_MODEL)
    return raw, match.group("id").lower()


def resolve_agent(headers: Mapping[str, str], model_agent: str, settings: Settings) -> str:
    """The agent header's id if set (it wins over ``model``), else the model's; must exist."""
    agent_id = model_agent
    for name in AGENT_HEADERS:
        value = headers.get(name, "").strip()
        if value:
            agent_id = value.lower()
            break
    if not AGENT_ID_RE.match(agent_id) or settings.agent(agent_id) is None:
        raise invalid_request(f"Unknown agent '{agent_id}'.")
    return agent_id


def upstream_model_override(raw: str | None, agent_id: str, settings: Settings) -> str | None:
    """``x-openclaw-model`` (SPEC §12) as ``provider/model``: ``provider/model`` with a
    configured provider, or a bare model id on the agent's own provider; None when
    the header is absent or blank."""
    value = (raw or "").strip()
    if not value:
        return None
    provider, slash, model = value.partition("/")
    if slash:
        if provider not in settings.providers:
            raise invalid_request(f"Unknown model provider '{provider}'.")
        if not model.strip():
            raise invalid_request(f"`{MODEL_HEADER}` must be `provider/model` or a model id.")
        return value
    agent = settings.agent(agent_id)
    assert agent is not None  # resolved before
    return f"{settings.agent_model(agent)[0]}/{value}"


# --- session key -----------------------------------------------------------------


def _resolve_session_key(headers: Mapping[str, str], user: object,
                         agent_id: str) -> tuple[str, bool]:
    """(the session key, whether it was generated for this call alone)."""
    if user is not None and not isinstance(user, str):
        raise invalid_request(USER_NOT_STRING)
    explicit = headers.get(SESSION_KEY_HEADER, "").strip()
    if explicit:
        if len(explicit) > MAX_SESSION_KEY:
            raise invalid_request(SESSION_KEY_TOO_LONG)
        if is_reserved_session_key(explicit):
            raise invalid_request(RESERVED_SESSION_KEY)
        return explicit, False
    user_id = (user or "").strip()
    if user_id:
        if len(user_id) > MAX_SESSION_KEY:
            raise invalid_request(USER_TOO_LONG)
        return f"agent:{agent_id}:openai-user:{user_id.lower()}", False
    return f"agent:{agent_id}:openai:{uuid.uuid4()}", True


def is_reserved_session_key(key: str) -> bool:
    """True for keys in OpenClaw's internal namespaces (``subagent:``, ``cron:``, ``acp:``).

    Both the bare form and the agent-scoped form ``agent:<id>:cron:…`` are reserved.
    """
    return _RESERVED_SESSION_RE.match(key.strip()) is not None


# --- sampling parameters ---------------------------------------------------------


def _parse_params(body: dict[str, Any]) -> tuple[bool, bool, SamplingParams]:
    """(stream, include_usage, sampling params). ``null`` means absent for every field."""
    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise invalid_request(STREAM_NOT_BOOL)

    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_request(STREAM_OPTIONS_NOT_OBJECT)
        flag = options.get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise invalid_request(INCLUDE_USAGE_NOT_BOOL)
        include_usage = bool(flag)

    # Both are validated; the newer `max_completion_tokens` wins when both are set.
    max_tokens = _positive_int(body, "max_tokens")
    max_completion_tokens = _positive_int(body, "max_completion_tokens")
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens

    floats = {name: _number_in_range(body, name, low, high) for name, low, high in _RANGES}
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=floats["temperature"],
        top_p=floats["top_p"],
        frequency_penalty=floats["frequency_penalty"],
        presence_penalty=floats["presence_penalty"],
        seed=_seed(body),
        stop=_stop(body.get("stop")),
    )
    return stream, stream and include_usage, params


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but `true` is not a token count.
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not 0 < value <= _INT64_MAX:
        raise invalid_request(f"`{name}` must be a positive integer.")
    return int(value)


def _number_in_range(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise invalid_request(f"`{name}` must be a number.")
    out_of_range = invalid_request(f"`{name}` must be between {_fmt(low)} and {_fmt(high)}.")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise out_of_range from None
    # NaN fails every comparison, so it lands here too; so do ±inf.
    if not (math.isfinite(number) and low <= number <= high):
        raise out_of_range
    return number


def _fmt(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() else str(bound)


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value) or not _INT64_MIN <= value <= _INT64_MAX:
        raise invalid_request("`seed` must be an integer.")
    return int(value)


def _stop(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if (
        isinstance(value, list)
        and len(value) <= _MAX_STOP
        and all(isinstance(item, str) for item in value)
    ):
        return tuple(value) or None
    raise invalid_request(STOP_INVALID)
