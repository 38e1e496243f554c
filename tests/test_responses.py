"""``POST /v1/responses`` (SPEC §10) end to end: real clients, unchanged, against a
running stack (two gateways, two workers, a fake OpenAI upstream that asks for
tool calls and answers from their results), and every error row in-process.

- the official ``openai`` SDK: ``responses.create`` plain and streamed,
  ``responses.stream`` collecting the final response, a function-tool round
  trip (stateless, and through ``previous_response_id`` on the other gateway),
  ``instructions``, ``max_output_tokens`` → incomplete, ``x-openclaw-model``;
- every Response object against ``response.strict.json`` and every stream event
  against ``response_stream_event.strict.json``;
- ``response.failed`` when the upstream breaks mid-stream, a client disconnect
  cancelling the run;
- the OpenAI Agents SDK with its default (Responses) model and a function tool.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import agents
import httpx
import openai
import orjson
import pytest

from bus.messages import ToolCall, ToolCallChunk, Usage
from clawbus.config import parse_settings
from clawbus.natsserver import NatsServer
from gateway.responses_format import EventFrames, ResponseOutput, skeleton
from gateway.responses_request import parse_responses_request
from tests.fakes.http_upstream import text_of
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, Stack, base_config
from tests.schemas import validate, validate_strict
from tests.test_chat_errors import assert_error, in_process
from tests.test_client_tools import agent_reply, tag, upstream_bodies

AUTH = {"Authorization": f"Bearer {TOKEN}"}
URL = "/v1/responses"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function", "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}


def responses_config(upstream: FakeOpenAI | None, **bus: Any) -> dict[str, Any]:
    config = base_config(upstream, **bus)
    config["gateway"]["http"]["endpoints"]["responses"] = {"enabled": True}
    return config


@pytest.fixture(scope="module")
def rupstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=agent_reply) as up:
        yield up


@pytest.fixture(scope="module")
def rstack(rupstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack.start(tmp_path_factory.mktemp("responses"), rupstream,
                     responses_config(rupstream), gateways=2, workers=2)
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    """A well-behaved upstream for every test; SDK clients closed after it."""
    if "rstack" in request.fixturenames:
        up: FakeOpenAI = request.getfixturevalue("rupstream")
        up.token_delay = 0.0
        up.fail_status = None
        up.garbage_after = None
    yield
    while _clients:
        _clients.pop().close()


_clients: list[openai.OpenAI] = []


def sdk(url: str, **headers: str) -> Any:
    """An SDK client, closed after the test (typed loosely: the tests send
    hand-written item dicts)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30,
                           default_headers=headers or None)
    _clients.append(client)
    return client


def checked(response: Any) -> Any:
    """``response`` (an SDK Response), validated against the official schema."""
    validate_strict("response", response.model_dump(mode="json", exclude_unset=True))
    return response


def sse_events(url: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """(the events of a raw streamed response, each checked against the schema and
    its ``event:`` line, the raw body)."""
    with httpx.Client(timeout=30) as http:
        resp = http.post(f"{url}{URL}", json={**body, "stream": True},
                         headers={**AUTH, **(headers or {})})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    events: list[dict[str, Any]] = []
    for frame in resp.text.split("\n\n"):
        lines = [line for line in frame.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        if lines == ["data: [DONE]"]:
            events.append({"type": "[DONE]"})
            continue
        kind, data = lines
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        validate_strict("response_stream_event", event)
        events.append(event)
    assert events[-1] == {"type": "[DONE]"}
    assert [e["sequence_number"] for e in events[:-1]] == list(range(len(events) - 1))
    return events[:-1], resp.text


# --------------------------------------------------------------------- the SDK, text


def test_create(rstack: Stack) -> None:
    t = tag()
    response = checked(sdk(rstack.url).responses.create(model="openclaw", input=f"[{t}] hi"))
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == "openclaw"
    assert response.output_text == f"plain: [{t}] hi"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == "completed"
    assert response.usage is not None
    assert response.usage.total_tokens == response.usage.input_tokens \
        + response.usage.output_tokens > 0
    assert response.tool_choice == "auto" and response.tools == []


def test_create_streamed(rstack: Stack) -> None:
    t = tag()
    rstack.upstream.token_delay = 0.005
    stream = sdk(rstack.url).responses.create(model="openclaw", stream=True,
                                              input=f"[{t}] one two three four")
    events = list(stream)
    for event in events:
        validate_strict("response_stream_event", event.model_dump(mode="json",
                                                                  exclude_unset=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and len(kinds) > 9
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = checked(events[-1].response)
    assert deltas == final.output_text == f"plain: [{t}] one two three four"
    assert final.id == events[0].response.id and final.status == "completed"


def test_stream_helper_final_response(rstack: Stack) -> None:
    t = tag()
    with sdk(rstack.url).responses.stream(model="openclaw", input=f"[{t}] stream") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    checked(final)
    assert final.output_text == "".join(texts) == f"plain: [{t}] stream"


def test_raw_framing_and_keepalives(rstack: Stack) -> None:
    rstack.upstream.token_delay = 0.4  # longer than the stack's 0.3 s keep-alive
    events, raw = sse_events(rstack.url, {"model": "openclaw", "input": f"[{tag()}] a b"})
    assert ": keep-alive\n\n" in raw
    assert events[-1]["type"] == "response.completed"
    assert raw.endswith("data: [DONE]\n\n")


def test_message_items_and_instructions(rstack: Stack) -> None:
    t = tag()
    response = checked(sdk(rstack.url).responses.create(
        model="openclaw", instructions="Answer in French.",
        input=[{"role": "developer", "content": "Be brief."},
               {"role": "user", "content": [{"type": "input_text", "text": f"[{t}] hello"}]}]))
    assert response.instructions == "Answer in French."
    (body,) = upstream_bodies(rstack.upstream, t)
    assert body["messages"][0] == {"role": "system", "content":
                                   "You are main.\n\nAnswer in French.\n\nBe brief."}
    assert body["messages"][-1]["content"] == f"[{t}] hello"


def test_parameters_forwarded_and_echoed(rstack: Stack) -> None:
    t = tag()
    response = checked(sdk(rstack.url).responses.create(
        model="openclaw", input=f"[{t}] hi", temperature=0.5, top_p=0.25,
        metadata={"k": "v"}, store=False, truncation="auto", parallel_tool_calls=False))
    (body,) = upstream_bodies(rstack.upstream, t)
    assert (body["temperature"], body["top_p"]) == (0.5, 0.25)
    assert (response.temperature, response.top_p) == (0.5, 0.25)
    assert response.metadata == {"k": "v"} and response.truncation == "auto"
    assert response.parallel_tool_calls is False


def test_max_output_tokens_is_incomplete(rstack: Stack) -> None:
    t = tag()
    client = sdk(rstack.url)
    response = checked(client.responses.create(model="openclaw", max_output_tokens=2,
                                               input=f"[{t}] a b c d e f"))
    assert response.status == "incomplete" and response.max_output_tokens == 2
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "plain: [" + t + "] "
    (body,) = upstream_bodies(rstack.upstream, t)
    assert body["max_tokens"] == 2
    events, _ = sse_events(rstack.url, {"model": "openclaw", "max_output_tokens": 2,
                                        "input": f"[{tag()}] a b c d"})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_model_header(rstack: Stack) -> None:
    t = tag()
    client = sdk(rstack.url, **{"x-openclaw-model": "fake/other-model"})
    response = checked(client.responses.create(model="openclaw", input=f"[{t}] hi"))
    assert response.model == "openclaw"
    (body,) = upstream_bodies(rstack.upstream, t)
    assert body["model"] == "other-model"


# ----------------------------------------------------------------------- function tools


def test_function_call_then_output_with_previous_response_id(rstack: Stack) -> None:
    t = tag()
    one, two = sdk(rstack.gateways[0].url), sdk(rstack.gateways[1].url)
    first = checked(one.responses.create(model="openclaw", tools=[WEATHER_TOOL],
                                         input=f"[{t}] weather in Oslo and Rome"))
    message, *calls = first.output
    assert message.type == "message" and first.output_text == "Let me check."
    assert [c.type for c in calls] == ["function_call", "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert all(c.name == "get_weather" and c.id.startswith("fc_") and c.call_id
               and c.status == "completed" for c in calls)
    assert first.tools[0].name == "get_weather" and first.status == "completed"
    # The results go to the other gateway, naming only the previous response.
    second = checked(two.responses.create(
        model="openclaw", tools=[WEATHER_TOOL], previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sun"},
               {"type": "function_call_output", "call_id": calls[1].call_id, "output": "rain"}]))
    assert second.output_text == "Result: sun; rain"
    assert second.previous_response_id == first.id
    *_, body = upstream_bodies(rstack.upstream, t)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool"]
    assert [c["id"] for c in body["messages"][2]["tool_calls"]] == [c.call_id for c in calls]


def test_function_call_round_trip_stateless(rstack: Stack) -> None:
    """The whole conversation sent back, as the Agents SDK does by default."""
    t = tag()
    client = sdk(rstack.url)
    question = {"role": "user", "content": f"[{t}] weather in Lima"}
    first = client.responses.create(model="openclaw", tools=[WEATHER_TOOL], input=[question])
    (call,) = [item for item in first.output if item.type == "function_call"]
    items = [question, *(item.model_dump(exclude_none=True) for item in first.output),
             {"type": "function_call_output", "call_id": call.call_id, "output": "fog"}]
    second = checked(client.responses.create(model="openclaw", tools=[WEATHER_TOOL],
                                             input=items))
    assert second.output_text == "Result: fog"
    *_, body = upstream_bodies(rstack.upstream, t)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool"]


def test_function_calls_streamed(rstack: Stack) -> None:
    rstack.upstream.token_delay = 0.005
    events, _ = sse_events(rstack.url, {"model": "openclaw", "tools": [WEATHER_TOOL],
                                        "input": f"[{tag()}] weather in Ulm and Bonn"})
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    by_item: dict[int, list[str]] = {}
    for event in events[2:-1]:
        by_item.setdefault(event["output_index"], []).append(event["type"])
    text = ["response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done"]
    assert sorted(set(by_item[0]), key=text.index) == text
    for index in (1, 2):
        kinds = by_item[index]
        assert kinds[0] == "response.output_item.added"
        assert set(kinds[1:-2]) == {"response.function_call_arguments.delta"}
        assert kinds[-2:] == ["response.function_call_arguments.done",
                              "response.output_item.done"]
    # Each item is closed before the next one opens.
    assert [e["output_index"] for e in events[2:-1]] == sorted(
        e["output_index"] for e in events[2:-1])
    final = events[-1]["response"]
    arguments = {e["output_index"]: e["arguments"] for e in events
                 if e["type"] == "response.function_call_arguments.done"}
    deltas: dict[int, str] = {}
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            deltas[e["output_index"]] = deltas.get(e["output_index"], "") + e["delta"]
    assert deltas == arguments
    assert [json.loads(item["arguments"]) for item in final["output"][1:]] == [
        {"city": "Ulm"}, {"city": "Bonn"}]
    assert [item["call_id"] for item in final["output"][1:]] == [
        e["item"]["call_id"] for e in events if e["type"] == "response.output_item.added"
        and e["item"]["type"] == "function_call"]


def test_stream_helper_with_tool_calls(rstack: Stack) -> None:
    with sdk(rstack.url).responses.stream(model="openclaw", tools=[WEATHER_TOOL],
                                          input=f"[{tag()}] weather in Riga") as stream:
        final = stream.get_final_response()
    (call,) = [item for item in checked(final).output if item.type == "function_call"]
    assert json.loads(call.arguments) == {"city": "Riga"}


def test_required_tool_not_called_is_502(rstack: Stack) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        sdk(rstack.url).responses.create(model="openclaw", tools=[WEATHER_TOOL],
                                         tool_choice="required", input="just chat")
    assert info.value.status_code == 502
    assert info.value.message.endswith("Agent did not call the required tool.")


# ------------------------------------------------------------------ previous responses


def test_previous_response_across_gateways(rstack: Stack) -> None:
    t = tag()
    one, two = sdk(rstack.gateways[0].url), sdk(rstack.gateways[1].url)
    first = one.responses.create(model="openclaw", input=f"[{t}] my name is Ada")
    second = two.responses.create(model="openclaw", input=f"[{t}] what is my name?",
                                  previous_response_id=first.id)
    third = one.responses.create(model="openclaw", input=f"[{t}] and again",
                                 previous_response_id=second.id)
    assert checked(third).previous_response_id == second.id
    *_, body = upstream_bodies(rstack.upstream, f"[{t}] and again")
    assert [(m["role"], text_of(m["content"])) for m in body["messages"][1:]] == [
        ("user", f"[{t}] my name is Ada"), ("assistant", f"plain: [{t}] my name is Ada"),
        ("user", f"[{t}] what is my name?"), ("assistant", f"plain: [{t}] what is my name?"),
        ("user", f"[{t}] and again")]


def test_previous_response_streamed(rstack: Stack) -> None:
    t = tag()
    client = sdk(rstack.url)
    first = client.responses.create(model="openclaw", input=f"[{t}] root")
    events = list(client.responses.create(model="openclaw", input=f"[{t}] next",
                                          previous_response_id=first.id, stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.previous_response_id == first.id
    *_, body = upstream_bodies(rstack.upstream, f"[{t}] next")
    assert text_of(body["messages"][1]["content"]) == f"[{t}] root"


def test_previous_response_of_another_agent_is_400(rstack: Stack) -> None:
    client = sdk(rstack.url)
    first = client.responses.create(model="openclaw/beta", input=f"[{tag()}] hi")
    for model in ("openclaw", "openclaw/main"):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=model, input="hi", previous_response_id=first.id)
        assert info.value.message.endswith(f"Previous response with id '{first.id}' not found.")
        validate("error_response", {"error": info.value.body})
    again = client.responses.create(model="openclaw/beta", input="again",
                                    previous_response_id=first.id)
    assert again.status == "completed"


# --------------------------------------------------------------------------- failures


def test_upstream_failure_mid_stream_is_response_failed(rstack: Stack) -> None:
    rstack.upstream.garbage_after = 2
    events, _ = sse_events(rstack.url, {"model": "openclaw",
                                        "input": f"[{tag()}] one two three four"})
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in [e["type"] for e in events]
    failed = events[-1]
    assert failed["type"] == "response.failed"
    response = failed["response"]
    assert response["status"] == "failed"
    assert response["error"]["code"] == "server_error"
    assert response["error"]["message"].startswith("upstream provider error")
    assert response["output"][0]["status"] == "incomplete"


def test_upstream_failure_before_output(rstack: Stack) -> None:
    rstack.upstream.fail_status = 429
    with pytest.raises(openai.RateLimitError):
        sdk(rstack.url).responses.create(model="openclaw", input="hi")
    events, _ = sse_events(rstack.url, {"model": "openclaw", "input": "hi"})
    assert [e["type"] for e in events] == ["response.created", "response.in_progress",
                                           "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "rate_limit_exceeded"


def test_client_disconnect_cancels_upstream(rstack: Stack) -> None:
    t = tag()
    rstack.upstream.token_delay = 0.2
    body = {"model": "openclaw", "stream": True, "input": f"[{t}] " + " ".join(["w"] * 100)}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{rstack.url}{URL}",
                                                      json=body, headers=AUTH) as resp:
        seen = ""
        for piece in resp.iter_text():
            seen += piece
            if "output_text.delta" in seen:
                break
    rstack.upstream.wait_for(lambda recs: any(
        t in orjson.dumps(r.body).decode() and r.disconnected for r in recs), timeout=1.0)


def test_non_streaming_disconnect_cancels_upstream(rstack: Stack) -> None:
    t = tag()
    rstack.upstream.token_delay = 0.2
    body = {"model": "openclaw", "input": f"[{t}] " + " ".join(["w"] * 100)}

    async def send_and_leave() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            request = asyncio.create_task(http.post(f"{rstack.url}{URL}", json=body,
                                                    headers=AUTH))
            await asyncio.to_thread(rstack.upstream.wait_for, lambda recs: any(
                t in orjson.dumps(r.body).decode() for r in recs), 10.0)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(send_and_leave())
    rstack.upstream.wait_for(lambda recs: any(
        t in orjson.dumps(r.body).decode() and r.disconnected for r in recs), timeout=1.0)


# ------------------------------------------------------------------- the Agents SDK


def test_openai_agents_sdk_default_model_runs_a_function_tool(rstack: Stack) -> None:
    """The Agents SDK's default provider and model (``OpenAIResponsesModel``), on a
    client pointed at the gateway: the tool call, the result, the final answer."""
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"hail in {city}"

    async def run_agent(question: str) -> Any:
        async with openai.AsyncOpenAI(base_url=f"{rstack.url}/v1", api_key=TOKEN,
                                      max_retries=0) as client:
            config = agents.RunConfig(model_provider=agents.OpenAIProvider(openai_client=client),
                                      tracing_disabled=True)
            agent = agents.Agent(name="weather", model="openclaw", tools=[get_weather],
                                 instructions="Use the tool.")
            return await agents.Runner.run(agent, question, run_config=config)

    result = asyncio.run(run_agent(f"[{tag()}] weather in Kyiv"))
    assert cities == ["Kyiv"]
    assert result.final_output == "Result: hail in Kyiv"
    assert all(isinstance(r.response_id, str) and r.response_id.startswith("resp_")
               for r in result.raw_responses)


# ------------------------------------------------------------- error rows, in-process


@pytest.fixture
def cfg() -> dict[str, Any]:
    config = responses_config(None, queueTimeoutSeconds=0.5)
    config["gateway"]["http"]["endpoints"]["chatCompletions"]["enabled"] = False
    config["gateway"]["http"]["endpoints"]["responses"]["maxBodyBytes"] = 2048
    config["gateway"]["auth"]["rateLimit"] = {"maxAttempts": 3, "windowSeconds": 60,
                                              "lockoutSeconds": 120}
    return config


async def test_disabled_is_plain_404_and_models_follow(shared_nats: NatsServer,
                                                       cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        models = await http.get("/v1/models", headers=AUTH)
        chat = await http.post("/v1/chat/completions", json={}, headers=AUTH)
    assert models.status_code == 200  # responses alone enable /v1/models
    assert {"openclaw", "openclaw/main"} <= {m["id"] for m in models.json()["data"]}
    assert chat.status_code == 404
    cfg["gateway"]["http"]["endpoints"]["responses"]["enabled"] = False
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json={"input": "hi"}, headers=AUTH)
        models = await http.get("/v1/models", headers=AUTH)
    assert (resp.status_code, resp.text) == (404, "Not Found")
    assert resp.headers["content-type"].startswith("text/plain")
    assert models.status_code == 404


async def test_method_not_allowed(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.get(URL, headers=AUTH)
    assert_error(resp, 405, "Method Not Allowed", "invalid_request_error")
    assert resp.headers["allow"] == "POST"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc"])
async def test_unauthorized(shared_nats: NatsServer, cfg: dict[str, Any],
                            header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, content=b"{not json", headers=headers)
    assert_error(resp, 401, "Unauthorized", "unauthorized")


async def test_lockout(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        for _ in range(3):
            resp = await http.post(URL, json={"input": "hi"},
                                   headers={"Authorization": "Bearer no"})
            assert resp.status_code == 401
        resp = await http.post(URL, json={"input": "hi"}, headers=AUTH)
    assert_error(resp, 429, "Too many failed authentication attempts. Please try again later.",
                 "rate_limited")
    assert 100 <= int(resp.headers["retry-after"]) <= 120


async def test_payload_too_large(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, content=orjson.dumps({"input": "x" * 4096}), headers=AUTH)
    assert_error(resp, 413, "Payload too large", "invalid_request_error")


async def test_bad_json(shared_nats: NatsServer, cfg: dict[str, Any]) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        garbage = await http.post(URL, content=b"{not json", headers=AUTH)
        array = await http.post(URL, content=b"[1, 2]", headers=AUTH)
    assert_error(array, 400, "Request body must be a JSON object.", "invalid_request_error")
    assert garbage.status_code == 400
    validate("error_response", garbage.json())
    assert garbage.json()["error"]["message"].startswith("Invalid JSON body")


@pytest.mark.parametrize(("body", "headers", "message"), [
    ({"model": "gpt-4o", "input": "hi"}, {},
     "Invalid `model`. Use `openclaw` or `openclaw/<agentId>`."),
    ({"model": "openclaw/nope", "input": "hi"}, {}, "Unknown agent 'nope'."),
    ({"input": "hi"}, {"x-openclaw-agent-id": "ghost"}, "Unknown agent 'ghost'."),
    ({"input": "hi"}, {"x-openclaw-session-key": "subagent:x"},
     "`x-openclaw-session-key` cannot use reserved internal session namespaces."),
    ({"input": "hi", "temperature": 3}, {}, "`temperature` must be between 0 and 2."),
    ({"input": "hi", "tools": [{"type": "file_search"}]}, {},
     '`tools[0]` must be a function tool ({"type": "function", "name": ...}).'),
    ({"input": "hi", "tools": [{"type": "function", "name": "a b"}]}, {},
     "`tools[0].name` must match ^[A-Za-z0-9_-]{1,64}$."),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}] * 2}, {},
     "`tools` has a duplicate function name 'f'."),
    ({"input": "hi", "tool_choice": {"type": "mcp", "server_label": "x"}}, {},
     '`tool_choice` must be "auto", "none", "required" or {"type": "function", "name": ...}.'),
    ({}, {}, "Missing user message in `input`."),
    ({"input": "hi", "previous_response_id": "resp_0123456789abcdef"}, {},
     "Previous response with id 'resp_0123456789abcdef' not found."),
    ({"input": "hi", "previous_response_id": "../x y"}, {},
     "Previous response with id '../x y' not found."),
])
async def test_request_validation_rows(shared_nats: NatsServer, cfg: dict[str, Any],
                                       body: dict[str, Any], headers: dict[str, str],
                                       message: str) -> None:
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json=body, headers={**AUTH, **headers})
    assert_error(resp, 400, message, "invalid_request_error")


async def test_image_errors_name_the_input_item(shared_nats: NatsServer,
                                                cfg: dict[str, Any]) -> None:
    body = {"input": [{"type": "reasoning", "summary": []}, {"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]}
    async with in_process(cfg, shared_nats.url) as http:
        resp = await http.post(URL, json=body, headers=AUTH)
    assert_error(resp, 400, "`input[1].content[1]`: image URL fetching is disabled.",
                 "invalid_request_error")


# ------------------------------------------------- the output builder, without a bus


def output_events(steps: list[tuple[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Feed a ResponseOutput ``steps`` (("text", delta), ("calls", chunks),
    ("done", (text, calls, finish_reason))); (its events, numbered, every one
    checked against the schema, the final Response)."""
    req = parse_responses_request({"input": "hi"}, {}, parse_settings({}, env={}))
    output = ResponseOutput(skeleton("resp_x", 1, req))
    frames = EventFrames()
    raw = frames.state("created", output.response)
    final: dict[str, Any] = {}
    for kind, value in steps:
        if kind == "text":
            raw += frames(output.text(value))
        elif kind == "calls":
            raw += frames(output.tool_calls(value))
        else:
            text, calls, reason = value
            raw += frames(output.reconcile(text, calls))
            closing, final = output.finish(reason, Usage(prompt_tokens=3, completion_tokens=4))
            raw += frames(closing) + frames.state(final["status"], final)
    events = [json.loads(frame.split(b"\ndata: ", 1)[1]) for frame in raw.split(b"\n\n")
              if frame]
    for event in events:
        validate_strict("response_stream_event", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events, final


def test_output_of_a_reply_that_came_whole() -> None:
    calls = (ToolCall(id="call_a", name="f", arguments='{"x":1}'),)
    events, final = output_events([("done", ("Sure.", calls, "tool_calls"))])
    validate_strict("response", final)
    assert [e["type"] for e in events] == [
        "response.created", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["call_id"] == "call_a"
    assert final["usage"]["total_tokens"] == 7


def test_output_completes_what_the_stream_lacked() -> None:
    """After a lost event, the run's end carries the rest: the tail is shown once."""
    calls = (ToolCall(id="call_a", name="f", arguments='{"x":1}'),
             ToolCall(id="call_b", name="g", arguments="{}"))
    events, final = output_events([
        ("text", "Hel"),
        ("calls", (ToolCallChunk(index=0, id="call_a", name="f", arguments='{"x"'),)),
        ("done", ("Hello", calls, "tool_calls"))])
    texts = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert texts == ["Hel", "lo"]
    assert [(item["type"], item.get("call_id")) for item in final["output"]] == [
        ("message", None), ("function_call", "call_a"), ("message", None),
        ("function_call", "call_b")]
    assert final["output"][2]["content"][0]["text"] == "lo"


def test_a_late_piece_of_a_closed_call_completes_its_arguments() -> None:
    events, final = output_events([
        ("calls", (ToolCallChunk(index=0, id="call_a", name="f", arguments="{"),
                   ToolCallChunk(index=1, id="call_b", name="g", arguments="{}"),
                   ToolCallChunk(index=0, arguments="}"))),
        ("done", ("", (), "tool_calls"))])
    assert [item["arguments"] for item in final["output"]] == ["{}", "{}"]
    deltas = [(e["output_index"], e["delta"]) for e in events
              if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == [(0, "{"), (1, "{}")]  # nothing streamed for a closed item


def test_an_empty_reply_and_a_cut_one() -> None:
    _, final = output_events([("done", ("", (), "stop"))])
    assert final["output"][0]["content"][0]["text"] == "No response from OpenClaw."
    events, final = output_events([("text", "a b"), ("done", ("a b", (), "length"))])
    assert final["status"] == "incomplete" and final["completed_at"] is None
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["type"] == "response.incomplete"
    validate_strict("response", final)


def test_failed_response_keeps_the_output_so_far() -> None:
    req = parse_responses_request({"input": "hi", "tools": [WEATHER_TOOL], "user": "u"}, {},
                                  parse_settings({}, env={}))
    output = ResponseOutput(skeleton("resp_x", 1, req))
    output.text("par")
    failed = output.failed("server_error", "upstream provider error")
    validate_strict("response", failed)
    assert failed["status"] == "failed" and failed["output"][0]["status"] == "incomplete"
    assert failed["tools"][0]["name"] == "get_weather" and failed["user"] == "u"
