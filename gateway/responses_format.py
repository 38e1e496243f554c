"""OpenAI Response objects and their stream events (SPEC §10), encoded with orjson.

:class:`ResponseOutput` builds a response's output items from what the run
shows (text, client tool-call pieces, its end) and says, for each step, which
stream events it causes; the streaming door numbers and frames them
(:class:`EventFrames`), the JSON door keeps only the final object. One builder
for both, so a streamed response ends with exactly the object a non-streamed
one would have returned.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from bus.messages import ToolCall, ToolCallChunk, ToolChoice, ToolSpec, Usage

from .openai_format import EMPTY_REPLY
from .responses_request import ResponsesRequest

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    """``resp_…``, ``msg_…``, ``fc_…``: a fresh id of that kind."""
    return f"{prefix}_{uuid.uuid4().hex}"


def echo_tool_choice(choice: ToolChoice | None) -> str | dict[str, str]:
    """``tool_choice`` as a Response shows it."""
    if choice is None:
        return "auto"
    if choice.mode == "function":
        return {"type": "function", "name": choice.name}
    return choice.mode


def echo_tool(tool: ToolSpec) -> dict[str, Any]:
    """A function tool as a Response shows it."""
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": tool.parameters, "strict": tool.strict}


def usage_object(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def skeleton(response_id: str, created_at: int, request: ResponsesRequest) -> dict[str, Any]:
    """The Response as it stands before any output: what the request set, echoed."""
    chat = request.chat
    response: dict[str, Any] = {
        "id": response_id, "object": "response", "created_at": created_at,
        "status": "in_progress", "completed_at": None, "error": None,
        "incomplete_details": None, "instructions": request.instructions,
        "max_output_tokens": chat.params.max_tokens, "model": chat.model, "output": [],
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id, "reasoning": None,
        "temperature": chat.params.temperature, "text": {"format": {"type": "text"}},
        "tool_choice": echo_tool_choice(chat.tool_choice),
        "tools": [echo_tool(tool) for tool in chat.tools], "top_p": chat.params.top_p,
        "truncation": request.truncation, "metadata": request.metadata, "background": False,
    }
    if request.user is not None:
        response["user"] = request.user
    return response


@dataclass(slots=True)
class _Message:
    id: str
    index: int
    text: str = ""

    def item(self, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part()]
        return {"id": self.id, "type": "message", "role": "assistant", "status": status,
                "content": content}

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}


@dataclass(slots=True)
class _Call:
    id: str
    index: int
    call_id: str
    name: str
    arguments: str = ""

    def item(self, status: str) -> dict[str, Any]:
        return {"id": self.id, "type": "function_call", "status": status,
                "call_id": self.call_id, "name": self.name,
                "arguments": "" if status == "in_progress" else self.arguments}


@dataclass(slots=True)
class ResponseOutput:
    """The output items of one response, in order. Each step returns the stream
    events it causes (without sequence numbers)."""

    response: dict[str, Any]  # the skeleton
    items: list[_Message | _Call] = field(default_factory=list)
    _calls: dict[int, _Call] = field(default_factory=dict)  # by tool-call index
    _open: _Message | _Call | None = None

    def text(self, delta: str) -> list[Event]:
        events: list[Event] = []
        message = self._open
        if not isinstance(message, _Message):
            events += self._close()
            message = _Message(new_id("msg"), len(self.items))
            self._add(message, events)
            events.append({"type": "response.content_part.added", "item_id": message.id,
                           "output_index": message.index, "content_index": 0,
                           "part": message.part()})
        message.text += delta
        events.append({"type": "response.output_text.delta", "item_id": message.id,
                       "output_index": message.index, "content_index": 0, "delta": delta,
                       "logprobs": []})
        return events

    def tool_calls(self, chunks: tuple[ToolCallChunk, ...]) -> list[Event]:
        events: list[Event] = []
        for chunk in chunks:
            call = self._calls.get(chunk.index)
            if call is None or chunk.id is not None:  # a call's first piece
                events += self._close()
                call = _Call(new_id("fc"), len(self.items), chunk.id or new_id("call"),
                             chunk.name or "")
                self._calls[chunk.index] = call
                self._add(call, events)
            call.arguments += chunk.arguments
            # A piece of a call already closed (never sent by a provider that
            # streams calls one after another) only completes its arguments.
            if chunk.arguments and call is self._open:
                events.append({"type": "response.function_call_arguments.delta",
                               "item_id": call.id, "output_index": call.index,
                               "delta": chunk.arguments})
        return events

    def reconcile(self, text: str, calls: tuple[ToolCall, ...]) -> list[Event]:
        """What the run's end says that was not streamed: all of a reply that came
        whole (a non-streaming run), else any text or call the stream lacked."""
        shown = "".join(item.text for item in self.items if isinstance(item, _Message))
        events = self.text(text[len(shown):]) if len(text) > len(shown) \
            and text.startswith(shown) else []
        pieces = tuple(ToolCallChunk(index=i, id=c.id, name=c.name, arguments=c.arguments)
                       for i, c in enumerate(calls) if i not in self._calls)
        return events + self.tool_calls(pieces)

    def finish(self, finish_reason: str, usage: Usage) -> tuple[list[Event], dict[str, Any]]:
        """(the events that end the output, the final Response)."""
        events = [] if self.items else self.text(EMPTY_REPLY)
        incomplete = finish_reason == "length"
        events += self._close("incomplete" if incomplete else "completed")
        response = self._final("incomplete" if incomplete else "completed")
        response["usage"] = usage_object(usage)
        if incomplete:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            response["completed_at"] = int(time.time())
        return events, response

    def failed(self, code: str, message: str) -> dict[str, Any]:
        """The Response of a run that failed after its stream started."""
        response = self._final("failed", item_status="incomplete")
        response["error"] = {"code": code, "message": message}
        return response

    def _final(self, status: str, item_status: str | None = None) -> dict[str, Any]:
        return {**self.response, "status": status,
                "output": [item.item(item_status or status) for item in self.items]}

    def _add(self, item: _Message | _Call, events: list[Event]) -> None:
        self.items.append(item)
        self._open = item
        events.append({"type": "response.output_item.added", "output_index": item.index,
                       "item": item.item("in_progress")})

    def _close(self, status: str = "completed") -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        done = {"type": "response.output_item.done", "output_index": item.index,
                "item": item.item(status)}
        if isinstance(item, _Call):
            return [{"type": "response.function_call_arguments.done", "item_id": item.id,
                     "name": item.name, "output_index": item.index,
                     "arguments": item.arguments}, done]
        return [{"type": "response.output_text.done", "item_id": item.id,
                 "output_index": item.index, "content_index": 0, "text": item.text,
                 "logprobs": []},
                {"type": "response.content_part.done", "item_id": item.id,
                 "output_index": item.index, "content_index": 0, "part": item.part()},
                done]


class EventFrames:
    """SSE frames (``event: <type>``, ``data: <json>``) numbered from 0."""

    __slots__ = ("_seq",)

    def __init__(self) -> None:
        self._seq = 0

    def __call__(self, events: list[Event]) -> bytes:
        frames: list[bytes] = []
        for event in events:
            event["sequence_number"] = self._seq
            self._seq += 1
            frames.append(b"event: " + event["type"].encode() + b"\ndata: "
                          + orjson.dumps(event) + b"\n\n")
        return b"".join(frames)

    def state(self, kind: str, response: dict[str, Any]) -> bytes:
        """``response.created``, ``.in_progress``, ``.completed``, ``.incomplete``,
        ``.failed``: the whole Response at that point."""
        return self([{"type": f"response.{kind}", "response": response}])
