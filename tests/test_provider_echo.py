"""The offline ``echo`` provider: echoes, tool calls on request, tool results, images,
embeddings."""

from __future__ import annotations

import math
import re

import pytest

from bus.messages import SamplingParams, Usage
from tests.test_provider_openai import CLOCK, WEATHER, assemble, collect, image, stream_items
from workers.providers.base import (
    ChatMessage,
    Finish,
    ProviderError,
    ProviderRequest,
    ToolCall,
    ToolChoice,
    ToolSpec,
)
from workers.providers.echo import (
    EMBED_DIMENSIONS,
    MAX_EMBED_DIMENSIONS,
    EchoProvider,
    echo_vector,
)

ECHO = EchoProvider()


def request(*messages: ChatMessage, tools: tuple[ToolSpec, ...] = (WEATHER, CLOCK),
            choice: ToolChoice | None = None, max_tokens: int | None = None,
            system: str = "") -> ProviderRequest:
    return ProviderRequest(model="echo", system=system, messages=messages, tools=tools,
                           tool_choice=choice, params=SamplingParams(max_tokens=max_tokens))


async def test_echoes_the_last_message_word_by_word() -> None:
    deltas, finish = await collect(ECHO, request(
        ChatMessage("user", "one"), ChatMessage("assistant", "two three"),
        ChatMessage("user", "hello big  world"), system="be brief"))
    assert deltas == ["hello ", "big  ", "world"]
    assert finish == Finish(reason="stop", usage=Usage(prompt_tokens=8, completion_tokens=3))


async def test_max_tokens_cuts_with_length() -> None:
    deltas, finish = await collect(ECHO, request(ChatMessage("user", "a b c d"), max_tokens=2))
    assert deltas == ["a ", "b "]
    assert finish.reason == "length"


@pytest.mark.parametrize(("text", "arguments"), [
    ('call get_weather {"city": "Zürich ☃"}', '{"city":"Zürich ☃"}'),
    ('  call   get_weather\n{\n  "city": "Paris",\n  "days": [1, 2]\n}\n',
     '{"city":"Paris","days":[1,2]}'),
    ("call get_time {}", "{}"),
])
async def test_call_syntax_makes_a_tool_call(text: str, arguments: str) -> None:
    items = await stream_items(ECHO, request(ChatMessage("user", text)))
    reply, calls, finish = assemble(items)
    assert reply == ""
    (call,) = calls
    assert (call.name, call.arguments) == (text.split()[1], arguments)
    assert re.fullmatch(r"call_[0-9a-f]{12}", call.id)
    assert finish.reason == "tool_calls"
    assert len(items) == 2  # the whole call in one piece, then Finish


async def test_call_ids_are_deterministic() -> None:
    async def call_id(*messages: ChatMessage) -> str:
        _, calls, _ = assemble(await stream_items(ECHO, request(*messages)))
        return calls[0].id

    ask = ChatMessage("user", 'call get_weather {"city":"Oslo"}')
    first = await call_id(ask)
    assert await call_id(ask) == first
    assert await call_id(ChatMessage("user", 'call get_weather {"city":"Rome"}')) != first
    assert await call_id(ChatMessage("user", "hi"), ChatMessage("assistant", "hi"),
                         ask) != first


@pytest.mark.parametrize(("text", "tools", "choice"), [
    ('call get_stock {"sym": "X"}', (WEATHER, CLOCK), None),  # not one of the tools
    ('call get_weather {"city": "Oslo"}', (), None),  # no tools at all
    ('call get_weather {"city": "Oslo"}', (WEATHER,), ToolChoice(mode="none")),
    ('call get_weather {"city": ', (WEATHER,), None),  # not JSON
    ("call get_weather [1, 2]", (WEATHER,), None),  # not an object
    ('please call get_weather {"city": "Oslo"}', (WEATHER,), None),  # text before it
    ("call get_weather", (WEATHER,), None),
])
async def test_other_texts_are_echoed(text: str, tools: tuple[ToolSpec, ...],
                                      choice: ToolChoice | None) -> None:
    items = await stream_items(ECHO, request(ChatMessage("user", text), tools=tools,
                                             choice=choice))
    reply, calls, finish = assemble(items)
    assert (reply, calls, finish.reason) == (text, [], "stop")


async def test_tool_results_are_reported() -> None:
    deltas, finish = await collect(ECHO, request(
        ChatMessage("user", "weather and time?"),
        ChatMessage("assistant", "", tool_calls=(
            ToolCall(id="call_1", name="get_weather", arguments="{}"),
            ToolCall(id="call_2", name="get_time", arguments="{}"))),
        ChatMessage("tool", "Sunny, 21 C", tool_call_id="call_1", name="get_weather"),
        ChatMessage("tool", "12:00", tool_call_id="call_2"),
    ))
    assert "".join(deltas) == "Tool results: get_weather: Sunny, 21 C; call_2: 12:00"
    assert len(deltas) == 8  # word by word
    assert finish.reason == "stop"


async def test_images_are_counted() -> None:
    deltas, _ = await collect(ECHO, request(ChatMessage("user", "look", images=(
        image(), image()))))
    assert "".join(deltas) == "look [2 images]"
    deltas, _ = await collect(ECHO, request(ChatMessage("user", "", images=(image(),))))
    assert "".join(deltas) == "[1 image]"


# --------------------------------------------------------------------------- embeddings


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    vectors, tokens = await ECHO.embed("echo", ["hello world", "hello world", "other"], None)
    again, _ = await EchoProvider().embed("any-model", ["other"], None)
    assert tokens == 2 + 2 + 1
    assert all(len(vector) == EMBED_DIMENSIONS == 64 for vector in vectors)
    assert vectors[0] == vectors[1] != vectors[2]
    assert again == [vectors[2]]  # the same in any process, whatever the model name
    for vector in vectors:
        assert math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-12)
        assert all(-1.0 <= x <= 1.0 for x in vector)
    assert vectors == [echo_vector("hello world", 64)] * 2 + [echo_vector("other", 64)]


async def test_embedding_dimensions() -> None:
    (small,), _ = await ECHO.embed("echo", ["x"], 3)
    (large,), _ = await ECHO.embed("echo", ["x"], MAX_EMBED_DIMENSIONS)
    assert len(small) == 3 and len(large) == MAX_EMBED_DIMENSIONS
    assert math.isclose(math.hypot(*small), 1.0, rel_tol=1e-12)
    for size in (0, MAX_EMBED_DIMENSIONS + 1):
        with pytest.raises(ProviderError) as info:
            await ECHO.embed("echo", ["x"], size)
        assert info.value.kind == "failed"
        assert f"1 to {MAX_EMBED_DIMENSIONS} dimensions" in info.value.message
