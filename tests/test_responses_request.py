"""Unit tests for gateway.responses_request: the SPEC §10 checks in the chat
endpoint's order, with Responses field names, and input items → the agent's input."""

from __future__ import annotations

import re
from typing import Any

import pytest

from bus.messages import ChatItem, SamplingParams, ToolCall, ToolChoice, ToolSpec
from clawbus.config import Settings, parse_settings
from gateway.errors import ApiError
from gateway.responses_format import echo_tool, echo_tool_choice
from gateway.responses_request import ResponsesRequest, parse_responses_request

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
TOOL = {"type": "function", "name": "get_weather", "description": "The weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture
def settings() -> Settings:
    return parse_settings({"agents": {"list": [{"id": "main", "default": True},
                                               {"id": "beta"}]}}, env={})


def parse(body: object, settings: Settings,
          headers: dict[str, str] | None = None) -> ResponsesRequest:
    return parse_responses_request(body, headers or {}, settings)


def message_of(body: object, settings: Settings, headers: dict[str, str] | None = None) -> str:
    with pytest.raises(ApiError) as info:
        parse(body, settings, headers)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value.message


# --- the head: the chat endpoint's rows ----------------------------------------------


def test_minimal_string_input(settings: Settings) -> None:
    req = parse({"model": "openclaw", "input": "hi"}, settings)
    chat = req.chat
    assert (chat.model, chat.agent_id, chat.message, chat.input) == ("openclaw", "main", "hi", ())
    assert re.fullmatch(rf"agent:main:openresponses:{UUID}", chat.session_key)
    assert chat.ephemeral_session and not chat.stream
    assert req.previous_response_id is None and req.instructions is None
    assert chat.params == SamplingParams()


def test_each_stateless_request_gets_a_session_of_its_own(settings: Settings) -> None:
    keys = {parse({"input": "hi"}, settings).chat.session_key for _ in range(3)}
    assert len(keys) == 3


@pytest.mark.parametrize(("body", "headers", "message"), [
    ({"model": "gpt-4o", "input": "hi"}, {},
     "Invalid `model`. Use `openclaw` or `openclaw/<agentId>`."),
    ({"model": "openclaw/nope", "input": "hi"}, {}, "Unknown agent 'nope'."),
    ({"input": "hi"}, {"x-openclaw-agent-id": "ghost"}, "Unknown agent 'ghost'."),
    ({"input": "hi"}, {"x-openclaw-model": "nowhere/m"}, "Unknown model provider 'nowhere'."),
    ({"input": "hi"}, {"x-openclaw-session-key": "cron:nightly"},
     "`x-openclaw-session-key` cannot use reserved internal session namespaces."),
    ({"input": "hi", "user": 5}, {}, "`user` must be a string."),
    ({"input": "hi", "stream": "yes"}, {}, "`stream` must be a boolean."),
    ({"input": "hi", "temperature": 3}, {}, "`temperature` must be between 0 and 2."),
    ({"input": "hi", "top_p": -1}, {}, "`top_p` must be between 0 and 1."),
    ({"input": "hi", "max_output_tokens": 0}, {},
     "`max_output_tokens` must be a positive integer."),
    ({"input": "hi", "max_output_tokens": "9"}, {},
     "`max_output_tokens` must be a positive integer."),
    ({"input": "hi", "instructions": ["x"]}, {}, "`instructions` must be a string."),
    ({"input": "hi", "previous_response_id": 7}, {}, "`previous_response_id` must be a string."),
    ({"input": "hi", "metadata": {"a": 1}}, {},
     "`metadata` must be an object of at most 16 strings."),
    ({"input": "hi", "truncation": "sometimes"}, {}, '`truncation` must be "auto" or "disabled".'),
])
def test_rows(settings: Settings, body: dict[str, Any], headers: dict[str, str],
              message: str) -> None:
    assert message_of(body, settings, headers) == message


@pytest.mark.parametrize(("body", "headers", "message"), [
    ({"model": 5, "input": 5}, {}, "Invalid `model`"),
    ({"model": "openclaw/ghost", "tools": 5}, {}, "Unknown agent"),
    ({"input": 5, "temperature": 9}, {"x-openclaw-session-key": "acp:x"}, "`x-openclaw-session"),
    ({"input": 5, "tools": 5, "temperature": 9}, {}, "`temperature`"),
    ({"input": 5, "tools": 5, "metadata": []}, {}, "`metadata`"),
    ({"input": 5, "tools": 5}, {}, "`tools`"),
    ({"input": 5, "tool_choice": "sometimes"}, {}, "`tool_choice`"),
])
def test_order(settings: Settings, body: dict[str, Any], headers: dict[str, str],
               message: str) -> None:
    """model → agent → session header → params → tools → input."""
    assert message_of(body, settings, headers).startswith(message)


def test_agent_session_and_model_header(settings: Settings) -> None:
    req = parse({"model": "openclaw/beta", "input": "hi", "user": "Ann"}, settings,
                {"x-openclaw-model": "echo/other"})
    assert req.chat.agent_id == "beta"
    assert req.chat.session_key == "agent:beta:openai-user:ann"
    assert req.chat.upstream_model == "echo/other"
    assert req.user == "Ann"
    header = parse({"input": "hi"}, settings, {"x-openclaw-session-key": "my-key"})
    assert header.chat.session_key == "my-key" and not header.chat.ephemeral_session


def test_parameters_forwarded_and_echoed(settings: Settings) -> None:
    req = parse({"input": "hi", "max_output_tokens": 40, "temperature": 0.5, "top_p": 0.9,
                 "stream": True, "metadata": {"k": "v"}, "truncation": "auto",
                 "store": False, "reasoning": {"effort": "low"}, "text": {"format": {}},
                 "parallel_tool_calls": False, "max_tool_calls": 3, "include": [],
                 "stream_options": {"include_obfuscation": False}, "background": False},
                settings)
    assert req.chat.params == SamplingParams(max_tokens=40, temperature=0.5, top_p=0.9)
    assert req.chat.stream and not req.chat.include_usage
    assert (req.metadata, req.truncation, req.parallel_tool_calls) == ({"k": "v"}, "auto", False)


# --- tools ------------------------------------------------------------------------------


def test_function_tools_and_tool_choice(settings: Settings) -> None:
    req = parse({"input": "hi", "tools": [TOOL, {"type": "function", "name": "b", "strict": True,
                                                 "parameters": None}],
                 "tool_choice": {"type": "function", "name": "b"}}, settings)
    assert req.chat.tools == (
        ToolSpec(name="get_weather", description="The weather.", parameters=TOOL["parameters"]),
        ToolSpec(name="b", strict=True))
    assert req.chat.tool_choice == ToolChoice(mode="function", name="b")
    assert echo_tool_choice(req.chat.tool_choice) == {"type": "function", "name": "b"}
    assert echo_tool(req.chat.tools[1]) == {"type": "function", "name": "b", "description": None,
                                            "parameters": None, "strict": True}


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_tool_choice_modes(settings: Settings, choice: str) -> None:
    req = parse({"input": "hi", "tools": [TOOL], "tool_choice": choice}, settings)
    assert req.chat.tool_choice == ToolChoice(mode=choice)
    assert echo_tool_choice(req.chat.tool_choice) == choice


@pytest.mark.parametrize(("tools", "choice", "message"), [
    (5, None, "`tools` must be an array."),
    ([{"type": "web_search"}], None,
     '`tools[0]` must be a function tool ({"type": "function", "name": ...}).'),
    ([TOOL, "x"], None,
     '`tools[1]` must be a function tool ({"type": "function", "name": ...}).'),
    ([{"type": "function", "function": {"name": "chat_shape"}}], None,
     "`tools[0].name` must match ^[A-Za-z0-9_-]{1,64}$."),
    ([{"type": "function", "name": "has space"}], None,
     "`tools[0].name` must match ^[A-Za-z0-9_-]{1,64}$."),
    ([TOOL, TOOL], None, "`tools` has a duplicate function name 'get_weather'."),
    ([{**TOOL, "parameters": []}], None, "`tools[0].parameters` must be an object."),
    ([{**TOOL, "strict": "yes"}], None, "`tools[0].strict` must be a boolean."),
    ([{**TOOL, "description": 1}], None, "`tools[0].description` must be a string."),
    ([TOOL], {"type": "allowed_tools", "tools": []},
     '`tool_choice` must be "auto", "none", "required" or {"type": "function", "name": ...}.'),
    ([TOOL], {"type": "function", "function": {"name": "get_weather"}},
     '`tool_choice` must be "auto", "none", "required" or {"type": "function", "name": ...}.'),
    ([TOOL], {"type": "function", "name": "other"},
     "`tool_choice` names a function that is not in `tools`: 'other'."),
    (None, "required", '`tool_choice` "required" needs `tools`.'),
])
def test_bad_tool_shapes(settings: Settings, tools: object, choice: object,
                         message: str) -> None:
    assert message_of({"input": "hi", "tools": tools, "tool_choice": choice}, settings) == message


def test_parallel_tool_calls_must_be_boolean(settings: Settings) -> None:
    assert message_of({"input": "hi", "parallel_tool_calls": "no"}, settings) == \
        "`parallel_tool_calls` must be a boolean."


# --- input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("input_", "message"), [
    (None, "Missing user message in `input`."),
    ("", "Missing user message in `input`."),
    ([], "Missing user message in `input`."),
    ([{"role": "assistant", "content": "hi"}], "Missing user message in `input`."),
    ([{"type": "reasoning", "summary": []}], "Missing user message in `input`."),
    (5, "`input` must be a string or an array of input items."),
    (["hi"], "`input[0]` must be an object."),
    ([{"role": "tool", "content": "x"}],
     "`input[0].role` must be one of system, developer, user, assistant."),
    ([{"role": "user", "content": 5}], "`input[0].content` must be a string or an array of parts."),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
     "`input[0].content[0]` has an unsupported type 'input_file'."),
    ([{"role": "user", "content": [{"type": "input_text", "text": 5}]}],
     "`input[0].content[0].text` must be a string."),
    ([{"type": "web_search_call", "id": "x"}],
     "`input[0]` has an unsupported type 'web_search_call'."),
    ([{"role": "user", "content": "q"}, {"type": "function_call", "name": "f", "arguments": "{}"}],
     "`input[1]`: a function_call needs a `call_id`, a `name` and `arguments` (a string)."),
    ([{"type": "function_call_output", "call_id": "c", "output": 5}],
     "`input[0]`: a function_call_output needs a `call_id` and an `output`."),
    ([{"role": "user", "content": "q"},
      {"type": "function_call_output", "call_id": "call_x", "output": "r"}],
     "`tool_call_id` 'call_x' does not match a pending tool call."),
])
def test_bad_input(settings: Settings, input_: object, message: str) -> None:
    assert message_of({"input": input_}, settings) == message


def test_message_items_and_instructions(settings: Settings) -> None:
    req = parse({"instructions": "Be brief.", "input": [
        {"type": "message", "role": "developer", "content": "Use metric units."},
        {"role": "system", "content": [{"type": "input_text", "text": "No emoji."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "item_reference", "id": "msg_1"},
        {"role": "user", "content": "And now?"},
    ]}, settings)
    assert req.instructions == "Be brief."
    assert req.chat.extra_system_prompt == "Be brief.\n\nUse metric units.\n\nNo emoji."
    # Plain text: folded like a chat completion's conversation.
    assert req.chat.message == ("[Chat messages since your last reply - for context]\n"
                                "User: Hello\nAssistant: Hi!\n\n"
                                "[Current message - respond to this]\nUser: And now?")


def test_function_call_round_trip_stateless(settings: Settings) -> None:
    req = parse({"tools": [TOOL], "input": [
        {"role": "user", "content": "weather in Oslo and Rome"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Oslo"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather",
         "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ]}, settings)
    assert req.chat.input == (
        ChatItem(role="user", text="weather in Oslo and Rome"),
        ChatItem(role="assistant", text="Let me check.", tool_calls=(
            ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}'),
            ToolCall(id="call_2", name="get_weather", arguments='{"city":"Rome"}'))),
        ChatItem(role="tool", text="sunny", tool_call_id="call_1", name="get_weather"),
        ChatItem(role="tool", text="rain", tool_call_id="call_2", name="get_weather"),
    )


def test_previous_response_reads_the_input_as_a_session_does(settings: Settings) -> None:
    """Only what follows the last assistant item is new (the transcript has the rest),
    and tool results are checked against the session's pending calls by the worker."""
    req = parse({"previous_response_id": "resp_1", "input": [
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "done"},
        {"type": "function_call_output", "call_id": "call_from_before", "output": "ok"},
    ]}, settings)
    assert req.previous_response_id == "resp_1"
    assert req.chat.input == (
        ChatItem(role="tool", text="done", tool_call_id="call_1", name="f"),
        ChatItem(role="tool", text="ok", tool_call_id="call_from_before"))


def test_images_are_named_by_their_input_item(settings: Settings) -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
             "detail": "low"}
    req = parse({"input": [
        {"type": "reasoning", "summary": []},
        {"role": "user", "content": [{"type": "input_text", "text": "What is it?"}, image]},
    ]}, settings)
    (ref,) = req.chat.images
    assert ref.where == "input[1].content[1]" and ref.part == image and ref.item == 0
    assert req.chat.input == (ChatItem(role="user", text="What is it?"),)
