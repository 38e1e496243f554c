"""The agent's own tool loop (SPEC §9): model → agent tool calls → results → model …

A run whose agent has MCP tools calls the model with the client's tools plus the
agent's; while the model asks for agent tools, the worker runs them (in
parallel, each under its own timeout inside the toolbox), feeds the results back
and calls the model again, at most ``max_rounds`` tool rounds. Text streams to
the client in every round (rounds separated by a blank line); the agent's calls
are never shown as ``tool_calls`` — they travel as tool events
(:class:`~bus.messages.ToolEvent`) instead. When the model also calls client
tools, the agent's calls of that turn run first and the run ends with only the
client's calls.

A tool's failure or timeout is a result the model sees, not a run failure.
Cancellation (client gone, ``chat.abort``) cancels the model call or the tool
calls in flight: the loop runs inside the run's generate task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Protocol

from bus.messages import ChatItem, ToolCall, ToolChoice, Usage

from .events import Emitter
from .providers.base import ChatMessage, Provider, ProviderRequest
from .run import Reply, generate

ROUND_SEPARATOR = "\n\n"
EVENT_RESULT_CHARS = 4096


class Outcome(Protocol):
    @property
    def text(self) -> str: ...

    @property
    def is_error(self) -> bool: ...


class Toolbox(Protocol):
    """What the loop needs of the worker's MCP tools (workers.mcp.AgentTools)."""

    def owns(self, agent_id: str, name: str) -> bool: ...

    async def call(self, agent_id: str, name: str, arguments: str, *, run_id: str,
                   call_id: str) -> Outcome: ...


class LoopExceededError(Exception):
    """The model still asked for agent tools after ``max_rounds`` rounds."""


async def run_agent(provider: Provider, request: ProviderRequest, emitter: Emitter, *,
                    toolbox: Toolbox, agent_id: str, run_id: str, max_rounds: int) -> Reply:
    """The whole loop; the reply's ``text`` is all the text the client saw,
    ``tool_calls`` the client's calls, ``steps`` the loop's messages for the
    transcript, ``final_text`` the last model message's text."""
    started = time.monotonic()
    messages = list(request.messages)
    steps: list[ChatItem] = []
    texts: list[str] = []
    usage = Usage()
    first: float | None = None
    client_calls_shown = 0

    def agent_tool(name: str) -> bool:
        return toolbox.owns(agent_id, name)

    for round_number in range(max_rounds + 1):
        this = request if round_number == 0 else dataclasses.replace(
            request, messages=tuple(messages), tool_choice=_later_choice(request.tool_choice))
        reply = await generate(provider, this, emitter, hidden=agent_tool,
                               prefix=ROUND_SEPARATOR if texts else "",
                               first_index=client_calls_shown)
        usage = Usage(prompt_tokens=usage.prompt_tokens + reply.usage.prompt_tokens,
                      completion_tokens=usage.completion_tokens + reply.usage.completion_tokens)
        if first is None and reply.first_token_seconds is not None:
            first = (time.monotonic() - started) - reply.seconds + reply.first_token_seconds
        if reply.text:
            texts.append(reply.text)
        agent_calls = tuple(c for c in reply.tool_calls if agent_tool(c.name))
        client_calls = tuple(c for c in reply.tool_calls if not agent_tool(c.name))
        client_calls_shown += len(client_calls)
        if not agent_calls:
            return _finished(reply, texts, usage, steps, client_calls=client_calls,
                             first=first, started=started, final_text=reply.text)
        if round_number == max_rounds:
            raise LoopExceededError("agent tool loop exceeded maxRounds")
        results = await _run_calls(toolbox, emitter, agent_id, run_id, agent_calls)
        assistant = ChatItem(role="assistant", text=reply.text, tool_calls=agent_calls)
        steps.append(assistant)
        steps.extend(results)
        if client_calls:  # the client's calls end the run, after the agent's ran
            return _finished(reply, texts, usage, steps, client_calls=client_calls,
                             first=first, started=started, final_text="")
        messages.append(ChatMessage("assistant", reply.text, tool_calls=agent_calls))
        messages.extend(ChatMessage("tool", r.text, tool_call_id=r.tool_call_id, name=r.name)
                        for r in results)
    raise AssertionError("unreachable")  # the loop returns or raises in its last round


def _later_choice(choice: ToolChoice | None) -> ToolChoice | None:
    """A forced tool choice applies to the first model call only (else the model
    could never stop calling tools)."""
    if choice is None or choice.mode in ("auto", "none"):
        return choice
    return ToolChoice(mode="auto", parallel=choice.parallel)


def _finished(reply: Reply, texts: list[str], usage: Usage, steps: list[ChatItem], *,
              client_calls: tuple[ToolCall, ...], first: float | None, started: float,
              final_text: str) -> Reply:
    reason = reply.finish_reason
    if client_calls:
        reason = "length" if reason == "length" else "tool_calls"
    elif reason == "tool_calls":
        reason = "stop"
    return Reply(text=ROUND_SEPARATOR.join(texts), usage=usage, finish_reason=reason,
                 first_token_seconds=first, seconds=time.monotonic() - started,
                 tool_calls=client_calls, steps=tuple(steps),
                 final_text=final_text if steps else None)


async def _run_calls(toolbox: Toolbox, emitter: Emitter, agent_id: str, run_id: str,
                     calls: tuple[ToolCall, ...]) -> list[ChatItem]:
    """Run the calls in parallel; their results, in call order. Each start and
    result is a tool event (results as they complete)."""
    for call in calls:
        await emitter.tool_event("start", call.name, call.id, args=call.arguments)

    async def one(call: ToolCall) -> ChatItem:
        outcome = await toolbox.call(agent_id, call.name, call.arguments, run_id=run_id,
                                     call_id=call.id)
        await emitter.tool_event("result", call.name, call.id,
                                 result=outcome.text[:EVENT_RESULT_CHARS],
                                 is_error=outcome.is_error)
        text = f"Error: {outcome.text}" if outcome.is_error else outcome.text
        return ChatItem(role="tool", text=text, tool_call_id=call.id, name=call.name)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(call), name="agent-tool-call") for call in calls]
    return [task.result() for task in tasks]
