"""The ``anthropic-messages`` provider against a real-HTTP fake Anthropic upstream."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from bus.messages import SamplingParams, Usage
from clawbus.config import ProviderConfig
from tests.fakes.anthropic_upstream import FakeAnthropic, FakeReply
from tests.fakes.http_upstream import RequestRecord
from tests.test_provider_openai import (
    CLOCK,
    GENERATED_ID,
    PARIS_CALLS,
    PNG,
    WEATHER,
    assemble,
    collect,
    image,
    kinds,
    stream_items,
)
from workers.providers import ANTHROPIC_DEFAULT_BASE_URL, make_provider
from workers.providers.anthropic_messages import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    AnthropicMessagesProvider,
    _Reply,
)
from workers.providers.base import (
    ChatMessage,
    Finish,
    ProviderError,
    ProviderRequest,
    TextDelta,
    ToolCall,
    ToolCallChunk,
    ToolChoice,
    ToolSpec,
)

KEY = "sk-ant-test-key"


def request(text: str = "hello big world", *, system: str = "",
            params: SamplingParams | None = None) -> ProviderRequest:
    return ProviderRequest(model="claude-test", system=system,
                           messages=(ChatMessage("user", text),),
                           params=params or SamplingParams())


def make(base_url: str, *, api_key: str | None = KEY, timeout: float = 10.0,
         headers: dict[str, str] | None = None) -> AnthropicMessagesProvider:
    return AnthropicMessagesProvider(base_url, api_key, headers or {}, timeout, 5.0)


async def failure(provider: AnthropicMessagesProvider, req: ProviderRequest) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await collect(provider, req)
    return info.value


async def wait_for(up: FakeAnthropic, predicate: Callable[[list[RequestRecord]], object],
                   within: float = 1.0) -> None:
    # up.wait_for blocks, so run it off the test's loop (which may still be closing sockets).
    await asyncio.to_thread(up.wait_for, predicate, within)


def last_disconnected(records: list[RequestRecord]) -> bool:
    return bool(records) and records[-1].disconnected


@pytest.fixture
def up() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        yield fake


@pytest.fixture
async def provider(up: FakeAnthropic) -> AsyncIterator[AnthropicMessagesProvider]:
    p = make(up.base_url)
    yield p
    await p.aclose()


async def test_streams_text_usage_and_stop(up: FakeAnthropic,
                                           provider: AnthropicMessagesProvider) -> None:
    deltas, finish = await collect(provider, request("hello big world"))
    assert "".join(deltas) == "echo: hello big world"
    assert "".join(deltas) == "echo: hello big world"  # one item per network read
    assert finish == Finish(reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=4))
    (rec,) = up.requests
    assert rec.method == "POST" and rec.path == "/v1/messages"
    assert rec.status == 200
    assert rec.body["stream"] is True
    assert rec.body["model"] == "claude-test"
    assert rec.body["messages"] == [{"role": "user", "content": "hello big world"}]


async def test_headers_sent(up: FakeAnthropic) -> None:
    p = make(up.base_url, headers={"X-Org": "acme", "anthropic-beta": "some-feature"})
    try:
        await collect(p, request())
    finally:
        await p.aclose()
    headers = up.requests[0].headers
    assert headers["x-api-key"] == KEY
    assert headers["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert headers["x-org"] == "acme"
    assert headers["anthropic-beta"] == "some-feature"
    assert "authorization" not in headers


async def test_no_key_means_no_key_header(up: FakeAnthropic) -> None:
    up.api_key = None
    p = make(up.base_url, api_key=None)
    try:
        await collect(p, request())
    finally:
        await p.aclose()
    assert "x-api-key" not in up.requests[0].headers


async def test_system_prompt_is_top_level(up: FakeAnthropic,
                                          provider: AnthropicMessagesProvider) -> None:
    _, finish = await collect(provider, request("one two", system="You are terse."))
    await collect(provider, request("no system"))
    with_system, without = (r.body for r in up.requests)
    assert with_system["system"] == "You are terse."
    assert with_system["messages"] == [{"role": "user", "content": "one two"}]
    assert finish.usage.prompt_tokens == 5  # the fake counts system words too
    assert "system" not in without


async def test_max_tokens_default_and_forwarded(up: FakeAnthropic,
                                                provider: AnthropicMessagesProvider) -> None:
    await collect(provider, request())
    await collect(provider, request(params=SamplingParams(max_tokens=50)))
    default, forwarded = (r.body for r in up.requests)
    assert default["max_tokens"] == DEFAULT_MAX_TOKENS == 4096
    assert forwarded["max_tokens"] == 50


async def test_max_tokens_cut_gives_length(up: FakeAnthropic,
                                           provider: AnthropicMessagesProvider) -> None:
    deltas, finish = await collect(provider, request(params=SamplingParams(max_tokens=2)))
    assert "".join(deltas) == "echo: hello "
    assert finish.reason == "length"
    assert finish.usage == Usage(prompt_tokens=3, completion_tokens=2)


async def test_sampling_params_forwarded_and_unsupported_dropped(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    params = SamplingParams(max_tokens=50, temperature=0.25, top_p=0.5, frequency_penalty=0.1,
                            presence_penalty=-0.2, seed=7, stop=("big", "qqq"))
    deltas, finish = await collect(provider, request(params=params))
    body = up.requests[0].body
    assert body["temperature"] == 0.25
    assert body["top_p"] == 0.5
    assert body["stop_sequences"] == ["big", "qqq"]
    for name in ("stop", "frequency_penalty", "presence_penalty", "seed"):
        assert name not in body
    assert "".join(deltas) == "echo: hello "  # cut at the stop sequence
    assert finish.reason == "stop"


async def test_unset_params_not_sent(up: FakeAnthropic,
                                     provider: AnthropicMessagesProvider) -> None:
    await collect(provider, request(params=SamplingParams(temperature=0.0)))
    body = up.requests[0].body
    assert body["temperature"] == 0.0
    for name in ("top_p", "stop_sequences", "system"):
        assert name not in body


async def test_consecutive_same_role_messages_merged(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    req = ProviderRequest(model="m", system="", messages=(
        ChatMessage("user", "one"), ChatMessage("user", "two"),
        ChatMessage("assistant", "three"), ChatMessage("assistant", "four"),
        ChatMessage("user", "five"),
    ))
    deltas, _ = await collect(provider, req)  # the fake rejects non-alternating roles
    assert "".join(deltas) == "echo: five"
    assert up.requests[0].body["messages"] == [
        {"role": "user", "content": "one\n\ntwo"},
        {"role": "assistant", "content": "three\n\nfour"},
        {"role": "user", "content": "five"},
    ]


async def test_blank_messages_dropped_and_neighbours_merged(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    # e.g. an earlier turn whose reply was empty: the API rejects blank content.
    req = ProviderRequest(model="m", system="", messages=(
        ChatMessage("user", "one"), ChatMessage("assistant", ""),
        ChatMessage("user", "two"), ChatMessage("assistant", " \n"),
        ChatMessage("user", "three"),
    ))
    await collect(provider, req)
    assert up.requests[0].body["messages"] == [
        {"role": "user", "content": "one\n\ntwo\n\nthree"},
    ]


async def test_sequential_runs_reuse_the_connection(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    await collect(provider, request("one"))
    await collect(provider, request("two"))
    await wait_for(up, lambda reqs: len(reqs) == 2 and all(r.completed for r in reqs))
    first, second = up.requests
    assert first.connection == second.connection


async def test_wrong_key_is_auth_error(up: FakeAnthropic) -> None:
    p = make(up.base_url, api_key="sk-ant-other")
    try:
        err = await failure(p, request())
    finally:
        await p.aclose()
    assert err.kind == "auth"
    assert err.status == 401
    assert "invalid x-api-key" in err.message


async def test_forbidden_is_auth_error(up: FakeAnthropic,
                                       provider: AnthropicMessagesProvider) -> None:
    up.fail_status = 403
    err = await failure(provider, request())
    assert err.kind == "auth"
    assert err.status == 403


async def test_rate_limit_with_retry_after(up: FakeAnthropic,
                                           provider: AnthropicMessagesProvider) -> None:
    up.fail_status = 429
    err = await failure(provider, request())
    assert err.kind == "rate_limit"
    assert err.status == 429
    assert err.retry_after == 1.0
    assert "rate_limit_error" in err.message


async def test_overloaded_is_rate_limit(up: FakeAnthropic,
                                        provider: AnthropicMessagesProvider) -> None:
    up.fail_status = 529
    err = await failure(provider, request())
    assert err.kind == "rate_limit"
    assert err.status == 529
    assert err.retry_after is None
    assert "Overloaded" in err.message


async def test_server_error_is_failed_with_upstream_message(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    up.fail_status = 500
    err = await failure(provider, request())
    assert err.kind == "failed"
    assert err.status == 500
    assert "Internal server error" in err.message


async def test_bad_request_is_failed_with_upstream_message(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    req = ProviderRequest(model="m", system="", messages=(ChatMessage("assistant", "hi"),))
    err = await failure(provider, req)
    assert err.kind == "failed"
    assert err.status == 400
    assert 'first message must use the "user" role' in err.message


async def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = make(f"http://127.0.0.1:{port}/v1")
    try:
        err = await failure(p, request())
    finally:
        await p.aclose()
    assert err.kind == "unreachable"


async def test_stall_is_timeout(up: FakeAnthropic) -> None:
    up.stall = True
    p = make(up.base_url, timeout=0.2)
    try:
        err = await failure(p, request())
    finally:
        await p.aclose()
    assert err.kind == "timeout"
    await wait_for(up, last_disconnected)


async def test_error_event_mid_stream(up: FakeAnthropic,
                                      provider: AnthropicMessagesProvider) -> None:
    start = ('event: message_start\ndata: {"type":"message_start","message":{"usage":'
             '{"input_tokens":3,"output_tokens":1}}}\n\n')
    delta = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
             '"delta":{"type":"text_delta","text":"par"}}\n\n')
    up.raw_sse = [start, delta, 'event: error\ndata: {"type":"error","error":'
                  '{"type":"overloaded_error","message":"Overloaded"}}\n\n']
    seen: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(request()):
            if isinstance(item, TextDelta):
                seen.append(item.text)
    assert seen == ["par"]
    assert info.value.kind == "rate_limit"
    assert "Overloaded" in info.value.message
    up.raw_sse = [start, 'event: error\ndata: {"type":"error","error":'
                  '{"type":"api_error","message":"Internal server error"}}\n\n']
    err = await failure(provider, request())
    assert err.kind == "bad_response"
    assert "Internal server error" in err.message


async def test_stream_ending_without_message_stop_is_bad_response(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    up.raw_sse = [
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        '"delta":{"type":"text_delta","text":"cut"}}\n\n',
        'event: message_delta\ndata: {"type":"message_delta","delta":'
        '{"stop_reason":"end_turn"},"usage":{"output_tokens":1}}\n\n',
    ]
    err = await failure(provider, request())
    assert err.kind == "bad_response"
    assert "message_stop" in err.message


async def test_non_json_event_is_bad_response(up: FakeAnthropic,
                                              provider: AnthropicMessagesProvider) -> None:
    up.raw_sse = ["event: content_block_delta\ndata: {this is not json\n\n"]
    err = await failure(provider, request())
    assert err.kind == "bad_response"


async def test_sse_parsing_is_lenient(up: FakeAnthropic,
                                      provider: AnthropicMessagesProvider) -> None:
    up.raw_sse = [
        ": comment\r\n\r\n",
        'event: message_start\r\ndata:{"type":"message_start","message":{"usage":'
        '{"input_tokens":7,"cache_read_input_tokens":2,"output_tokens":1}}}\r\n\r\n',
        'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        '"content_block":{"type":"thinking","thinking":""}}\n\n',
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        '"delta":{"type":"thinking_delta","thinking":"hmm"}}\n\n',
        'event: ping\ndata: {"type": "ping"}\n\n',
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
        '"delta":{"type":"text_delta","text":"Hi"}}\n\n',
        'event: some_future_event\ndata: {"type":"some_future_event"}\n\n',
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
        '"delta":{"type":"text_delta","text":" there"}}\n\n',
        'event: message_delta\ndata: {"type":"message_delta","delta":'
        '{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"output_tokens":9}}\n\n',
        'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        "event: junk\ndata: {ignored after message_stop\n\n",
    ]
    deltas, finish = await collect(provider, request())
    assert "".join(deltas) == "Hi there"
    assert finish == Finish(reason="length", usage=Usage(prompt_tokens=9, completion_tokens=9))


async def test_cancellation_disconnects_upstream(up: FakeAnthropic,
                                                 provider: AnthropicMessagesProvider) -> None:
    up.token_delay = 0.05
    up.reply = lambda body: " ".join(["word"] * 200)
    first = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(provider.stream(request())) as items:
            async for _ in items:
                first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(up, last_disconnected, within=1.0)
    rec = up.requests[-1]
    assert not rec.completed
    # A behaviour check, not a speed check: the whole reply takes 10 s; ending
    # within half of it means the cancel cut the call.
    assert rec.ended is not None and rec.ended - rec.started < 5


async def test_closing_generator_early_disconnects_upstream(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    up.token_delay = 0.05
    up.reply = lambda body: " ".join(["word"] * 200)
    items = provider.stream(request())
    assert isinstance(await anext(items), TextDelta)
    await items.aclose()
    await wait_for(up, last_disconnected, within=1.0)


async def test_make_provider() -> None:
    default = make_provider(ProviderConfig(api="anthropic-messages"), "k")
    custom = make_provider(ProviderConfig(api="anthropic-messages",
                                          base_url="http://proxy.local/anthropic/v1/"), None)
    try:
        assert isinstance(default, AnthropicMessagesProvider)
        assert default.base_url == ANTHROPIC_DEFAULT_BASE_URL == "https://api.anthropic.com/v1"
        assert isinstance(custom, AnthropicMessagesProvider)
        assert custom.base_url == "http://proxy.local/anthropic/v1"
    finally:
        await default.aclose()
        await custom.aclose()


def test_fake_serves_plain_json_to_sync_clients() -> None:
    with FakeAnthropic() as up, httpx.Client(base_url=up.base_url) as client:
        reply = client.post("/messages", json={
            "model": "m", "max_tokens": 3, "system": "s",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a b c d"}]}],
        })
        assert reply.status_code == 200
        data = reply.json()
        assert data["type"] == "message"
        assert data["content"] == [{"type": "text", "text": "echo: a b "}]
        assert data["stop_reason"] == "max_tokens"
        assert data["usage"] == {"input_tokens": 5, "output_tokens": 3}
        missing = client.post("/messages", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 400
        assert missing.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "max_tokens: Field required"}}
        up.wait_for(lambda reqs: len(reqs) == 2 and all(r.completed for r in reqs), 1.0)



# -------------------------------------------------------------------- client tools

def tool_request(*messages: ChatMessage, choice: ToolChoice | None = None,
                 tools: tuple[ToolSpec, ...] = (WEATHER, CLOCK)) -> ProviderRequest:
    return ProviderRequest(model="claude-test", system="",
                           messages=messages or (ChatMessage("user", "weather?"),),
                           tools=tools, tool_choice=choice)


def events(*payloads: dict[str, Any]) -> str:
    """Anthropic SSE events as one piece of body."""
    return "".join(f"event: {p['type']}\ndata: {orjson.dumps(p).decode()}\n\n"
                   for p in payloads)


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def block_delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def json_delta(index: int, partial: str) -> dict[str, Any]:
    return block_delta(index, {"type": "input_json_delta", "partial_json": partial})


def tool_use(index: int, call_id: str, name: str) -> dict[str, Any]:
    return block_start(index, {"type": "tool_use", "id": call_id, "name": name, "input": {}})


def stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def message_end(stop_reason: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"type": "message_delta", "delta": {"stop_reason": stop_reason},
             "usage": {"output_tokens": 5}}, {"type": "message_stop"})


async def test_tools_sent_with_input_schemas(up: FakeAnthropic,
                                             provider: AnthropicMessagesProvider) -> None:
    await collect(provider, tool_request(tools=(WEATHER, CLOCK,
                                                ToolSpec(name="noop", parameters={}))))
    body = up.requests[0].body
    empty = {"type": "object", "properties": {}}
    assert body["tools"] == [
        {"name": "get_weather", "description": "Current weather of a city",
         "input_schema": WEATHER.parameters},
        {"name": "get_time", "input_schema": empty},
        {"name": "noop", "input_schema": empty},
    ]
    assert "tool_choice" not in body


@pytest.mark.parametrize(("choice", "sent"), [
    (ToolChoice(mode="auto"), {"type": "auto"}),
    (ToolChoice(mode="none"), {"type": "none"}),
    (ToolChoice(mode="required"), {"type": "any"}),
    (ToolChoice(mode="function", name="get_time"), {"type": "tool", "name": "get_time"}),
    (ToolChoice(parallel=False), {"type": "auto", "disable_parallel_tool_use": True}),
    (ToolChoice(mode="required", parallel=False),
     {"type": "any", "disable_parallel_tool_use": True}),
    (ToolChoice(mode="function", name="get_weather", parallel=False),
     {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
    (ToolChoice(mode="none", parallel=False), {"type": "none"}),  # the API rejects the flag
    (ToolChoice(parallel=True), {"type": "auto"}),  # parallel is the default
])
async def test_tool_choice(up: FakeAnthropic, provider: AnthropicMessagesProvider,
                           choice: ToolChoice, sent: dict[str, Any]) -> None:
    await collect(provider, tool_request(choice=choice))  # the fake checks it too
    assert up.requests[0].body["tool_choice"] == sent


async def test_no_tools_means_no_tool_fields(up: FakeAnthropic,
                                             provider: AnthropicMessagesProvider) -> None:
    await collect(provider, tool_request(tools=(), choice=ToolChoice(mode="required")))
    assert "tools" not in up.requests[0].body
    assert "tool_choice" not in up.requests[0].body


async def test_tool_traffic_and_images_as_content_blocks(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    req = tool_request(
        ChatMessage("user", "Weather in Paris, and the time?"),
        ChatMessage("assistant", "Checking.", tool_calls=PARIS_CALLS),
        ChatMessage("tool", "Sunny, 21 C", tool_call_id="call_1", name="get_weather"),
        ChatMessage("tool", "", tool_call_id="call_2"),
        ChatMessage("user", "Also, what is this?", images=(image(), image(b"GIF89a",
                                                                          "image/gif"))),
        ChatMessage("user", "And this one."),
    )
    deltas, finish = await collect(provider, req)  # the fake checks the pairing rules
    assert "".join(deltas) == "echo: Also, what is this?And this one."
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                       "data": base64.b64encode(PNG).decode()}}
    gif = {"type": "image", "source": {"type": "base64", "media_type": "image/gif",
                                       "data": base64.b64encode(b"GIF89a").decode()}}
    messages = up.requests[0].body["messages"]
    assert messages == [
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny, 21 C"},
            {"type": "tool_result", "tool_use_id": "call_2"},
            png, gif,
            {"type": "text", "text": "Also, what is this?"},
            {"type": "text", "text": "And this one."},
        ]},
    ]
    assert base64.b64decode(messages[2]["content"][2]["source"]["data"]) == PNG
    assert finish.reason == "stop"


async def test_tool_results_lead_the_user_message(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    req = tool_request(
        ChatMessage("user", "Time?"),
        ChatMessage("assistant", " ", tool_calls=(ToolCall(id="toolu_1", name="get_time",
                                                           arguments="{}"),)),
        ChatMessage("user", "(take your time)"),
        ChatMessage("tool", "12:00", tool_call_id="toolu_1"),
    )
    await collect(provider, req)
    assert up.requests[0].body["messages"][1:] == [
        {"role": "assistant", "content": [  # blank text left out, the call kept
            {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"},
            {"type": "text", "text": "(take your time)"},
        ]},
    ]


@pytest.mark.parametrize(("arguments", "sent"), [
    ('{"city": "Zürich"}', {"city": "Zürich"}),
    ("", {}),
    ("  ", {}),
    ('{"city": "Zür', {"_raw_arguments": '{"city": "Zür'}),
    ("[1, 2]", {"_raw_arguments": "[1, 2]"}),
    ("null", {"_raw_arguments": "null"}),
])
async def test_call_arguments_as_tool_use_input(up: FakeAnthropic,
                                                provider: AnthropicMessagesProvider,
                                                arguments: str, sent: dict[str, Any]) -> None:
    req = tool_request(
        ChatMessage("user", "go"),
        ChatMessage("assistant", "", tool_calls=(
            ToolCall(id="toolu_1", name="get_weather", arguments=arguments),)),
        ChatMessage("tool", "bad arguments", tool_call_id="toolu_1"),
    )
    await collect(provider, req)
    assert up.requests[0].body["messages"][1]["content"][0]["input"] == sent


async def test_unanswered_call_is_rejected_by_the_fake(
        up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    # The fake enforces the API's pairing rule, so the tests above mean something.
    req = tool_request(
        ChatMessage("user", "go"),
        ChatMessage("assistant", "", tool_calls=(ToolCall(id="toolu_1", name="get_time"),)),
        ChatMessage("user", "never mind"),
    )
    err = await failure(provider, req)
    assert err.kind == "failed" and err.status == 400
    assert "`tool_use` ids were found without `tool_result` blocks" in err.message


async def test_tool_use_round_trip(up: FakeAnthropic,
                                   provider: AnthropicMessagesProvider) -> None:
    zurich = '{"city":"Zürich ☃"}'
    up.reply = lambda body: FakeReply("Checking.", [("get_weather", zurich),
                                                    ("get_time", "{}")])
    items = await stream_items(provider, tool_request())
    text, calls, finish = assemble(items)
    assert text == "Checking."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", zurich),
                                                      ("get_time", "{}")]
    assert all(c.id.startswith("toolu_") for c in calls)
    assert kinds(items) == ["text", "call 0", "call 1"]
    assert finish.reason == "tool_calls"
    assert finish.usage.completion_tokens == 3  # 1 word and 2 calls, as the fake counts

    up.reply = lambda body: "Sunny at noon."
    follow_up = tool_request(
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", text, tool_calls=tuple(calls)),
        *(ChatMessage("tool", result, tool_call_id=call.id)
          for call, result in zip(calls, ["Sunny", "12:00"], strict=True)))
    deltas, finish = await collect(provider, follow_up)
    assert "".join(deltas) == "Sunny at noon."
    assert finish.reason == "stop"
    assistant, results = up.requests[-1].body["messages"][1:]
    assert [(b["id"], b["input"]) for b in assistant["content"][1:]] == [
        (calls[0].id, {"city": "Zürich ☃"}), (calls[1].id, {})]
    assert [b["tool_use_id"] for b in results["content"]] == [c.id for c in calls]


async def test_call_without_text(up: FakeAnthropic, provider: AnthropicMessagesProvider) -> None:
    up.reply = lambda body: FakeReply(tool_calls=[("get_time", '{"tz":"UTC"}')])
    items = await stream_items(provider, tool_request())
    text, calls, finish = assemble(items)
    assert text == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_time", '{"tz":"UTC"}')]
    assert kinds(items) == ["call 0"]
    assert finish.reason == "tool_calls"


async def test_tool_use_blocks_after_thinking(up: FakeAnthropic,
                                              provider: AnthropicMessagesProvider) -> None:
    up.raw_sse = [events(
        {"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
        block_start(0, {"type": "thinking", "thinking": ""}),
        block_delta(0, {"type": "thinking_delta", "thinking": "hmm"}),
        stop(0),
        # a call without input text, and one without an id
        tool_use(1, "toolu_a", "get_time"), json_delta(1, ""), stop(1),
        block_start(2, {"type": "tool_use", "name": "get_weather", "input": {}}),
        json_delta(2, '{"city":'), json_delta(2, '"Oslo"}'), stop(2),
        *message_end("end_turn"),
    )]
    _, calls, finish = assemble(await stream_items(provider, tool_request()))
    assert calls[0] == ToolCall(id="toolu_a", name="get_time", arguments="{}")
    assert (calls[1].name, calls[1].arguments) == ("get_weather", '{"city":"Oslo"}')
    assert GENERATED_ID.fullmatch(calls[1].id)
    assert finish.reason == "tool_calls"  # calls were made, whatever the stop reason


@pytest.mark.parametrize(("stop_reason", "with_call", "expected"), [
    ("tool_use", True, "tool_calls"), ("tool_use", False, "stop"),
    ("max_tokens", True, "length"), ("end_turn", False, "stop"),
])
async def test_finish_reasons(up: FakeAnthropic, provider: AnthropicMessagesProvider,
                              stop_reason: str, with_call: bool, expected: str) -> None:
    call = (tool_use(0, "toolu_a", "f"), json_delta(0, '{"a":'), stop(0)) if with_call \
        else (block_start(0, {"type": "text", "text": ""}),
              block_delta(0, {"type": "text_delta", "text": "hi"}), stop(0))
    up.raw_sse = [events(*call, *message_end(stop_reason))]
    _, calls, finish = assemble(await stream_items(provider, tool_request()))
    assert len(calls) == with_call
    assert finish.reason == expected


def test_events_of_one_read_are_normalized_and_joined() -> None:
    reply = _Reply()
    batch = events(
        block_start(0, {"type": "text", "text": ""}),
        block_delta(0, {"type": "text_delta", "text": "Let me "}),
        block_delta(0, {"type": "text_delta", "text": "see."}),
        stop(0),
        tool_use(1, "toolu_a", "f"), json_delta(1, ""), json_delta(1, '{"a":'),
        json_delta(1, '"b"}'), stop(1),
        tool_use(2, "toolu_b", "g"), stop(2),
        block_start(3, {"type": "text", "text": ""}),
        block_delta(3, {"type": "text_delta", "text": " Done."}),
    ).encode().splitlines()
    text, failure = reply.parse(batch)
    assert failure is None
    assert text == " Done."  # the text after the calls, yielded after them
    assert reply.items == [
        TextDelta("Let me see."),
        ToolCallChunk(index=0, id="toolu_a", name="f", arguments='{"a":"b"}'),
        ToolCallChunk(index=1, id="toolu_b", name="g", arguments="{}"),
    ]


def test_fake_answers_tool_use_in_plain_json() -> None:
    with FakeAnthropic() as up, httpx.Client(base_url=up.base_url) as client:
        up.reply = lambda body: FakeReply("On it.", [("get_time", '{"tz":"UTC"}')])
        reply = client.post("/messages", json={
            "model": "m", "max_tokens": 100,
            "tools": [{"name": "get_time", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "time?"}]})
        data = reply.json()
        assert data["stop_reason"] == "tool_use"
        text, call = data["content"]
        assert text == {"type": "text", "text": "On it."}
        assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
        assert (call["name"], call["input"]) == ("get_time", {"tz": "UTC"})


def test_tool_history_without_tools_declares_them_uncallable() -> None:
    """A session turn sent without `tools` after a tool round: the API refuses tool
    blocks without tool definitions, so the used tools are declared with
    tool_choice none."""
    from bus.messages import ToolCall
    from workers.providers.anthropic_messages import _request_body

    call = ToolCall(id="c1", name="get_weather", arguments='{"city": "Oslo"}')
    body = _request_body(ProviderRequest(model="m", system="", messages=(
        ChatMessage("user", "weather?"), ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "sunny", tool_call_id="c1", name="get_weather"),
        ChatMessage("assistant", "It is sunny."), ChatMessage("user", "thanks"))))
    assert body["tools"] == [{"name": "get_weather",
                              "input_schema": {"type": "object", "properties": {}}}]
    assert body["tool_choice"] == {"type": "none"}
