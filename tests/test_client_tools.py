"""Client tools (SPEC §7) end to end: real clients, unchanged, against a running stack
(two gateways, two workers, a fake OpenAI upstream that asks for tool calls and
answers from their results).

- the official ``openai`` SDK: a tool call non-streamed and streamed (the SDK's
  ``chat.completions.stream`` helper assembling it), then the follow-up with the
  result, stateless and in a session continued through the other gateway;
- the OpenAI Agents SDK with its chat-completions model class;
- LangChain's ``ChatOpenAI(...).bind_tools`` in a tool loop;
- the raw SSE framing of ``delta.tool_calls`` and every chunk against the schema;
- ``tool_choice`` enforcement and the unmatched-result 400s.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any, cast

import agents
import httpx
import openai
import orjson
import pytest

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.http_upstream import FakeReply, text_of
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, Stack, base_config
from tests.schemas import validate

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def agent_reply(body: dict[str, Any]) -> str | FakeReply:
    """A model that calls ``get_weather`` when asked about the weather (two calls
    for "weather in A and B"), and answers from tool results when given them."""
    messages = body.get("messages") or []
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, text_of(message.get("content")))
    if results:
        return "Result: " + "; ".join(results)
    text = text_of(messages[-1].get("content")) if messages else ""
    tools = {t["function"]["name"] for t in body.get("tools") or []}
    if "weather in" in text and "get_weather" in tools:
        cities = text.split("weather in", 1)[1].strip(" ?").split(" and ")
        return FakeReply("Let me check.", [("get_weather", json.dumps({"city": c}))
                                           for c in cities])
    return "plain: " + text


@pytest.fixture(scope="module")
def tool_upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=agent_reply) as up:
        yield up


@pytest.fixture(scope="module")
def tstack(tool_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack.start(tmp_path_factory.mktemp("tools"), tool_upstream, base_config(tool_upstream),
                     gateways=2, workers=2)
    try:
        yield st
    finally:
        st.stop()


_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def sdk(url: str) -> Any:
    """An SDK client, closed after the test (typed loosely: the tests send
    hand-written message dicts)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30)
    _clients.append(client)
    return client


def tag() -> str:
    return uuid.uuid4().hex[:10]


def upstream_bodies(up: FakeOpenAI, text: str) -> list[dict[str, Any]]:
    return [r.body for r in up.requests
            if isinstance(r.body, dict) and text in orjson.dumps(r.body).decode()]


def tool_result(call: Any, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.id, "content": content}


def assistant_echo(message: Any) -> Any:
    """The assistant message as a client sends it back (the SDK object, dumped)."""
    return message.model_dump(exclude_none=True)


# ----------------------------------------------------------------------- openai SDK


def test_sdk_tool_call_then_result_stateless(tstack: Stack) -> None:
    t = tag()
    client = sdk(tstack.url)
    question = {"role": "user", "content": f"[{t}] weather in Paris"}
    first = client.chat.completions.create(model="openclaw", messages=[question],
                                           tools=[WEATHER_TOOL])
    validate("chat_completion", first.model_dump(mode="json", exclude_unset=True))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    second = client.chat.completions.create(
        model="openclaw", tools=[WEATHER_TOOL],
        messages=[question, assistant_echo(choice.message),
                  tool_result(call, "sunny, 24 C")])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "Result: sunny, 24 C"
    assert second.choices[0].message.tool_calls is None
    # The model got real tool traffic, not a flattened text.
    *_, body = upstream_bodies(tstack.upstream, t)
    roles = [m["role"] for m in body["messages"]]
    assert roles[-3:] == ["user", "assistant", "tool"]
    assistant, tool = body["messages"][-2:]
    assert assistant["tool_calls"][0]["id"] == call.id
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    assert tool == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}
    assert body["tools"][0]["function"]["name"] == "get_weather"


def test_sdk_stream_helper_assembles_the_call(tstack: Stack) -> None:
    t = tag()
    client = sdk(tstack.url)
    tstack.upstream.token_delay = 0.005
    with client.chat.completions.stream(
            model="openclaw", tools=[WEATHER_TOOL],
            messages=[{"role": "user", "content": f"[{t}] weather in Oslo and Rome"}]) as stream:
        for event in stream:
            if event.type == "chunk":
                validate("chat_completion_chunk",
                         event.chunk.model_dump(mode="json", exclude_unset=True))
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Oslo"},
                                                                {"city": "Rome"}]
    assert len({c.id for c in calls}) == 2


def test_sdk_session_tool_loop_across_gateways(tstack: Stack) -> None:
    t = tag()
    one, two = sdk(tstack.gateways[0].url), sdk(tstack.gateways[1].url)
    question = {"role": "user", "content": f"[{t}] weather in Lima"}
    first = one.chat.completions.create(model="openclaw", user=f"u-{t}", messages=[question],
                                        tools=[WEATHER_TOOL])
    (call,) = first.choices[0].message.tool_calls or []
    # The follow-up goes to the other gateway; the session's transcript holds the
    # pending call, so only what follows the assistant message is new input.
    second = two.chat.completions.create(
        model="openclaw", user=f"u-{t}", tools=[WEATHER_TOOL],
        messages=[question, assistant_echo(first.choices[0].message),
                  tool_result(call, "fog")])
    assert second.choices[0].message.content == "Result: fog"
    third = one.chat.completions.create(
        model="openclaw", user=f"u-{t}",
        messages=[{"role": "user", "content": f"[{t}] thanks"}])
    assert third.choices[0].message.content == f"plain: [{t}] thanks"
    *_, body = upstream_bodies(tstack.upstream, f"[{t}] thanks")
    history = [(m["role"], m.get("tool_calls", [{}])[0].get("id") if m.get("tool_calls")
                else m.get("tool_call_id") or text_of(m.get("content")))
               for m in body["messages"] if m["role"] != "system"]
    assert history == [("user", f"[{t}] weather in Lima"), ("assistant", call.id),
                       ("tool", call.id), ("assistant", "Result: fog"),
                       ("user", f"[{t}] thanks")]


def test_session_result_for_no_pending_call_is_400(tstack: Stack) -> None:
    t = tag()
    client = sdk(tstack.url)
    client.chat.completions.create(model="openclaw", user=f"u-{t}",
                                   messages=[{"role": "user", "content": f"[{t}] hello"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="openclaw", user=f"u-{t}",
            messages=[{"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_nope", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_nope", "content": "x"}])
    assert info.value.message.endswith(
        "`tool_call_id` 'call_nope' does not match a pending tool call.")
    validate("error_response", info.value.body and {"error": info.value.body})


def test_stateless_result_without_its_call_is_400(tstack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(tstack.url).chat.completions.create(
            model="openclaw",
            messages=[{"role": "user", "content": "hi"},
                      {"role": "tool", "tool_call_id": "call_zz", "content": "x"}])
    assert "`tool_call_id` 'call_zz' does not match a pending tool call." in info.value.message


# ------------------------------------------------------------------------ raw framing


def sse_chunks(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("stream_delay", [0.0, 0.01])
def test_delta_tool_calls_framing(tstack: Stack, stream_delay: float) -> None:
    tstack.upstream.token_delay = stream_delay
    chunks = sse_chunks(tstack.url, {
        "model": "openclaw", "stream": True, "stream_options": {"include_usage": True},
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": f"[{tag()}] weather in Ulm and Bonn"}]})
    for chunk in chunks:
        if "error" in chunk:
            pytest.fail(f"error frame: {chunk}")
        validate("chat_completion_chunk", chunk)
    pieces = [tc for c in chunks for choice in c["choices"]
              for tc in choice["delta"].get("tool_calls", [])]
    firsts: dict[int, dict[str, Any]] = {}
    arguments: dict[int, str] = {}
    for piece in pieces:
        index = piece["index"]
        assert isinstance(piece["function"]["arguments"], str)
        if index not in firsts:
            assert piece["id"] and piece["type"] == "function" and piece["function"]["name"]
            firsts[index] = piece
            arguments[index] = ""
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {
                "arguments"}
        arguments[index] += piece["function"]["arguments"]
    assert sorted(firsts) == [0, 1]
    assert [json.loads(arguments[i]) for i in (0, 1)] == [{"city": "Ulm"}, {"city": "Bonn"}]
    # Indices appear in call order; commentary comes before the calls.
    order = [p["index"] for p in pieces]
    assert order == sorted(order)
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"]
                if ch["finish_reason"]]
    assert finishes == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] >= 0
    content = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert content == "Let me check."


# --------------------------------------------------------------------- tool_choice


def test_required_tool_choice_not_met_is_502(tstack: Stack) -> None:
    client = sdk(tstack.url)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="openclaw", tools=[WEATHER_TOOL], tool_choice="required",
            messages=[{"role": "user", "content": "just chat"}])
    assert info.value.status_code == 502
    assert info.value.message.endswith("Agent did not call the required tool.")
    chunks = sse_chunks(tstack.url, {
        "model": "openclaw", "stream": True, "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [{"role": "user", "content": "just chat"}]})
    assert chunks[-1]["error"]["message"] == "Agent did not call the required tool."
    assert chunks[-1]["error"]["type"] == "api_error"


def test_tool_choice_forwarded(tstack: Stack) -> None:
    t = tag()
    sdk(tstack.url).chat.completions.create(
        model="openclaw", tools=[WEATHER_TOOL], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": f"[{t}] weather in Graz"}])
    (body,) = upstream_bodies(tstack.upstream, t)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["tools"] == [WEATHER_TOOL]


# ------------------------------------------------------------------ agent frameworks


def test_openai_agents_sdk_runs_a_function_tool(tstack: Stack) -> None:
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"rainy in {city}"

    t = tag()

    async def main() -> Any:
        client = openai.AsyncOpenAI(base_url=f"{tstack.url}/v1", api_key=TOKEN, max_retries=0)
        model = agents.OpenAIChatCompletionsModel(model="openclaw", openai_client=client)
        agent = agents.Agent(name="weather", instructions="Use the tool.", model=model,
                             tools=[get_weather])
        try:
            return await agents.Runner.run(agent, f"[{t}] weather in Kyiv",
                                           run_config=agents.RunConfig(tracing_disabled=True))
        finally:
            await client.close()

    result = asyncio.run(main())
    assert seen == ["Kyiv"]
    assert result.final_output == "Result: rainy in Kyiv"


def test_langchain_bind_tools_loop(tstack: Stack) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"hail in {city}"

    llm = ChatOpenAI(model="openclaw", base_url=f"{tstack.url}/v1",
                     api_key=TOKEN,
                     max_retries=0).bind_tools([get_weather])
    history: list[Any] = [HumanMessage(f"[{tag()}] weather in Bern")]
    for _ in range(3):
        reply = llm.invoke(history)
        history.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            history.append(ToolMessage(get_weather.invoke(call["args"]),
                                       tool_call_id=call["id"]))
    assert history[-1].content == "Result: hail in Bern"
    assert [type(m).__name__ for m in history] == [
        "HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]


def test_upstream_requests_carry_no_flattened_tool_text(tstack: Stack) -> None:
    """No request the fake received holds the §2 context-block text for tool turns."""
    bad = [r for r in tstack.upstream.requests if isinstance(r.body, dict)
           and "Tool:" in orjson.dumps(r.body).decode() and r.body.get("tools")]
    assert bad == [], [r.body for r in bad[:1]]


# ------------------------------------------------------------------------- Anthropic


def anthropic_reply(body: dict[str, Any]) -> str | FakeReply:
    """agent_reply, reading Anthropic's message shapes (tool_result blocks)."""
    content = body["messages"][-1]["content"]
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
    results = [text_of(b.get("content")) for b in blocks if b.get("type") == "tool_result"]
    if results:
        return "Result: " + "; ".join(results)
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    if "weather in" in text and any(t["name"] == "get_weather" for t in body.get("tools") or []):
        city = text.split("weather in", 1)[1].strip(" ?")
        return FakeReply("Let me check.", [("get_weather", json.dumps({"city": city}))])
    return "plain: " + text


@pytest.fixture(scope="module")
def astack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with FakeAnthropic(reply=anthropic_reply) as up:
        config = base_config(None)
        config["models"]["providers"]["claude"] = {"api": "anthropic-messages",
                                                   "baseUrl": up.base_url, "apiKey": "sk-a"}
        config["agents"]["defaults"]["model"] = "claude/claude-test"
        st = Stack.start(tmp_path_factory.mktemp("anthropic"), cast(FakeOpenAI, up), config,
                         gateways=2, workers=2)
        try:
            yield st
        finally:
            st.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_round_trip_in_a_session(astack: Stack, stream: bool) -> None:
    t = tag()
    one, two = sdk(astack.gateways[0].url), sdk(astack.gateways[1].url)
    question = {"role": "user", "content": f"[{t}] weather in Riga"}
    if stream:
        with one.chat.completions.stream(model="openclaw", user=f"a-{t}", messages=[question],
                                         tools=[WEATHER_TOOL]) as events:
            first = events.get_final_completion()
    else:
        first = one.chat.completions.create(model="openclaw", user=f"a-{t}",
                                            messages=[question], tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Riga"}
    second = two.chat.completions.create(
        model="openclaw", user=f"a-{t}", tools=[WEATHER_TOOL],
        messages=[question, assistant_echo(choice.message), tool_result(call, "snow")])
    assert second.choices[0].message.content == "Result: snow"
    # Upstream, the follow-up was Anthropic's shape: tool_use then tool_result.
    *_, body = upstream_bodies(astack.upstream, f"[{t}]")
    assert body["tools"][0]["name"] == "get_weather" and "input_schema" in body["tools"][0]
    use = [b for b in body["messages"][-2]["content"] if b["type"] == "tool_use"]
    assert use == [{"type": "tool_use", "id": call.id, "name": "get_weather",
                    "input": {"city": "Riga"}}]
    (result,) = body["messages"][-1]["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call.id
