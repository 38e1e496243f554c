"""Validate a ``POST /v1/responses`` body into one agent turn (SPEC §10). Pure.

A Responses request is read as the chat completion it amounts to, through the
chat endpoint's own validation, so both doors share one set of rules and one
check order: :func:`~gateway.chat_request.parse_chat_request` takes the head of
the request (model → agent → ``x-openclaw-model`` → session header → sampling
parameters); then come this endpoint's own parameters, the tools
(:func:`~gateway.tool_params.parse_tools`, each Responses tool mapped to the
chat shape) and the input (:func:`~gateway.conversation.read_conversation`,
each input item mapped to a chat message). Errors that name a chat field are
renamed to the Responses field (``input[2]``, ``tools[0].name``,
``max_output_tokens``) on the way out.

``previous_response_id`` needs the bus, so :mod:`gateway.responses` resolves
it; here it only makes the input read with session semantics (what follows
the last assistant item is new; the transcript holds the rest).
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from clawbus.config import Settings

from .chat_request import BODY_NOT_OBJECT, ChatRequest, parse_chat_request
from .conversation import MISSING_USER_MESSAGE, ImageRef, read_conversation
from .errors import ApiError, invalid_request
from .tool_params import TOOL_CHOICE_INVALID, parse_tools

MISSING_USER_INPUT = "Missing user message in `input`."
INPUT_INVALID = "`input` must be a string or an array of input items."
INSTRUCTIONS_NOT_STRING = "`instructions` must be a string."
PREVIOUS_NOT_STRING = "`previous_response_id` must be a string."
METADATA_INVALID = "`metadata` must be an object of at most 16 strings."
TRUNCATION_INVALID = '`truncation` must be "auto" or "disabled".'
RESPONSES_TOOL_CHOICE_INVALID = (
    '`tool_choice` must be "auto", "none", "required" or {"type": "function", "name": ...}.')
RESPONSES_FUNCTION_TOOL = '({"type": "function", "name": ...})'
_CHAT_FUNCTION_TOOL = '({"type": "function", "function": {...}})'
_MAX_METADATA = 16

_SYSTEM_ROLES = frozenset({"system", "developer"})
_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_PART_TYPES = _TEXT_PARTS | {"input_image", "refusal"}
_IGNORED_ITEMS = frozenset({"reasoning", "item_reference"})
# What read_conversation needs to get past its step while the input is checked
# later (the check order puts the tools first).
_PLACEHOLDER = [{"role": "user", "content": "-"}]


def previous_not_found(response_id: str) -> ApiError:
    return invalid_request(f"Previous response with id '{response_id}' not found.")


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """One validated Responses request.

    ``chat`` is the turn as a chat completion would run it (model to echo, agent,
    session key, input, tools, sampling parameters, ``x-openclaw-model``); its
    ``extra_system_prompt`` already holds ``instructions``. A stateless request
    gets a fresh session key of its own (``agent:<id>:openresponses:<uuid>``),
    which its response id makes continuable. ``previous_response_id`` is still
    to be resolved to its session. The other fields are echoed in the Response.
    """

    chat: ChatRequest
    previous_response_id: str | None = None
    instructions: str | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    truncation: str = "disabled"
    user: str | None = None


def parse_responses_request(body: object, headers: Mapping[str, str],
                            settings: Settings) -> ResponsesRequest:
    """Validate ``body`` (parsed JSON) and ``headers`` (lower-cased names) per SPEC §10.

    Raises :class:`~gateway.errors.ApiError` (400) at the first failing check."""
    if not isinstance(body, dict):
        raise invalid_request(BODY_NOT_OBJECT)
    head = {"model": body.get("model"), "user": body.get("user"), "stream": body.get("stream"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "max_completion_tokens": body.get("max_output_tokens"), "messages": _PLACEHOLDER}
    chat = _renamed(lambda: parse_chat_request(head, headers, settings), {})
    instructions = _optional_str(body, "instructions", INSTRUCTIONS_NOT_STRING)
    previous = _optional_str(body, "previous_response_id", PREVIOUS_NOT_STRING)
    metadata = _metadata(body.get("metadata"))
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise invalid_request(TRUNCATION_INVALID)
    tools, tool_choice = _renamed(lambda: parse_tools(_chat_tools(body)), {})
    messages, origins = _messages(body.get("input"))
    stateless = chat.ephemeral_session and previous is None
    conversation = _renamed(lambda: read_conversation(messages, stateless=stateless), origins)
    extra = "\n\n".join(p for p in (instructions, conversation.extra_system_prompt) if p)
    session_key = chat.session_key
    if chat.ephemeral_session:
        session_key = f"agent:{chat.agent_id}:openresponses:{uuid.uuid4()}"
    chat = dataclasses.replace(
        chat, session_key=session_key, message=conversation.message, extra_system_prompt=extra,
        input=conversation.input,
        images=tuple(ImageRef(ref.item, _input_refs(ref.where, origins), ref.part)
                     for ref in conversation.images),
        tools=tools, tool_choice=tool_choice)
    parallel = body.get("parallel_tool_calls")
    user = body.get("user")
    return ResponsesRequest(
        chat=chat, previous_response_id=previous, instructions=instructions,
        parallel_tool_calls=parallel if isinstance(parallel, bool) else True,
        metadata=metadata, truncation=truncation or "disabled",
        user=user if isinstance(user, str) else None)


# --- the chat endpoint's checks, in Responses terms ------------------------------

_T = TypeVar("_T")
_MESSAGE_REF = re.compile(r"messages\[(\d+)\]")
_TOOL_FIELD = re.compile(r"`tools\[(\d+)\]\.function\.")


def _renamed(check: Callable[[], _T], origins: dict[int, int]) -> _T:
    """``check()``, with the chat field names in its error renamed to the Responses
    ones (``origins``: chat message index → input item index)."""
    try:
        return check()
    except ApiError as exc:
        raise ApiError(exc.status, _rename(exc.message, origins), exc.type, exc.code,
                       exc.headers) from None


def _rename(message: str, origins: dict[int, int]) -> str:
    if message == TOOL_CHOICE_INVALID:
        return RESPONSES_TOOL_CHOICE_INVALID
    if message == MISSING_USER_MESSAGE:
        return MISSING_USER_INPUT
    message = message.replace("`max_completion_tokens`", "`max_output_tokens`")
    message = _TOOL_FIELD.sub(r"`tools[\1].", message)
    message = message.replace(_CHAT_FUNCTION_TOOL, RESPONSES_FUNCTION_TOOL)
    return _input_refs(message, origins)


def _input_refs(text: str, origins: dict[int, int]) -> str:
    """``messages[k]`` → ``input[i]``, the item message ``k`` was made from."""
    return _MESSAGE_REF.sub(lambda m: f"input[{origins.get(int(m[1]), int(m[1]))}]", text)


def _chat_tools(body: dict[str, Any]) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` in the chat shape (anything else as it is,
    for the chat checks to refuse)."""
    tools = body.get("tools")
    if isinstance(tools, list):
        tools = [{"type": "function", "function": {
            key: entry[key] for key in ("name", "description", "parameters", "strict")
            if entry.get(key) is not None}}
                 if isinstance(entry, dict) and entry.get("type") == "function" else entry
                 for entry in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return {"tools": tools, "tool_choice": choice,
            "parallel_tool_calls": body.get("parallel_tool_calls")}


# --- this endpoint's own parameters ----------------------------------------------


def _optional_str(body: dict[str, Any], name: str, error: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid_request(error)
    return value or None


def _metadata(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > _MAX_METADATA \
            or not all(isinstance(v, str) for v in raw.values()):
        raise invalid_request(METADATA_INVALID)
    return raw


# --- input items → chat messages -------------------------------------------------


def _messages(raw: object) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """(the chat messages, chat message index → input item index). Consecutive
    assistant text and function calls become one assistant message, as a chat
    completion returns them."""
    if raw is None:
        return [], {}
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}], {0: 0}
    if not isinstance(raw, list):
        raise invalid_request(INPUT_INVALID)
    messages: list[dict[str, Any]] = []
    origins: dict[int, int] = {}
    for i, item in enumerate(raw):
        message = _message(item, i)
        if message is None:
            continue
        last = messages[-1] if messages else None
        if "tool_calls" in message and last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).extend(message["tool_calls"])
            continue
        origins[len(messages)] = i
        messages.append(message)
    return messages, origins


def _message(item: object, i: int) -> dict[str, Any] | None:
    """One input item as a chat message; None for items that carry nothing for
    the model (reasoning, item references)."""
    if not isinstance(item, dict):
        raise invalid_request(f"`input[{i}]` must be an object.")
    kind = item.get("type", "message")
    if kind == "message":
        return _message_item(item, i)
    if kind == "function_call":
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        if not _nonblank(call_id) or not _nonblank(name) or not isinstance(arguments, str):
            raise invalid_request(f"`input[{i}]`: a function_call needs a `call_id`, "
                                  "a `name` and `arguments` (a string).")
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": arguments}}]}
    if kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not _nonblank(call_id) or not isinstance(output, str | list):
            raise invalid_request(f"`input[{i}]`: a function_call_output needs a `call_id` "
                                  "and an `output`.")
        content = output if isinstance(output, str) else _parts(output, i)
        return {"role": "tool", "tool_call_id": call_id, "content": content}
    if kind in _IGNORED_ITEMS:
        return None
    raise invalid_request(f"`input[{i}]` has an unsupported type {kind!r}.")


def _message_item(item: dict[str, Any], i: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise invalid_request(
            f"`input[{i}].role` must be one of system, developer, user, assistant.")
    content = item.get("content")
    if isinstance(content, list):
        return {"role": role, "content": _parts(content, i)}
    if not isinstance(content, str):
        raise invalid_request(f"`input[{i}].content` must be a string or an array of parts.")
    return {"role": role, "content": content}


def _parts(parts: list[Any], i: int) -> list[dict[str, Any]]:
    """Content parts in the chat shape, one for one (so that indexes still name them)."""
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or kind not in _PART_TYPES:
            raise invalid_request(f"`input[{i}].content[{j}]` has an unsupported type "
                                  f"{kind!r}.")
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_request(f"`input[{i}].content[{j}].text` must be a string.")
            out.append({"type": "input_text", "text": text})
        else:
            out.append(part)
    return out


def _nonblank(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())
