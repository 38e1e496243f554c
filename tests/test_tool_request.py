"""Client tools in a chat request (SPEC §7), validated without any bus: every
error row of ``tools``/``tool_choice``/``parallel_tool_calls``, the structured
conversation (stateless: all of it; session: what follows the last assistant
message), and where tool parsing sits in the check order."""

from __future__ import annotations

from typing import Any

import pytest

from bus.messages import ChatItem, ToolCall, ToolChoice
from clawbus.config import Settings, parse_settings
from gateway.chat_request import parse_chat_request
from gateway.conversation import read_conversation
from gateway.errors import ApiError

TOOL: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
USER = {"role": "user", "content": "weather?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                  "arguments": '{"city":"Oslo"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return parse_settings({}, env={})


def parse(body: dict[str, Any], settings: Settings, **headers: str) -> Any:
    return parse_chat_request({"messages": [USER], **body}, headers, settings)


def error(body: dict[str, Any], settings: Settings, **headers: str) -> str:
    with pytest.raises(ApiError) as info:
        parse(body, settings, **headers)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value.message


@pytest.mark.parametrize(("body", "message"), [
    ({"tools": {}}, "`tools` must be an array."),
    ({"tools": ["x"]}, "`tools[0]` must be a function tool"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]},
     "`tools[0]` must be a function tool"),
    ({"tools": [{"type": "function"}]}, "`tools[0]` must be a function tool"),
    ({"tools": [{"type": "function", "function": {}}]},
     "`tools[0].function.name` must match ^[A-Za-z0-9_-]{1,64}$."),
    ({"tools": [TOOL, {"type": "function", "function": {"name": "bad name"}}]},
     "`tools[1].function.name` must match"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
     "`tools[0].function.name` must match"),
    ({"tools": [TOOL, TOOL]}, "`tools` has a duplicate function name 'get_weather'."),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "`tools[0].function.parameters` must be an object."),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]},
     "`tools[0].function.description` must be a string."),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "`tools[0].function.strict` must be a boolean."),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "`tool_choice` must be"),
    ({"tools": [TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
     "`tool_choice` must be"),
    ({"tools": [TOOL], "tool_choice": {"type": "custom", "custom": {"name": "x"}}},
     "`tool_choice` must be"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "`tool_choice` names a function that is not in `tools`: 'other'."),
    ({"tool_choice": "required"}, '`tool_choice` "required" needs `tools`.'),
    ({"tools": [TOOL], "parallel_tool_calls": "no"}, "`parallel_tool_calls` must be a boolean."),
])
def test_tool_errors(settings: Settings, body: dict[str, Any], message: str) -> None:
    assert error(body, settings).startswith(message)


def test_tools_and_choice_parsed(settings: Settings) -> None:
    req = parse({"tools": [TOOL], "parallel_tool_calls": False,
                 "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                settings)
    (spec,) = req.tools
    assert spec.name == "get_weather" and spec.parameters == TOOL["function"]["parameters"]
    assert req.tool_choice == ToolChoice(mode="function", name="get_weather", parallel=False)
    assert parse({"tools": [TOOL], "tool_choice": "none"}, settings).tool_choice == \
        ToolChoice(mode="none")
    assert parse({}, settings).tool_choice is None


def test_tool_params_come_after_sampling_params(settings: Settings) -> None:
    assert error({"temperature": 9, "tools": {}}, settings).startswith("`temperature`")
    assert error({"tools": {}, "messages": []}, settings) == "`tools` must be an array."


def test_stateless_conversation_is_structured_whole() -> None:
    conversation = read_conversation(
        [{"role": "system", "content": "Be brief."}, USER, CALL, RESULT], stateless=True)
    assert conversation.structured and conversation.extra_system_prompt == "Be brief."
    assert conversation.input == (
        ChatItem(role="user", text="weather?"),
        ChatItem(role="assistant", tool_calls=(
            ToolCall(id="c1", name="get_weather", arguments='{"city":"Oslo"}'),)),
        ChatItem(role="tool", text="sunny", tool_call_id="c1", name="get_weather"))


def test_session_input_is_what_follows_the_last_assistant_message() -> None:
    conversation = read_conversation([USER, CALL, RESULT,
                                      {"role": "user", "content": "and tomorrow?"}],
                                     stateless=False)
    assert [(i.role, i.text) for i in conversation.input] == [("tool", "sunny"),
                                                              ("user", "and tomorrow?")]
    assert conversation.message == "and tomorrow?"
    # A session's tool results are checked by the worker against the session's
    # pending calls, not against the request's own messages.
    alone = read_conversation([RESULT], stateless=False)
    assert [i.tool_call_id for i in alone.input] == ["c1"]


def test_malformed_tool_traffic() -> None:
    with pytest.raises(ApiError, match=r"`messages\[1\].tool_calls\[0\]` must be a function"):
        read_conversation([USER, {"role": "assistant", "tool_calls": [{"id": "x"}]}, RESULT],
                          stateless=True)
    with pytest.raises(ApiError, match="`tool_call_id` 'c9' does not match a pending"):
        read_conversation([USER, CALL, {"role": "tool", "tool_call_id": "c9", "content": "x"}],
                          stateless=True)
    with pytest.raises(ApiError, match=r"`messages\[2\].tool_call_id` must be a string"):
        read_conversation([USER, CALL, {"role": "tool", "tool_call_id": " ", "content": "x"}],
                          stateless=True)


def test_object_arguments_are_encoded_and_trailing_assistant_dropped() -> None:
    call = {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}
    conversation = read_conversation(
        [USER, call, RESULT, {"role": "assistant", "content": "prefill"}], stateless=True)
    assert conversation.input[1].tool_calls[0].arguments == '{"a":1}'
    assert conversation.input[-1].role == "tool"


def test_images_of_the_new_input_only() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    conversation = read_conversation(
        [{"role": "user", "content": [{"type": "text", "text": "old"}, image]}, CALL, RESULT,
         {"role": "user", "content": [image]}], stateless=True)
    assert conversation.input[0].text == "old\n[image]"  # an earlier image: its stand-in
    (ref,) = conversation.images
    assert (ref.item, ref.where) == (3, "messages[3].content[0]")


def test_plain_image_message_is_one_item() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    conversation = read_conversation([{"role": "user", "content": [image]}], stateless=True)
    assert not conversation.structured
    assert conversation.message == "[image]"
    assert conversation.input == (ChatItem(role="user", text=""),)
    assert [r.where for r in conversation.images] == ["messages[0].content[0]"]


def test_x_openclaw_model(settings: Settings) -> None:
    assert parse({}, settings, **{"x-openclaw-model": "echo/other"}).upstream_model == \
        "echo/other"
    assert parse({}, settings, **{"x-openclaw-model": " bare "}).upstream_model == "echo/bare"
    assert parse({}, settings).upstream_model is None
    assert error({}, settings, **{"x-openclaw-model": "nope/m"}) == \
        "Unknown model provider 'nope'."
    # The agent is checked first.
    assert error({"model": "openclaw/ghost"}, settings, **{"x-openclaw-model": "nope/m"}) == \
        "Unknown agent 'ghost'."
