"""One agent run attempt on a worker: prompt assembly, the provider call, the turn.

:func:`generate` streams the provider's reply (text and tool-call pieces)
through an :class:`Emitter` and returns the finished reply; the caller
(``workers/worker.py``) owns the lease, the ack and cancellation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

from bus.messages import ChatItem, RunRequest, ToolCall, ToolCallChunk, Turn, Usage

from .events import Emitter
from .memo import IdentityMemo
from .providers.base import ChatMessage, Finish, Provider, ProviderRequest, TextDelta
from .window_memo import WindowMemo


@dataclass(slots=True)
class Reply:
    text: str
    usage: Usage
    finish_reason: str
    first_token_seconds: float | None = None
    seconds: float = 0.0
    tool_calls: tuple[ToolCall, ...] = field(default=())
    # The agent's own tool loop, when it ran (see workers/agent_loop.py).
    steps: tuple[ChatItem, ...] = field(default=())
    final_text: str | None = None


def build_request(model: str, system_prompt: str, run: RunRequest,
                  history: list[Turn]) -> ProviderRequest:
    """What the agent sees: its system prompt + the extra system prompt, the
    session's earlier turns (already cut to the budget), then the current input.
    Tool traffic stays structured (SPEC §7)."""
    system = "\n\n".join(p for p in (system_prompt.strip(), run.extra_system_prompt.strip()) if p)
    # A plain history's messages, extended from the previous run's
    # (workers/window_memo.py); else its turns looked up in C (workers/memo.py).
    plain = _plain_history(history) if history and not run.input else None
    if plain is not None:
        structured = False
        messages: list[ChatMessage] = list(plain)
    else:
        known = _turn_messages.many(history)
        structured = bool(run.input) or any(map(_STRUCTURED, known))
        messages = list(chain.from_iterable(map(_MESSAGES, known)))
    if run.input:
        messages.extend(_message(item) for item in run.input)
    else:
        messages.append(ChatMessage("user", run.message))
    if structured:
        messages = paired(messages)  # (new objects where it changes one: no prefix kept)
    return ProviderRequest(model=model, system=system, messages=tuple(messages),
                           params=run.params, tools=run.tools, tool_choice=run.tool_choice,
                           history=-1 if structured else len(messages) - 1)


def _as_messages(turn: Turn) -> tuple[bool, tuple[ChatMessage, ...]]:
    """A stored turn as chat messages; whether it holds tool traffic."""
    if not turn.structured():  # the common case, without building items
        return False, (ChatMessage("user", turn.user), ChatMessage("assistant", turn.assistant))
    return True, (*(_message(item) for item in turn.input_items()),
                  *(_message(item) for item in turn.steps), _message(turn.reply_item()))


_turn_messages = IdentityMemo(_as_messages)
_STRUCTURED, _MESSAGES = itemgetter(0), itemgetter(1)


def _plain_pieces(turns: Sequence[Turn]) -> list[tuple[ChatMessage, ...]] | None:
    """Each turn's messages, if no turn holds tool traffic (None: one does, and
    the history is paired as a whole: nothing is kept)."""
    known = _turn_messages.many(turns)
    if any(map(_STRUCTURED, known)):
        return None
    return list(map(_MESSAGES, known))


def _joined(pieces: list[tuple[ChatMessage, ...]]) -> tuple[ChatMessage, ...]:
    return tuple(chain.from_iterable(pieces))


_plain_history: WindowMemo[Turn, tuple[ChatMessage, ...], tuple[ChatMessage, ...]] = \
    WindowMemo(_plain_pieces, len, _joined, operator.add)


def _message(item: ChatItem) -> ChatMessage:
    return ChatMessage(item.role, item.text, item.images, item.tool_calls, item.tool_call_id,
                       item.name)


def paired(messages: list[ChatMessage]) -> list[ChatMessage]:
    """The conversation as providers accept it: every tool call answered by a tool
    result right after its assistant message, and every result answering such a
    call. Unanswered calls (a client that sent text instead of results, a history
    budget that cut a turn in two) are dropped from their message; orphaned
    results are dropped; an assistant message left empty goes too."""
    out: list[ChatMessage] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        i += 1
        if message.role == "tool":
            continue  # not right after a call of the assistant message before it
        if message.role != "assistant" or not message.tool_calls:
            out.append(message)
            continue
        results: list[ChatMessage] = []
        while i < len(messages) and messages[i].role == "tool":
            results.append(messages[i])
            i += 1
        calls = {c.id for c in message.tool_calls}
        answered = {r.tool_call_id for r in results if r.tool_call_id in calls}
        kept = tuple(c for c in message.tool_calls if c.id in answered)
        if kept != message.tool_calls:
            message = dataclasses.replace(message, tool_calls=kept)
        if message.content or message.tool_calls:
            out.append(message)
        seen: set[str] = set()
        for result in results:
            if result.tool_call_id in answered and result.tool_call_id not in seen:
                seen.add(result.tool_call_id)
                out.append(result)
    return out


async def generate(provider: Provider, request: ProviderRequest, emitter: Emitter, *,
                   hidden: Callable[[str], bool] | None = None, prefix: str = "",
                   first_index: int = 0) -> Reply:
    """One model call, streamed through ``emitter``. Tool calls whose name
    ``hidden`` accepts (the agent's own tools) are not shown to the client; the
    shown ones are numbered from ``first_index``. ``prefix`` goes out before the
    reply's first text (a separator after an earlier round's text)."""
    parts: list[str] = []
    calls: dict[int, tuple[str, str, list[str]]] = {}  # index → (id, name, fragments)
    shown: dict[int, int | None] = {}  # upstream index → client index (None: hidden)
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
                if prefix and not parts:
                    await emitter.delta(prefix)
                parts.append(item.text)
                await emitter.delta(item.text)
            elif isinstance(item, ToolCallChunk):
                if first is None:
                    first = time.monotonic() - started
                call = calls.get(item.index)
                if call is None:
                    call = calls[item.index] = (item.id or "", item.name or "", [])
                    shown[item.index] = None if hidden is not None and hidden(call[1]) else \
                        first_index + sum(1 for v in shown.values() if v is not None)
                call[2].append(item.arguments)
                index = shown[item.index]
                if index is not None:
                    await emitter.tool_delta(
                        item if index == item.index else item.model_copy(update={"index": index}))
            else:
                finish = item
    tool_calls = tuple(ToolCall(id=call_id, name=name, arguments="".join(fragments))
                       for _, (call_id, name, fragments) in sorted(calls.items()))
    reason = "tool_calls" if tool_calls and finish.reason == "stop" else finish.reason
    return Reply(text="".join(parts), usage=finish.usage, finish_reason=reason,
                 first_token_seconds=first, seconds=time.monotonic() - started,
                 tool_calls=tool_calls)


def missed_tool_choice(run: RunRequest, reply: Reply) -> bool:
    """With ``tool_choice`` required or pinned, the reply made no matching call."""
    choice = run.tool_choice
    if choice is None or choice.mode in ("auto", "none"):
        return False
    if choice.mode == "required":
        return not reply.tool_calls
    return all(call.name != choice.name for call in reply.tool_calls)


def unmatched_tool_result(run: RunRequest, last: Turn | None) -> str | None:
    """The id of a tool result in a session run's input that answers no pending
    call of the session (its last turn's calls) nor a call earlier in the input
    (a whole conversation opening a session, as ``/v1/responses`` sends it), or None."""
    pending = {call.id for call in last.tool_calls} if last is not None else set()
    for item in run.input:
        pending.update(call.id for call in item.tool_calls)
        if item.role == "tool" and item.tool_call_id not in pending:
            return item.tool_call_id
    return None


def with_tool_names(run: RunRequest, last: Turn | None) -> RunRequest:
    """A session run whose tool results lack their function's name (a client that
    sent only the results) gets them from the session's pending calls."""
    if last is None or not last.tool_calls or all(
            item.role != "tool" or item.name for item in run.input):
        return run
    names = {call.id: call.name for call in last.tool_calls}
    items = tuple(item.model_copy(update={"name": names.get(item.tool_call_id, "")})
                  if item.role == "tool" and not item.name else item for item in run.input)
    return run.model_copy(update={"input": items})
