"""The ``openai-completions`` provider against a real-HTTP fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from bus.messages import SamplingParams, Usage
from clawbus.config import ProviderConfig
from tests.fakes.openai_upstream import FakeOpenAI, RequestRecord
from workers.providers import OPENAI_DEFAULT_BASE_URL, make_provider
from workers.providers.base import (
    ChatMessage,
    Finish,
    ProviderError,
    ProviderRequest,
    TextDelta,
)
from workers.providers.echo import EchoProvider
from workers.providers.openai_completions import OpenAICompletionsProvider

KEY = "sk-test-key"


def request(text: str = "hello big world", *, system: str = "",
            params: SamplingParams | None = None) -> ProviderRequest:
    return ProviderRequest(model="gpt-test", system=system,
                           messages=(ChatMessage("user", text),),
                           params=params or SamplingParams())


def make(base_url: str, *, api_key: str | None = KEY, timeout: float = 10.0,
         headers: dict[str, str] | None = None) -> OpenAICompletionsProvider:
    return OpenAICompletionsProvider(base_url, api_key, headers or {}, timeout, 5.0)


async def collect(provider: OpenAICompletionsProvider,
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
