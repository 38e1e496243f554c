"""End to end: the official ``openai`` SDK → clawbus gateway processes → NATS →
worker processes → a fake OpenAI upstream (all real processes and sockets)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI, RequestRecord
from tests.helpers import TOKEN, Stack
from tests.schemas import validate


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30)


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30)


def marker() -> str:
    return uuid.uuid4().hex[:10]


def records_with(up: FakeOpenAI, text: str) -> list[RequestRecord]:
    return [r for r in up.requests if text in orjson.dumps(r.body).decode()]


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (comments skipped)."""
    out = []
    for frame in body.split("\n\n"):
        for line in frame.splitlines():
            if line.startswith("data: "):
                out.append(line[6:])
    return out


def test_sync_non_streaming(stack: Stack) -> None:
    tag = marker()
    with client(stack.url) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="openclaw", messages=[{"role": "user", "content": f"hello {tag}"}])
    completion = raw.parse()
    validate("chat_completion", orjson.loads(raw.content))
    assert raw.headers["x-content-type-options"] == "nosniff"
    assert raw.headers["referrer-policy"] == "no-referrer"
    assert completion.id.startswith("chatcmpl_")
    assert completion.model == "openclaw"
    assert completion.choices[0].message.content == f"echo: hello {tag}"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    (rec,) = records_with(stack.upstream, tag)
    assert rec.headers["authorization"] == "Bearer sk-upstream"
    assert rec.body["messages"][0] == {"role": "system", "content": "You are main."}
    assert rec.body["model"] == "gpt-test"


def test_sync_streaming_framing(stack: Stack) -> None:
    tag = marker()
    stack.upstream.token_delay = 0.01
    with client(stack.url) as c:
        chunks = list(c.chat.completions.create(
            model="openclaw/beta", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"one two three four {tag}"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({(ch.id, ch.created) for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == f"echo: one two three four {tag}"
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    (rec,) = records_with(stack.upstream, tag)
    assert rec.body["messages"][0]["content"] == "You are beta."


def test_raw_sse_wire_format(stack: Stack) -> None:
    """Headers, frame order and ``[DONE]`` exactly as SPEC §2 says, every chunk
    valid under OpenAI's strict schema."""
    body = {"model": "openclaw", "stream": True,
            "messages": [{"role": "user", "content": "alpha beta"}]}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{stack.url}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        text = "".join(resp.iter_text())
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate("chat_completion_chunk", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}
    assert all("usage" not in ch for ch in chunks)


def test_finish_reason_length(stack: Stack) -> None:
    with client(stack.url) as c:
        completion = c.chat.completions.create(
            model="openclaw", max_tokens=2,
            messages=[{"role": "user", "content": "one two three four five"}])
    assert completion.choices[0].finish_reason == "length"
    assert (completion.choices[0].message.content or "").strip() == "echo: one"


def test_sampling_params_forwarded(stack: Stack) -> None:
    tag = marker()
    with client(stack.url) as c:
        c.chat.completions.create(
            model="openclaw", temperature=0.5, top_p=0.9, frequency_penalty=1,
            presence_penalty=-1, seed=7, stop=["zz"], max_completion_tokens=50,
            messages=[{"role": "user", "content": tag}])
    (rec,) = records_with(stack.upstream, tag)
    assert {k: rec.body.get(k) for k in ("temperature", "top_p", "frequency_penalty",
                                          "presence_penalty", "seed", "stop", "max_tokens")} \
        == {"temperature": 0.5, "top_p": 0.9, "frequency_penalty": 1, "presence_penalty": -1,
            "seed": 7, "stop": ["zz"], "max_tokens": 50}


async def test_async_sdk_stream_and_not(stack: Stack) -> None:
    async with aclient(stack.gateways[1].url) as c:
        full = await c.chat.completions.create(
            model="openclaw", messages=[{"role": "user", "content": "async hi"}])
        stream = await c.chat.completions.create(
            model="openclaw", stream=True, messages=[{"role": "user", "content": "async yo"}])
        parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
    assert full.choices[0].message.content == "echo: async hi"
    assert "".join(parts) == "echo: async yo"


def test_stateless_by_default(stack: Stack) -> None:
    a, b = marker(), marker()
    with client(stack.url) as c:
        c.chat.completions.create(model="openclaw", messages=[{"role": "user", "content": a}])
        c.chat.completions.create(model="openclaw", messages=[{"role": "user", "content": b}])
    (rec,) = records_with(stack.upstream, b)
    assert a not in orjson.dumps(rec.body).decode()
    assert len(rec.body["messages"]) == 2  # system + the current message only


@pytest.mark.parametrize("via", ["user", "header"])
def test_session_continuity_across_gateways(stack: Stack, via: str) -> None:
    """Turn 1 through gateway 0, turn 2 through gateway 1: the agent sees turn 1."""
    a, b = marker(), marker()
    user = f"User-{marker()}"
    kwargs: dict[str, Any] = (
        {"user": user} if via == "user"
        else {"extra_headers": {"x-openclaw-session-key": f"custom:{marker()}"}})
    with client(stack.gateways[0].url) as c0, client(stack.gateways[1].url) as c1:
        c0.chat.completions.create(model="openclaw",
                                   messages=[{"role": "user", "content": a}], **kwargs)
        c1.chat.completions.create(model="openclaw",
                                   messages=[{"role": "user", "content": b}], **kwargs)
    (rec,) = records_with(stack.upstream, b)
    assert rec.body["messages"][1:] == [
        {"role": "user", "content": a},
        {"role": "assistant", "content": f"echo: {a}"},
        {"role": "user", "content": b},
    ]


def test_flattened_history_and_system_messages(stack: Stack) -> None:
    tag = marker()
    with client(stack.url) as c:
        c.chat.completions.create(model="openclaw", messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello, who are you?"},
            {"role": "assistant", "content": "I am Claude."},
            {"role": "user", "content": f"What did I just ask you? {tag}"},
        ])
    (rec,) = records_with(stack.upstream, tag)
    assert rec.body["messages"][0]["content"] == "You are main.\n\nBe brief."
    assert rec.body["messages"][1]["content"] == (
        "[Chat messages since your last reply - for context]\n"
        "User: Hello, who are you?\nAssistant: I am Claude.\n\n"
        "[Current message - respond to this]\n"
        f"User: What did I just ask you? {tag}")


def test_client_disconnect_cancels_upstream(stack: Stack) -> None:
    tag = marker()
    stack.upstream.token_delay = 0.2
    body = {"model": "openclaw", "stream": True, "messages": [
        {"role": "user", "content": f"{tag} " + " ".join(["word"] * 100)}]}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{stack.url}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        seen = ""
        for piece in resp.iter_text():
            seen += piece
            if "echo:" in seen:
                break
    # The client is gone: the upstream request must be cut within a second.
    stack.upstream.wait_for(
        lambda recs: any(tag in orjson.dumps(r.body).decode() and r.disconnected
                         for r in recs), timeout=1.0)


def test_non_streaming_disconnect_cancels_upstream(stack: Stack) -> None:
    tag = marker()
    stack.upstream.token_delay = 0.2
    body = {"model": "openclaw", "messages": [
        {"role": "user", "content": f"{tag} " + " ".join(["word"] * 100)}]}

    async def send_and_leave() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            request = asyncio.create_task(http.post(
                f"{stack.url}/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {TOKEN}"}))
            await asyncio.to_thread(stack.upstream.wait_for,
                                    lambda recs: any(tag in orjson.dumps(r.body).decode()
                                                     for r in recs), 10.0)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(send_and_leave())
    stack.upstream.wait_for(
        lambda recs: any(tag in orjson.dumps(r.body).decode() and r.disconnected
                         for r in recs), timeout=1.0)


def test_session_ordering_invariant(stack: Stack) -> None:
    """Many sessions × several runs, sent concurrently through two gateways to three
    workers: no two runs of a session overlap upstream, and each session's runs
    run in the order they were accepted."""
    stack.upstream.token_delay = 0.005
    sessions, runs_per_session = 12, 4
    prefix = marker()

    async def one_session(s: int) -> None:
        key = f"order:{prefix}:{s}"
        pending = []
        async with httpx.AsyncClient(timeout=60) as http:
            for r in range(runs_per_session):
                url = stack.gateways[(s + r) % 2].url
                body = {"model": "openclaw", "stream": True, "messages": [
                    {"role": "user", "content": f"{prefix} s{s} r{r} a b c d e"}]}
                resp = await http.send(http.build_request(
                    "POST", f"{url}/v1/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {TOKEN}",
                             "x-openclaw-session-key": key}), stream=True)
                lines = resp.aiter_lines()
                # The role chunk arrives once the run is on the bus: r is accepted
                # before r+1 is sent.
                first = await anext(lines)
                assert first.startswith("data: ")
                pending.append((resp, lines))
            for resp, lines in pending:
                rest = [line async for line in lines]
                await resp.aclose()
                assert "data: [DONE]" in rest
                assert not any('"error"' in line for line in rest), rest

    async def all_sessions() -> None:
        await asyncio.gather(*(one_session(s) for s in range(sessions)))

    asyncio.run(all_sessions())
    for s in range(sessions):
        recs = sorted((r for r in records_with(stack.upstream, f"{prefix} s{s} ")
                       if r.body["messages"][-1]["content"].startswith(prefix)),
                      key=lambda r: r.started)
        order = [r.body["messages"][-1]["content"].split()[2] for r in recs]
        assert order == [f"r{r}" for r in range(runs_per_session)], order
        for earlier, later in itertools.pairwise(recs):
            assert earlier.ended is not None and earlier.ended <= later.started
        # Each run saw every earlier turn of its session.
        assert len(recs[-1].body["messages"]) == 1 + 2 * (runs_per_session - 1) + 1


def test_keepalive_comments_while_agent_is_silent(stack: Stack) -> None:
    """The stack's gateways send ``: keep-alive`` after 0.3 s of silence."""
    stack.upstream.token_delay = 1.0
    body = {"model": "openclaw", "stream": True,
            "messages": [{"role": "user", "content": "slow"}]}
    with httpx.Client(timeout=30) as http:
        resp = http.post(f"{stack.url}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert ": keep-alive\n\n" in resp.text
    assert sse_events(resp.text)[-1] == "[DONE]"


def test_cancelled_run_leaves_no_half_turn(stack: Stack) -> None:
    key = f"halfturn:{marker()}"
    first, second = marker(), marker()
    stack.upstream.token_delay = 0.05
    body = {"model": "openclaw", "stream": True, "messages": [
        {"role": "user", "content": f"{first} " + " ".join(["word"] * 60)}]}
    headers = {"Authorization": f"Bearer {TOKEN}", "x-openclaw-session-key": key}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{stack.url}/v1/chat/completions", json=body, headers=headers) as resp:
        for line in resp.iter_lines():
            if "word" in line:
                break  # leave mid-reply
    stack.upstream.wait_for(lambda recs: any(
        first in orjson.dumps(r.body).decode() and r.disconnected for r in recs), timeout=5)
    stack.upstream.token_delay = 0.0
    with client(stack.gateways[1].url) as c:
        c.chat.completions.create(model="openclaw", extra_headers={"x-openclaw-session-key": key},
                                  messages=[{"role": "user", "content": second}])
    (rec,) = records_with(stack.upstream, second)
    assert first not in orjson.dumps(rec.body).decode()
