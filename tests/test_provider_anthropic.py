"""The ``anthropic-messages`` provider against a real-HTTP fake Anthropic upstream."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from bus.messages import SamplingParams, Usage
from clawbus.config import ProviderConfig
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.http_upstream import RequestRecord
from workers.providers import ANTHROPIC_DEFAULT_BASE_URL, make_provider
from workers.providers.anthropic_messages import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    AnthropicMessagesProvider,
)
from workers.providers.base import (
    ChatMessage,
    Finish,
    ProviderError,
    ProviderRequest,
    TextDelta,
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


async def collect(provider: AnthropicMessagesProvider,
                  req: ProviderRequest) -> tuple[list[str], Finish]:
    deltas: list[str] = []
    finish: Finish | None = None
    async with contextlib.aclosing(provider.stream(req)) as items:
        async for item in items:
            assert finish is None, "nothing may follow Finish"
            if isinstance(item, TextDelta):
                deltas.append(item.text)
            else:
                finish = item
    assert finish is not None
    return deltas, finish


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
