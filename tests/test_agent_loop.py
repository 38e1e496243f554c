"""workers.agent_loop with a scripted model and a toolbox in memory (the emitter
publishes on a real nats-server): rounds, parallel calls, tool events, results
and errors back to the model, client calls ending the run, maxRounds,
cancellation of the calls in flight, and the forced tool choice applying to the
first call only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from bus.messages import ToolCallChunk, ToolChoice, ToolSpec, Usage
from tests.test_emitter import emitter_and_events
from workers.agent_loop import LoopExceededError, run_agent
from workers.providers.base import ChatMessage, Finish, ProviderRequest, StreamItem, TextDelta

Round = Sequence[StreamItem]


@dataclass
class ScriptedModel:
    """Answers each call with the next scripted round; records the requests."""

    rounds: list[Round]
    requests: list[ProviderRequest] = field(default_factory=list)

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        self.requests.append(request)
        for item in self.rounds[len(self.requests) - 1]:
            yield item

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class Outcome:
    text: str
    is_error: bool = False


@dataclass
class Toolbox:
    delay: float = 0.0
    calls: list[tuple[str, str, str, str]] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0
    cancelled: int = 0
    both_running: asyncio.Event = field(default_factory=asyncio.Event)

    def owns(self, agent_id: str, name: str) -> bool:
        return name.startswith("srv__")

    async def call(self, agent_id: str, name: str, arguments: str, *, run_id: str,
                   call_id: str) -> Outcome:
        self.calls.append((name, arguments, run_id, call_id))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        if self.running >= 2:
            self.both_running.set()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if name == "srv__fail":
            return Outcome("it broke", is_error=True)
        return Outcome(f"{name}:{arguments}")


def call(index: int, call_id: str, name: str, arguments: str) -> list[StreamItem]:
    """A call in two pieces, as providers normalize them."""
    half = len(arguments) // 2
    return [ToolCallChunk(index=index, id=call_id, name=name, arguments=arguments[:half]),
            ToolCallChunk(index=index, arguments=arguments[half:])]


def usage(n: int) -> Finish:
    return Finish(reason="stop", usage=Usage(prompt_tokens=n, completion_tokens=1))


REQUEST = ProviderRequest(model="m", system="", messages=(ChatMessage("user", "go"),),
                          tools=(ToolSpec(name="client_fn"),))


async def drain(sub: Subscription) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        try:
            msg = await sub.next_msg(timeout=0.3)
        except TimeoutError:
            return events
        events.append(orjson.loads(msg.data))


async def run(nc: Client, model: ScriptedModel, toolbox: Toolbox, *, rounds: int = 4,
              request: ProviderRequest = REQUEST) -> tuple[Any, list[dict[str, Any]]]:
    emitter, sub = await emitter_and_events(nc, coalesce=0.0)
    reply = await run_agent(model, request, emitter, toolbox=toolbox, agent_id="main",
                            run_id="run-1", max_rounds=rounds)
    await emitter.drain()
    return reply, await drain(sub)


async def test_two_rounds_with_a_parallel_pair(nc: Client) -> None:
    model = ScriptedModel([
        [TextDelta("Looking."), *call(0, "a", "srv__add", '{"a":1,"b":2}'),
         *call(1, "b", "srv__mul", '{"a":3}'), usage(10)],
        [*call(0, "c", "srv__add", '{"a":3,"b":3}'), usage(20)],
        [TextDelta("It is 6."), usage(30)],
    ])
    toolbox = Toolbox(delay=0.05)
    reply, events = await run(nc, model, toolbox)
    assert reply.text == "Looking.\n\nIt is 6."
    assert reply.final_text == "It is 6." and reply.tool_calls == ()
    assert reply.finish_reason == "stop"
    assert reply.usage == Usage(prompt_tokens=60, completion_tokens=3)
    assert toolbox.most_at_once == 2  # the pair ran in parallel
    assert [(c[0], c[2], c[3]) for c in toolbox.calls] == [
        ("srv__add", "run-1", "a"), ("srv__mul", "run-1", "b"), ("srv__add", "run-1", "c")]
    # The steps: each round's assistant message and its results, in call order.
    assert [(s.role, s.tool_call_id or [c.id for c in s.tool_calls]) for s in reply.steps] == [
        ("assistant", ["a", "b"]), ("tool", "a"), ("tool", "b"),
        ("assistant", ["c"]), ("tool", "c")]
    # The model's second call saw the first round's calls and results.
    second = model.requests[1].messages
    assert [m.role for m in second] == ["user", "assistant", "tool", "tool"]
    assert second[2].content == 'srv__add:{"a":1,"b":2}'
    # Events: text, tool starts and results; no tool_delta for agent calls.
    kinds = [(e["type"], e.get("phase")) for e in events]
    assert ("tool_delta", None) not in kinds
    assert kinds.count(("tool", "start")) == 3 and kinds.count(("tool", "result")) == 3
    assert kinds.index(("tool", "start")) > kinds.index(("delta", None))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_tool_errors_go_back_to_the_model(nc: Client) -> None:
    model = ScriptedModel([[*call(0, "x", "srv__fail", "{}"), usage(1)],
                           [TextDelta("Sorry."), usage(1)]])
    reply, events = await run(nc, model, Toolbox())
    assert reply.text == "Sorry."
    assert model.requests[1].messages[-1].content == "Error: it broke"
    (result,) = [e for e in events if e.get("phase") == "result"]
    assert result["is_error"] is True and result["result"] == "it broke"


async def test_client_calls_end_the_run_after_the_agent_calls(nc: Client) -> None:
    model = ScriptedModel([[*call(0, "k", "client_fn", '{"q":1}'),
                            *call(1, "s", "srv__add", "{}"), usage(1)]])
    toolbox = Toolbox()
    reply, events = await run(nc, model, toolbox)
    assert [c.id for c in reply.tool_calls] == ["k"]
    assert reply.finish_reason == "tool_calls"
    assert [c[3] for c in toolbox.calls] == ["s"]  # the agent's call ran first
    shown = [c for e in events if e["type"] == "tool_delta" for c in e["calls"]]
    assert {c["index"] for c in shown} == {0}  # only the client's call, numbered from 0
    assert "".join(c["arguments"] for c in shown) == '{"q":1}'
    assert len(model.requests) == 1


async def test_max_rounds_exceeded(nc: Client) -> None:
    model = ScriptedModel([[*call(0, f"c{i}", "srv__add", "{}"), usage(1)] for i in range(3)])
    with pytest.raises(LoopExceededError, match="exceeded maxRounds"):
        await run(nc, model, Toolbox(), rounds=2)
    assert len(model.requests) == 3  # the first call, then one per round


async def test_forced_choice_only_on_the_first_call(nc: Client) -> None:
    model = ScriptedModel([[*call(0, "a", "srv__add", "{}"), usage(1)],
                           [TextDelta("done"), usage(1)]])
    request = ProviderRequest(model="m", system="", messages=REQUEST.messages,
                              tool_choice=ToolChoice(mode="required", parallel=False))
    await run(nc, model, Toolbox(), request=request)
    assert model.requests[0].tool_choice == ToolChoice(mode="required", parallel=False)
    assert model.requests[1].tool_choice == ToolChoice(mode="auto", parallel=False)


async def test_cancelling_the_run_cancels_the_calls_in_flight(nc: Client) -> None:
    model = ScriptedModel([[*call(0, "a", "srv__add", "{}"), *call(1, "b", "srv__mul", "{}"),
                            usage(1)]])
    toolbox = Toolbox(delay=30)
    emitter, _ = await emitter_and_events(nc, coalesce=0.0)
    task = asyncio.create_task(run_agent(model, REQUEST, emitter, toolbox=toolbox,
                                         agent_id="main", run_id="r", max_rounds=3))
    await asyncio.wait_for(toolbox.both_running.wait(), 10)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    assert toolbox.cancelled == 2 and toolbox.running == 0
