"""A chat request's ``messages`` → the agent's input (SPEC §2, §7, §8). Pure.

Two shapes come out:

- **Plain text** (no tool traffic): the SPEC §2 flattening — the current
  message, preceded by earlier turns as a context block — in
  :attr:`Conversation.message`. Images of the current message make it one
  structured user item (:attr:`Conversation.input`) carrying them.
- **Structured** (the conversation holds assistant tool calls or tool results):
  tool traffic is never flattened. A stateless call sends its whole conversation
  as structured items; a session call only what follows the client's last
  assistant message (the transcript holds the rest, and the worker checks tool
  results against the session's pending calls).

Images are not read here (URLs need fetching): :attr:`Conversation.images` says
which parts to resolve and which input item each belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from bus.messages import UNMATCHED_TOOL_RESULT, ChatItem, ToolCall

from .errors import invalid_request

MESSAGES_NOT_ARRAY = "`messages` must be an array."
MISSING_USER_MESSAGE = "Missing user message in `messages`."
HISTORY_HEADER = "[Chat messages since your last reply - for context]"
CURRENT_HEADER = "[Current message - respond to this]"
IMAGE_PLACEHOLDER = "[image]"

_TEXT_PART_TYPES = frozenset({"text", "input_text"})
IMAGE_PART_TYPES = frozenset({"image_url", "input_image"})
_SYSTEM_ROLES = frozenset({"system", "developer"})


def unmatched_tool_result(call_id: str) -> str:
    return UNMATCHED_TOOL_RESULT.format(call_id)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image part to resolve: ``part`` (the raw content part) belongs to
    ``input[item]``; ``where`` names it in errors (``messages[2].content[1]``)."""

    item: int
    where: str
    part: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Conversation:
    message: str  # the input as text (flattened, or the new user text)
    extra_system_prompt: str
    input: tuple[ChatItem, ...] = ()  # structured input; () for plain text
    images: tuple[ImageRef, ...] = ()
    structured: bool = False  # tool traffic: input is the conversation's items


@dataclass(slots=True)  # (not frozen: a frozen dataclass is slower to build)
class _Entry:
    index: int  # position in `messages`
    role: str  # "user" | "assistant" | "tool"
    raw: dict[str, Any]
    text: str
    images: tuple[tuple[int, dict[str, Any]], ...]  # (content index, part)


def read_conversation(messages: object, *, stateless: bool) -> Conversation:
    """Raises :class:`~gateway.errors.ApiError` (400) on a missing user message or a
    malformed tool message."""
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise invalid_request(MESSAGES_NOT_ARRAY)
    system_parts: list[str] = []
    entries: list[_Entry] = []
    tool_traffic = False
    for index, raw in enumerate(messages):
        if not isinstance(raw, dict):
            continue
        role = raw.get("role")
        if not isinstance(role, str):
            continue
        role = role.strip().lower()
        content = raw.get("content")
        text = content_text(content)
        if role in _SYSTEM_ROLES:
            if text:
                system_parts.append(text)
            continue
        if role == "function":
            role = "tool"
        elif role == "user":
            images = _image_parts(content) if isinstance(content, list) else ()
            entries.append(_Entry(index, role, raw, text, images))
            continue
        elif role not in ("assistant", "tool"):
            continue
        if not tool_traffic:
            tool_traffic = _is_tool_traffic(role, raw)
        entries.append(_Entry(index, role, raw, text, ()))
    extra_system_prompt = "\n\n".join(system_parts)
    if tool_traffic:
        return _structured(entries, extra_system_prompt, stateless)
    return _flattened(entries, extra_system_prompt)


def _is_tool_traffic(role: str, raw: dict[str, Any]) -> bool:
    if role == "assistant":
        calls = raw.get("tool_calls")
        return isinstance(calls, list) and bool(calls)
    return role == "tool" and isinstance(raw.get("tool_call_id"), str)


# --- plain text (SPEC §2) ----------------------------------------------------------


def _flattened(entries: list[_Entry], extra_system_prompt: str) -> Conversation:
    current_index = next(
        (i for i in range(len(entries) - 1, -1, -1)
         if entries[i].role != "assistant" and (entries[i].text or entries[i].images)),
        None)
    if current_index is None:
        raise invalid_request(MISSING_USER_MESSAGE)
    current = entries[current_index]
    current_text = current.text or IMAGE_PLACEHOLDER
    history = [f"{_label(e)}: {e.text}" for e in entries[:current_index] if e.text]
    if history:
        message = (f"{HISTORY_HEADER}\n" + "\n".join(history)
                   + f"\n\n{CURRENT_HEADER}\n{_label(current)}: {current_text}")
    else:
        message = current_text
    if not current.images:
        return Conversation(message, extra_system_prompt)
    # The images go to the model with the text; the bare "[image]" stand-in is
    # only for the transcript's text form.
    item = ChatItem(role="user", text=message if (history or current.text) else "")
    refs = tuple(ImageRef(0, f"messages[{current.index}].content[{j}]", part)
                 for j, part in current.images)
    return Conversation(message, extra_system_prompt, (item,), refs)


def _label(entry: _Entry) -> str:
    if entry.role == "user":
        return "User"
    if entry.role == "assistant":
        return "Assistant"
    for key in ("name", "tool_call_id"):
        value = entry.raw.get(key)
        if isinstance(value, str) and value.strip():
            return f"Tool:{value.strip()}"
    return "Tool"


# --- structured (SPEC §7) ----------------------------------------------------------


def _structured(entries: list[_Entry], extra_system_prompt: str,
                stateless: bool) -> Conversation:
    current = next((i for i in range(len(entries) - 1, -1, -1)
                    if entries[i].role == "tool"
                    or (entries[i].role == "user" and (entries[i].text or entries[i].images))),
                   None)
    if current is None:
        raise invalid_request(MISSING_USER_MESSAGE)
    entries = entries[:current + 1]  # what follows the current message is dropped
    # The new input: what follows the client's last assistant message.
    new_from = next((i + 1 for i in range(len(entries) - 1, -1, -1)
                     if entries[i].role == "assistant"), 0)
    first = 0 if stateless else new_from
    calls: dict[str, str] = {}  # tool call id → function name, of the calls made so far
    items: list[ChatItem] = []
    refs: list[ImageRef] = []
    for position, entry in enumerate(entries):
        if entry.role == "assistant":
            item = _assistant_item(entry)
            calls.update((c.id, c.name) for c in item.tool_calls)
        elif entry.role == "tool":
            item = _tool_item(entry, calls, check=stateless)
        else:
            text = entry.text
            if entry.images and position < new_from:  # only the new input's images
                text = "\n".join(t for t in (text, IMAGE_PLACEHOLDER) if t)
            elif entry.images:
                refs.extend(ImageRef(len(items), f"messages[{entry.index}].content[{j}]", part)
                            for j, part in entry.images)
            item = ChatItem(role="user", text=text)
        if position >= first:
            items.append(item)
    user_text = "\n".join(i.text for i in items[new_from - first:] if i.role == "user" and i.text)
    return Conversation(user_text, extra_system_prompt, tuple(items), tuple(refs),
                        structured=True)


def _assistant_item(entry: _Entry) -> ChatItem:
    raw_calls = entry.raw.get("tool_calls")
    calls: list[ToolCall] = []
    for j, raw in enumerate(raw_calls if isinstance(raw_calls, list) else ()):
        function = raw.get("function") if isinstance(raw, dict) else None
        call_id = raw.get("id") if isinstance(raw, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
            raise invalid_request(
                f"`messages[{entry.index}].tool_calls[{j}]` must be a function call with "
                "an `id` and a `function.name`.")
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):  # some clients send the object itself
            arguments = orjson.dumps(arguments).decode()
        calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
    return ChatItem(role="assistant", text=entry.text, tool_calls=tuple(calls))


def _tool_item(entry: _Entry, calls: dict[str, str], *, check: bool) -> ChatItem:
    call_id = entry.raw.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id.strip():
        raise invalid_request(f"`messages[{entry.index}].tool_call_id` must be a string.")
    if check and call_id not in calls:
        raise invalid_request(unmatched_tool_result(call_id))
    name = entry.raw.get("name")
    if not isinstance(name, str) or not name:
        name = calls.get(call_id, "")
    return ChatItem(role="tool", text=entry.text, tool_call_id=call_id, name=name)


# --- content parts -----------------------------------------------------------------


def content_text(content: object) -> str:
    """A message's text: a string, or its ``text``/``input_text`` parts joined by ``\\n``."""
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, list):
        return ""
    texts = [part["text"] for part in content
             if isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES
             and isinstance(part.get("text"), str)]
    return "\n".join(t for t in texts if t).strip()


def _image_parts(content: object) -> tuple[tuple[int, dict[str, Any]], ...]:
    if not isinstance(content, list):
        return ()
    return tuple((j, part) for j, part in enumerate(content)
                 if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES)
