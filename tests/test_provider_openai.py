"""The ``openai-completions`` provider against a real-HTTP fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from bus.messages import SamplingParams, Usage
from clawbus.config import ProviderConfig
from tests.fakes.openai_upstream import (
    TOOL_QUIRKS,
    FakeOpenAI,
    FakeReply,
    RequestRecord,
    fake_vector,
)
from workers.providers import OPENAI_DEFAULT_BASE_URL, make_provider, openai_completions
from workers.providers.base import (
    ChatMessage,
    Embedder,
    Finish,
    ImagePart,
    Provider,
    ProviderError,
    ProviderRequest,
    StreamItem,
    TextDelta,
    ToolCall,
    ToolCallChunk,
    ToolChoice,
    ToolSpec,
)
from workers.providers.echo import EchoProvider
from workers.providers.openai_completions import (
    OpenAICompletionsProvider,
    _embeddings,
    _parse_batch,
    _StreamState,
)

KEY = "sk-test-key"


def request(text: str = "hello big world", *, system: str = "",
            params: SamplingParams | None = None) -> ProviderRequest:
    return ProviderRequest(model="gpt-test", system=system,
                           messages=(ChatMessage("user", text),),
                           params=params or SamplingParams())


def make(base_url: str, *, api_key: str | None = KEY, timeout: float = 10.0,
         headers: dict[str, str] | None = None) -> OpenAICompletionsProvider:
    return OpenAICompletionsProvider(base_url, api_key, headers or {}, timeout, 5.0)


async def stream_items(provider: Provider, req: ProviderRequest) -> list[StreamItem]:
    """Every item of one reply (checked to end with its one Finish)."""
    out: list[StreamItem] = []
    async with contextlib.aclosing(provider.stream(req)) as items:
        async for item in items:
            assert not out or not isinstance(out[-1], Finish), "nothing may follow Finish"
            out.append(item)
    assert out and isinstance(out[-1], Finish)
    return out


async def collect(provider: Provider, req: ProviderRequest) -> tuple[list[str], Finish]:
    items = await stream_items(provider, req)
    finish = items[-1]
    assert isinstance(finish, Finish)
    return [item.text for item in items if isinstance(item, TextDelta)], finish


def assemble(items: list[StreamItem]) -> tuple[str, list[ToolCall], Finish]:
    """(text, calls, finish) of a reply's items, checking the normalized tool-call
    contract (workers/providers/base.py): indices 0-based in call order, a call's
    first piece carrying its id and name, later pieces neither."""
    text: list[str] = []
    calls: list[ToolCall] = []
    for item in items[:-1]:
        if isinstance(item, TextDelta):
            text.append(item.text)
            continue
        assert isinstance(item, ToolCallChunk), item
        if item.index == len(calls):
            assert item.id and item.name, f"first piece without id and name: {item}"
            calls.append(ToolCall(id=item.id, name=item.name, arguments=item.arguments))
        else:
            assert item.index < len(calls), f"index out of order: {item}"
            assert item.id is None and item.name is None, f"id/name repeated: {item}"
            call = calls[item.index]
            calls[item.index] = call.model_copy(
                update={"arguments": call.arguments + item.arguments})
    finish = items[-1]
    assert isinstance(finish, Finish)
    return "".join(text), calls, finish


def kinds(items: list[StreamItem]) -> list[str]:
    """The reply's shape: "text" / "call <index>" runs, in order."""
    shape: list[str] = []
    for item in items[:-1]:
        kind = "text" if isinstance(item, TextDelta) else f"call {item.index}"  # type: ignore[union-attr]
        if not shape or shape[-1] != kind:
            shape.append(kind)
    return shape


async def failure(provider: OpenAICompletionsProvider, req: ProviderRequest) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await collect(provider, req)
    return info.value


async def wait_for(up: FakeOpenAI, predicate: Callable[[list[RequestRecord]], object],
                   within: float = 1.0) -> None:
    # up.wait_for blocks, so run it off the test's loop (which may still be closing sockets).
    await asyncio.to_thread(up.wait_for, predicate, within)


def last_disconnected(records: list[RequestRecord]) -> bool:
    return bool(records) and records[-1].disconnected


@pytest.fixture
def up() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def provider(up: FakeOpenAI) -> AsyncIterator[OpenAICompletionsProvider]:
    p = make(up.base_url)
    yield p
    await p.aclose()


async def test_streams_text_usage_and_stop(up: FakeOpenAI,
                                           provider: OpenAICompletionsProvider) -> None:
    deltas, finish = await collect(provider, request("hello big world", system="be brief"))
    assert "".join(deltas) == "echo: hello big world"
    # One item per network read: whatever arrived together is joined, in order.
    assert deltas and all(deltas)
    assert finish == Finish(reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=4))
    (rec,) = up.requests
    assert rec.method == "POST" and rec.path == "/v1/chat/completions"
    assert rec.body["stream"] is True
    assert rec.body["stream_options"] == {"include_usage": True}
    assert rec.body["model"] == "gpt-test"


async def test_max_tokens_cut_gives_length(up: FakeOpenAI,
                                           provider: OpenAICompletionsProvider) -> None:
    deltas, finish = await collect(provider, request(params=SamplingParams(max_tokens=2)))
    assert "".join(deltas) == "echo: hello "
    assert finish.reason == "length"
    assert finish.usage.completion_tokens == 2
    assert up.requests[0].body["max_tokens"] == 2


async def test_sampling_params_forwarded(up: FakeOpenAI,
                                         provider: OpenAICompletionsProvider) -> None:
    params = SamplingParams(max_tokens=50, temperature=0.25, top_p=0.5, frequency_penalty=0.1,
                            presence_penalty=-0.2, seed=7, stop=("zzz", "qqq"))
    await collect(provider, request(params=params))
    body = up.requests[0].body
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.25
    assert body["top_p"] == 0.5
    assert body["frequency_penalty"] == 0.1
    assert body["presence_penalty"] == -0.2
    assert body["seed"] == 7
    assert body["stop"] == ["zzz", "qqq"]


async def test_unset_params_not_sent(up: FakeOpenAI,
                                     provider: OpenAICompletionsProvider) -> None:
    await collect(provider, request(params=SamplingParams(temperature=0.0)))
    body = up.requests[0].body
    assert body["temperature"] == 0.0
    for name in ("max_tokens", "top_p", "frequency_penalty", "presence_penalty", "seed", "stop"):
        assert name not in body


async def test_system_prompt_is_first_message(up: FakeOpenAI,
                                              provider: OpenAICompletionsProvider) -> None:
    req = ProviderRequest(model="m", system="You are terse.", messages=(
        ChatMessage("user", "one"), ChatMessage("assistant", "two"), ChatMessage("user", "three"),
    ))
    await collect(provider, req)
    await collect(provider, request("no system"))
    with_system, without = (r.body["messages"] for r in up.requests)
    assert with_system == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    assert without == [{"role": "user", "content": "no system"}]


async def test_auth_and_custom_headers_sent(up: FakeOpenAI) -> None:
    up.api_key = KEY
    p = make(up.base_url, headers={"X-Org": "acme"})
    try:
        deltas, _ = await collect(p, request("hi"))
    finally:
        await p.aclose()
    assert "".join(deltas) == "echo: hi"
    headers = up.requests[0].headers
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["x-org"] == "acme"
    assert headers["content-type"] == "application/json"


async def test_no_key_means_no_auth_header(up: FakeOpenAI) -> None:
    p = make(up.base_url, api_key=None)
    try:
        await collect(p, request())
    finally:
        await p.aclose()
    assert "authorization" not in up.requests[0].headers


async def test_sequential_runs_reuse_the_connection(up: FakeOpenAI,
                                                    provider: OpenAICompletionsProvider) -> None:
    await collect(provider, request("one"))
    await collect(provider, request("two"))
    await wait_for(up, lambda reqs: len(reqs) == 2 and all(r.completed for r in reqs))
    first, second = up.requests
    assert first.connection == second.connection


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_errors(up: FakeOpenAI, provider: OpenAICompletionsProvider,
                           status: int) -> None:
    up.fail_status = status
    err = await failure(provider, request())
    assert err.kind == "auth"
    assert err.status == status


async def test_wrong_key_is_auth_error(up: FakeOpenAI) -> None:
    up.api_key = "sk-other"
    p = make(up.base_url)
    try:
        err = await failure(p, request())
    finally:
        await p.aclose()
    assert err.kind == "auth"
    assert "Incorrect API key provided." in err.message


async def test_rate_limit_with_retry_after(up: FakeOpenAI,
                                           provider: OpenAICompletionsProvider) -> None:
    up.fail_status = 429
    err = await failure(provider, request())
    assert err.kind == "rate_limit"
    assert err.status == 429
    assert err.retry_after == 1.0


async def test_server_error_is_failed_with_upstream_message(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.fail_status = 500
    err = await failure(provider, request())
    assert err.kind == "failed"
    assert err.status == 500
    assert "The server had an error processing your request." in err.message


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


async def test_stall_is_timeout(up: FakeOpenAI) -> None:
    up.stall = True
    p = make(up.base_url, timeout=0.2)
    try:
        err = await failure(p, request())
    finally:
        await p.aclose()
    assert err.kind == "timeout"
    await wait_for(up, last_disconnected)


async def test_garbage_sse_is_bad_response(up: FakeOpenAI,
                                           provider: OpenAICompletionsProvider) -> None:
    up.garbage_after = 2
    seen: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(request()):
            if isinstance(item, TextDelta):
                seen.append(item.text)
    assert info.value.kind == "bad_response"
    assert "".join(seen) == "echo: hello "  # the text before the garbage, then the error


async def test_error_object_in_stream_is_bad_response(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.raw_sse = [
        'data: {"choices":[{"index":0,"delta":{"content":"par"},"finish_reason":null}]}\n\n',
        'event: error\ndata: {"error":{"message":"model overloaded","type":"server_error"}}\n\n',
    ]
    err = await failure(provider, request())
    assert err.kind == "bad_response"
    assert "model overloaded" in err.message


async def test_stream_ending_without_done_or_finish_is_bad_response(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.raw_sse = ['data: {"choices":[{"index":0,"delta":{"content":"cut"}}]}\n\n']
    err = await failure(provider, request())
    assert err.kind == "bad_response"


async def test_finish_reason_without_done_is_accepted(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.raw_sse = [
        'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n',
        'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n',
    ]
    deltas, finish = await collect(provider, request())
    assert deltas == ["ok"]
    assert finish == Finish(reason="length")


async def test_sse_parsing_is_lenient(up: FakeOpenAI,
                                      provider: OpenAICompletionsProvider) -> None:
    up.raw_sse = [
        ": keep-alive comment\r\n\r\n",
        "event: message\r\nid: 1\r\n"
        'data:{"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}],'
        '"usage":null}\r\n\r\n',
        'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n',
        'data: {"choices":[{"index":0,"delta":{"content":null},"finish_reason":null}]}\n\n',
        'data: {"choices":[{"index":0,"delta":{"content":" there"},"finish_reason":"eos"}]}\n\n',
        'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
        '"total_tokens":5}}\n\n',
        "data: [DONE]\n\n",
        "data: {ignored after done\n\n",
    ]
    deltas, finish = await collect(provider, request())
    assert "".join(deltas) == "Hi there"
    assert finish == Finish(reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2))


async def test_cancellation_disconnects_upstream(up: FakeOpenAI,
                                                 provider: OpenAICompletionsProvider) -> None:
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
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.token_delay = 0.05
    up.reply = lambda body: " ".join(["word"] * 200)
    items = provider.stream(request())
    assert isinstance(await anext(items), TextDelta)
    await items.aclose()
    await wait_for(up, last_disconnected, within=1.0)


async def test_make_provider() -> None:
    echo = make_provider(ProviderConfig(api="echo", token_delay_ms=5), None)
    assert isinstance(echo, EchoProvider)
    default = make_provider(ProviderConfig(api="openai-completions"), "k")
    custom = make_provider(ProviderConfig(api="openai-completions",
                                          base_url="http://localhost:11434/v1/"), None)
    try:
        assert isinstance(default, OpenAICompletionsProvider)
        assert default.base_url == OPENAI_DEFAULT_BASE_URL
        assert isinstance(custom, OpenAICompletionsProvider)
        assert custom.base_url == "http://localhost:11434/v1"
    finally:
        await default.aclose()
        await custom.aclose()


def test_fake_serves_plain_json_and_models_to_sync_clients() -> None:
    with FakeOpenAI() as up, httpx.Client(base_url=up.base_url) as client:
        models = client.get("/models")
        assert models.status_code == 200
        assert models.json()["data"][0]["id"] == "fake-model"
        reply = client.post("/chat/completions", json={
            "model": "m", "max_tokens": 3,
            "messages": [{"role": "system", "content": "s"},
                         {"role": "user", "content": "a b c d"}],
        })
        assert reply.status_code == 200
        data = reply.json()
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["message"]["content"] == "echo: a b "
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        up.wait_for(lambda reqs: len(reqs) == 2 and all(r.completed for r in reqs), 1.0)


def test_event_payload_with_invalid_utf8_is_decoded_with_replacement() -> None:
    from workers.providers.http_stream import decode_event, sse_payload

    payload = sse_payload(b'data: {"choices":[{"delta":{"content":"a\xffb"}}]} ')
    assert payload is not None
    event = decode_event(payload)
    assert event["choices"][0]["delta"]["content"] == "a\ufffdb"
    with pytest.raises(ProviderError):
        decode_event(b"{not json")



# -------------------------------------------------------------------- client tools

WEATHER = ToolSpec(name="get_weather", description="Current weather of a city",
                   parameters={"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}, strict=True)
CLOCK = ToolSpec(name="get_time")
GENERATED_ID = re.compile(r"call_[0-9A-Za-z]{24}")
PNG = bytes(range(256)) * 3  # every byte value: base64 must carry them intact
# An assistant turn's two calls, the second without arguments.
PARIS_CALLS = (ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}'),
               ToolCall(id="call_2", name="get_time"))


def tool_request(*messages: ChatMessage, choice: ToolChoice | None = None,
                 tools: tuple[ToolSpec, ...] = (WEATHER, CLOCK)) -> ProviderRequest:
    return ProviderRequest(model="gpt-test", system="",
                           messages=messages or (ChatMessage("user", "weather?"),),
                           tools=tools, tool_choice=choice)


def image(data: bytes = PNG, mime: str = "image/png", detail: str | None = None) -> ImagePart:
    return ImagePart(mime=mime, data=base64.b64encode(data).decode(), size=len(data),
                     detail=detail)


def sse(*chunks: dict[str, Any]) -> str:
    """Chat completion chunks as one piece of SSE body."""
    return "".join(f"data: {orjson.dumps(c).decode()}\n\n" for c in chunks)


def tool_delta(*fragments: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"tool_calls": list(fragments)},
                         "finish_reason": finish}]}


def text_delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def finish_chunk(reason: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


async def test_tools_sent_as_function_tools(up: FakeOpenAI,
                                            provider: OpenAICompletionsProvider) -> None:
    await collect(provider, tool_request())
    body = up.requests[0].body
    assert body["tools"] == [
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
            "strict": True}},
        {"type": "function", "function": {"name": "get_time"}},
    ]
    assert "tool_choice" not in body and "parallel_tool_calls" not in body


@pytest.mark.parametrize(("choice", "sent", "parallel"), [
    (ToolChoice(mode="auto"), "auto", None),
    (ToolChoice(mode="none"), "none", None),
    (ToolChoice(mode="required", parallel=True), "required", True),
    (ToolChoice(mode="function", name="get_time"),
     {"type": "function", "function": {"name": "get_time"}}, None),
    (ToolChoice(parallel=False), "auto", False),
])
async def test_tool_choice_and_parallel(up: FakeOpenAI, provider: OpenAICompletionsProvider,
                                        choice: ToolChoice, sent: object,
                                        parallel: bool | None) -> None:
    await collect(provider, tool_request(choice=choice))
    body = up.requests[0].body
    assert body["tool_choice"] == sent
    assert body.get("parallel_tool_calls") == parallel
    assert ("parallel_tool_calls" in body) == (parallel is not None)


async def test_no_tools_means_no_tool_fields(up: FakeOpenAI,
                                             provider: OpenAICompletionsProvider) -> None:
    await collect(provider, tool_request(tools=(), choice=ToolChoice(mode="required",
                                                                     parallel=False)))
    body = up.requests[0].body
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        assert name not in body


async def test_tool_traffic_and_images_sent_structured(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    req = tool_request(
        ChatMessage("user", "Weather in Paris, and the time?"),
        ChatMessage("assistant", "", tool_calls=PARIS_CALLS),
        ChatMessage("tool", "Sunny, 21 C", tool_call_id="call_1", name="get_weather"),
        ChatMessage("tool", "12:00", tool_call_id="call_2"),
        ChatMessage("assistant", "Let me look again.", tool_calls=(
            ToolCall(id="call_3", name="get_weather", arguments='{"city":"Nice"}'),)),
        ChatMessage("tool", "Rain", tool_call_id="call_3"),
        ChatMessage("assistant", "Sunny, noon."),
        ChatMessage("user", "And these?", images=(image(detail="low"),
                                                  image(b"GIF89a", "image/gif"))),
        ChatMessage("user", "", images=(image(),)),
    )
    await collect(provider, req)
    messages = up.requests[0].body["messages"]
    png_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert messages == [
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "Let me look again.", "tool_calls": [
            {"id": "call_3", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Nice"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_3", "content": "Rain"},
        {"role": "assistant", "content": "Sunny, noon."},
        {"role": "user", "content": [
            {"type": "text", "text": "And these?"},
            {"type": "image_url", "image_url": {"url": png_url, "detail": "low"}},
            {"type": "image_url", "image_url": {
                "url": "data:image/gif;base64," + base64.b64encode(b"GIF89a").decode()}},
        ]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url}}]},
    ]
    sent = messages[-1]["content"][0]["image_url"]["url"]
    assert base64.b64decode(sent.split(",", 1)[1]) == PNG


async def test_streamed_call_after_text(up: FakeOpenAI,
                                       provider: OpenAICompletionsProvider) -> None:
    up.reply = lambda body: FakeReply("Let me check.", [("get_weather", '{"city":"Paris"}')])
    items = await stream_items(provider, tool_request())
    text, calls, finish = assemble(items)
    assert text == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}')]
    assert GENERATED_ID.fullmatch(calls[0].id)  # the fake's own id, in the same shape
    assert kinds(items) == ["text", "call 0"]
    assert finish.reason == "tool_calls"
    assert finish.usage.completion_tokens == 4  # 3 words and 1 call, as the fake counts


ZURICH = '{"city":"Zürich ☃"}'
TIME = '{"tz":"Europe/Zürich","format":"24h"}'


@pytest.mark.parametrize("quirks", [
    set(), {"no_index"}, {"no_id"}, {"stop_finish"}, {"whole_args"}, {"split_utf8"},
    {"offset_index"}, {"no_index", "no_id"}, {"no_index", "no_id", "whole_args"},
    {"offset_index", "split_utf8", "no_id"}, set(TOOL_QUIRKS),
], ids=lambda quirks: "+".join(sorted(quirks)) or "none")
async def test_parallel_calls_normalized_whatever_the_quirks(
        up: FakeOpenAI, provider: OpenAICompletionsProvider, quirks: set[str]) -> None:
    up.tool_quirks = quirks
    up.reply = lambda body: FakeReply("Checking.", [("get_weather", ZURICH), ("get_time", TIME)])
    items = await stream_items(provider, tool_request())
    text, calls, finish = assemble(items)
    assert text == "Checking."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", ZURICH),
                                                      ("get_time", TIME)]
    assert all(GENERATED_ID.fullmatch(c.id) for c in calls)
    assert calls[0].id != calls[1].id
    assert kinds(items) == ["text", "call 0", "call 1"]
    assert finish.reason == "tool_calls"
    await wait_for(up, lambda reqs: reqs[-1].completed)  # the fake's stream went through


async def test_fake_splits_utf8_inside_a_character() -> None:
    # What the split_utf8 quirk is for: the provider must see a cut character.
    from tests.fakes.openai_upstream import _utf8_cuts

    data = ZURICH.encode()
    pieces = _utf8_cuts(data)
    assert b"".join(pieces) == data and len(pieces) == 3
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode()


async def test_known_quirks_from_raw_streams(up: FakeOpenAI,
                                             provider: OpenAICompletionsProvider) -> None:
    up.raw_sse = [sse(
        text_delta("Hm. "),
        # a later chunk repeating id, type and name
        tool_delta({"index": 0, "id": "call_a", "type": "function",
                    "function": {"name": "f", "arguments": '{"x"'}}),
        tool_delta({"index": 0, "id": "call_a", "type": "function",
                    "function": {"name": "f", "arguments": ":1}"}}),
        # an index with a gap
        tool_delta({"index": 2, "id": "call_b", "type": "function",
                    "function": {"name": "g", "arguments": ""}}),
        tool_delta({"index": 2, "function": {"arguments": "{}"}}),
        # an index reused for another call (ids and names tell them apart)
        tool_delta({"index": 2, "id": "call_c", "type": "function",
                    "function": {"name": "h", "arguments": {"y": [2]}}}),
        # noise some servers send on text deltas
        {"choices": [{"index": 0, "delta": {"content": "", "tool_calls": None},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": []}, "finish_reason": None}]},
        finish_chunk("stop"),
    ), "data: [DONE]\n\n"]
    items = await stream_items(provider, tool_request())
    text, calls, finish = assemble(items)
    assert text == "Hm. "
    assert calls == [ToolCall(id="call_a", name="f", arguments='{"x":1}'),
                     ToolCall(id="call_b", name="g", arguments="{}"),
                     ToolCall(id="call_c", name="h", arguments='{"y":[2]}')]
    assert finish.reason == "tool_calls"  # "stop" while calls were made


@pytest.mark.parametrize(("reason", "expected"), [
    ("tool_calls", "tool_calls"), ("stop", "tool_calls"), ("length", "length"),
    ("function_call", "tool_calls"),
])
async def test_finish_reason_with_calls(up: FakeOpenAI, provider: OpenAICompletionsProvider,
                                        reason: str, expected: str) -> None:
    up.raw_sse = [sse(tool_delta({"index": 0, "id": "call_a", "type": "function",
                                  "function": {"name": "f", "arguments": "{}"}}),
                      finish_chunk(reason)), "data: [DONE]\n\n"]
    _, calls, finish = assemble(await stream_items(provider, tool_request()))
    assert len(calls) == 1
    assert finish.reason == expected


async def test_tool_calls_finish_without_calls_is_stop(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.raw_sse = [sse(text_delta("no call after all"), finish_chunk("tool_calls")),
                  "data: [DONE]\n\n"]
    _, finish = await collect(provider, tool_request())
    assert finish.reason == "stop"


async def test_text_and_calls_keep_the_upstreams_order(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.raw_sse = [sse(
        text_delta("A"),
        tool_delta({"id": "call_x", "function": {"name": "f", "arguments": "{"}}),
        tool_delta({"function": {"arguments": "}"}}),
        text_delta("B"),
        tool_delta({"id": "call_y", "function": {"name": "g", "arguments": "{}"}}),
        text_delta("C", finish="tool_calls"),
    ), "data: [DONE]\n\n"]
    items = await stream_items(provider, tool_request())
    text, calls, _ = assemble(items)
    assert text == "ABC"
    assert [(c.id, c.arguments) for c in calls] == [("call_x", "{}"), ("call_y", "{}")]
    assert kinds(items) == ["text", "call 0", "text", "call 1", "text"]


def test_fragments_of_one_read_are_joined() -> None:
    state = _StreamState()
    batch = [f"data: {orjson.dumps(c).decode()}".encode() for c in (
        text_delta("Let me "), text_delta("see."),
        tool_delta({"index": 5, "type": "function", "function": {"name": "f", "arguments": ""}}),
        tool_delta({"index": 5, "function": {"arguments": '{"a":'}}),
        tool_delta({"index": 5, "function": {"arguments": '"b"}'}},
                   {"index": 6, "id": "call_g", "function": {"name": "g", "arguments": "["}}),
        tool_delta({"index": 6, "function": {"arguments": "]"}}),
        text_delta(" Done."),
    )]
    text, failure = _parse_batch(batch, state)
    assert failure is None
    assert text == " Done."  # the text after the calls, yielded after them
    first, call_f, call_g = state.items
    assert first == TextDelta("Let me see.")
    assert isinstance(call_f, ToolCallChunk) and GENERATED_ID.fullmatch(call_f.id or "")
    assert call_f == ToolCallChunk(index=0, id=call_f.id, name="f", arguments='{"a":"b"}')
    assert call_g == ToolCallChunk(index=1, id="call_g", name="g", arguments="[]")
    # the next read continues the calls by their upstream index
    state.items.clear()
    _parse_batch([b"data: " + orjson.dumps(tool_delta({"index": 6, "function": {
        "arguments": "x"}}))], state)
    assert state.items == [ToolCallChunk(index=1, arguments="x")]


def test_fake_answers_tool_calls_in_plain_json() -> None:
    with FakeOpenAI() as up, httpx.Client(base_url=up.base_url) as client:
        up.reply = lambda body: FakeReply(tool_calls=[("get_time", "{}")])
        reply = client.post("/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "time?"}]})
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function"
        assert call["function"] == {"name": "get_time", "arguments": "{}"}
        assert GENERATED_ID.fullmatch(call["id"])


# --------------------------------------------------------------------------- embeddings


async def test_embed_asks_for_base64_and_decodes_it(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    vectors, tokens = await provider.embed("emb-model", ["hello world", "again"], None)
    assert vectors == [fake_vector("emb-model", "hello world", 32),
                       fake_vector("emb-model", "again", 32)]
    assert tokens == 3
    (rec,) = up.requests
    assert (rec.method, rec.path) == ("POST", "/v1/embeddings")
    assert rec.body == {"model": "emb-model", "input": ["hello world", "again"],
                        "encoding_format": "base64"}
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.headers["content-type"] == "application/json"


async def test_embed_forwards_dimensions(up: FakeOpenAI,
                                         provider: OpenAICompletionsProvider) -> None:
    (vector,), _ = await provider.embed("m", ["x"], 5)
    assert vector == fake_vector("m", "x", 5)
    assert up.requests[-1].body["dimensions"] == 5


async def test_embed_reuses_the_chat_connection(up: FakeOpenAI,
                                                provider: OpenAICompletionsProvider) -> None:
    await collect(provider, request())
    await provider.embed("m", ["x"], None)
    await collect(provider, request())
    assert {r.connection for r in up.requests} == {up.requests[0].connection}


@pytest.mark.parametrize(("status", "kind"), [(401, "auth"), (403, "auth"),
                                              (429, "rate_limit"), (500, "failed"),
                                              (503, "failed")])
async def test_embed_errors_map_like_chat(up: FakeOpenAI, provider: OpenAICompletionsProvider,
                                          status: int, kind: str) -> None:
    up.fail_status = status
    with pytest.raises(ProviderError) as info:
        await provider.embed("m", ["x"], None)
    assert (info.value.kind, info.value.status) == (kind, status)
    assert f"upstream returned HTTP {status}" in info.value.message
    if status == 429:
        assert info.value.retry_after == 1.0


async def test_embed_unreachable_and_timeout(up: FakeOpenAI) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    up.stall = True
    for base_url, kind in ((f"http://127.0.0.1:{port}/v1", "unreachable"),
                           (up.base_url, "timeout")):
        p = make(base_url, timeout=0.2)
        try:
            with pytest.raises(ProviderError) as info:
                await p.embed("m", ["x"], None)
        finally:
            await p.aclose()
        assert info.value.kind == kind
    await wait_for(up, last_disconnected)


async def test_embed_cancellation_disconnects_upstream(
        up: FakeOpenAI, provider: OpenAICompletionsProvider) -> None:
    up.embedding_delay = 10.0
    task = asyncio.create_task(provider.embed("m", ["x"], None))
    await wait_for(up, bool)  # the request arrived
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(up, last_disconnected)


async def test_embed_reply_too_large_is_bad_response(
        up: FakeOpenAI, provider: OpenAICompletionsProvider,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_completions, "MAX_EMBEDDINGS_BYTES", 1000)
    with pytest.raises(ProviderError) as info:
        await provider.embed("m", ["x"] * 20, None)
    assert info.value.kind == "bad_response"
    assert "larger than 1000 bytes" in info.value.message


def test_embeddings_reply_parsing() -> None:
    packed = base64.b64encode(struct.pack("<2f", 0.5, -0.25)).decode()
    reply = {"data": [{"index": 1, "embedding": [1, 2.5]},
                      {"index": 0, "embedding": packed}],
             "usage": {"prompt_tokens": 7}}
    assert _embeddings(orjson.dumps(reply), 2) == ([[0.5, -0.25], [1.0, 2.5]], 7)
    # no index: in order; no usage: 0 tokens
    assert _embeddings(orjson.dumps({"data": [{"embedding": [3]}]}), 1) == ([[3.0]], 0)


@pytest.mark.parametrize(("body", "problem"), [
    (b"not json", "no `data` list"),
    (b'{"data": {}}', "no `data` list"),
    (b'{"data": [{"embedding": [1]}]}', "1 embeddings for 2 inputs"),
    (b'{"data": [{"index": 0, "embedding": [1]}, {"index": 0, "embedding": [2]}]}',
     "embedding 1 has a bad or repeated `index`"),
    (b'{"data": [{"index": 5, "embedding": [1]}, {"embedding": [2]}]}',
     "embedding 0 has a bad or repeated `index`"),
    (b'{"data": [{"embedding": [1]}, {"embedding": ["a"]}]}', "embedding 1 is not a vector"),
    (b'{"data": [{"embedding": [1]}, {"embedding": "abc"}]}', "embedding 1 is not a vector"),
    (b'{"data": [{"embedding": [1]}, {"embedding": null}]}', "embedding 1 is not a vector"),
    (b'{"data": [{"embedding": [1]}, 7]}', "embedding 1 has a bad or repeated `index`"),
])
def test_bad_embeddings_replies(body: bytes, problem: str) -> None:
    with pytest.raises(ProviderError) as info:
        _embeddings(body, 2)
    assert info.value.kind == "bad_response"
    assert problem in info.value.message


async def test_every_provider_embeds_or_says_why() -> None:
    echo = make_provider(ProviderConfig(api="echo"), None)
    claude = make_provider(ProviderConfig(api="anthropic-messages"), "k")
    chat = make_provider(ProviderConfig(api="openai-completions"), "k")
    try:
        for provider in (echo, claude, chat):
            assert isinstance(provider, Embedder)
        assert isinstance(claude, Embedder)
        with pytest.raises(ProviderError) as info:
            await claude.embed("claude-x", ["x"], None)
        assert (info.value.kind, info.value.message) == (
            "failed", "anthropic-messages has no embeddings API")
    finally:
        await claude.aclose()
        await chat.aclose()
