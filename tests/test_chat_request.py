"""Unit tests for gateway.chat_request: SPEC §2 validation order, routing, params, flattening."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bus.messages import SamplingParams
from clawbus.config import Settings, parse_settings
from gateway.chat_request import ChatRequest, parse_chat_request
from gateway.conversation import read_conversation
from gateway.errors import ApiError

SCHEMA_PATH = Path("/work/shared/openai-schemas/error_response.strict.json")
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"

INVALID_MODEL = "Invalid `model`. Use `openclaw` or `openclaw/<agentId>`."
RESERVED = "`x-openclaw-session-key` cannot use reserved internal session namespaces."
MISSING = "Missing user message in `messages`."

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def settings() -> Settings:
    return parse_settings(
        {"agents": {"list": [{"id": "main"}, {"id": "beta", "default": True}, {"id": "ops-2"}]}},
        env={},
    )


def parse(
    body: object, settings: Settings, headers: dict[str, str] | None = None
) -> ChatRequest:
    return parse_chat_request(body, headers or {}, settings)


def error_of(body: object, settings: Settings, headers: dict[str, str] | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, settings, headers)
    err = info.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    return err


def message_of(body: object, settings: Settings, headers: dict[str, str] | None = None) -> str:
    return error_of(body, settings, headers).message


# --- body ------------------------------------------------------------------------


@pytest.mark.parametrize("body", [[], "x", 1, None, True, [{"role": "user"}]])
def test_body_must_be_an_object(settings: Settings, body: object) -> None:
    assert message_of(body, settings) == "Request body must be a JSON object."


def test_empty_object_reports_missing_user_message(settings: Settings) -> None:
    assert message_of({}, settings) == MISSING


def test_error_envelope_validates_against_strict_schema(settings: Settings) -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    err = error_of({"model": "gpt-4o", "messages": HI}, settings)
    jsonschema.validate(err.envelope(), schema)
    assert err.envelope()["error"]["message"] == INVALID_MODEL


# --- minimal happy path ----------------------------------------------------------


def test_minimal_request(settings: Settings) -> None:
    req = parse({"messages": HI}, settings)
    assert req.model == "openclaw"
    assert req.agent_id == "beta"  # the default: true entry
    assert re.fullmatch(rf"agent:beta:openai:{UUID_RE}", req.session_key)
    assert req.message == "hi"
    assert req.extra_system_prompt == ""
    assert req.params == SamplingParams()
    assert req.stream is False
    assert req.include_usage is False


def test_fresh_session_per_call(settings: Settings) -> None:
    assert parse({"messages": HI}, settings).session_key != parse(
        {"messages": HI}, settings
    ).session_key


def test_chat_request_is_frozen(settings: Settings) -> None:
    req = parse({"messages": HI}, settings)
    with pytest.raises(AttributeError):
        req.agent_id = "x"  # type: ignore[misc]


# --- model -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "agent"),
    [
        ("openclaw", "beta"),
        ("OpenClaw", "beta"),
        ("openclaw/default", "beta"),
        ("OPENCLAW/DEFAULT", "beta"),
        ("openclaw/main", "main"),
        ("openclaw:main", "main"),
        ("agent:main", "main"),
        ("Agent:MAIN", "main"),
        ("OpenClaw/Ops-2", "ops-2"),
        ("  openclaw/main  ", "main"),
    ],
)
def test_model_forms(settings: Settings, model: str, agent: str) -> None:
    req = parse({"model": model, "messages": HI}, settings)
    assert req.agent_id == agent
    assert req.model == model  # echoed as sent


@pytest.mark.parametrize("model", [None, "", "   "])
def test_absent_or_blank_model_is_openclaw(settings: Settings, model: str | None) -> None:
    req = parse({"model": model, "messages": HI}, settings)
    assert req.model == "openclaw"
    assert req.agent_id == "beta"


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o",
        "openclaw/",
        "openclaw:",
        "agent:",
        "openclaw/main/x",
        "openclaw/-bad",
        "openclaw/has space",
        "openclaw/" + "a" * 65,
        "agent/main",
        "openclawmain",
        "xopenclaw",
        123,
        1.5,
        True,
        ["openclaw"],
        {"id": "openclaw"},
    ],
)
def test_invalid_model(settings: Settings, model: object) -> None:
    assert message_of({"model": model, "messages": HI}, settings) == INVALID_MODEL


def test_model_agent_id_of_64_chars_is_a_valid_form(settings: Settings) -> None:
    agent = "a" * 64
    assert message_of({"model": f"openclaw/{agent}", "messages": HI}, settings) == (
        f"Unknown agent '{agent}'."
    )


# --- agent -----------------------------------------------------------------------


def test_unknown_agent_from_model(settings: Settings) -> None:
    body = {"model": "openclaw/Nope", "messages": HI}
    assert message_of(body, settings) == "Unknown agent 'nope'."


def test_header_agent_wins_over_model(settings: Settings) -> None:
    body = {"model": "openclaw/main", "messages": HI}
    req = parse(body, settings, {"x-openclaw-agent-id": "ops-2"})
    assert req.agent_id == "ops-2"
    assert req.model == "openclaw/main"


def test_header_agent_wins_even_over_unknown_model_agent(settings: Settings) -> None:
    body = {"model": "openclaw/nope", "messages": HI}
    req = parse(body, settings, {"x-openclaw-agent-id": "main"})
    assert req.agent_id == "main"


def test_header_agent_is_trimmed_and_lowercased(settings: Settings) -> None:
    req = parse({"messages": HI}, settings, {"x-openclaw-agent-id": "  MAIN "})
    assert req.agent_id == "main"
    assert req.session_key.startswith("agent:main:openai:")


def test_header_agent_alias(settings: Settings) -> None:
    assert parse({"messages": HI}, settings, {"x-openclaw-agent": "main"}).agent_id == "main"


def test_agent_id_header_wins_over_alias(settings: Settings) -> None:
    headers = {"x-openclaw-agent-id": "ops-2", "x-openclaw-agent": "main"}
    assert parse({"messages": HI}, settings, headers).agent_id == "ops-2"


def test_blank_header_agent_is_ignored(settings: Settings) -> None:
    req = parse({"model": "openclaw/main", "messages": HI}, settings, {"x-openclaw-agent-id": "  "})
    assert req.agent_id == "main"


@pytest.mark.parametrize(("value", "shown"), [("ghost", "ghost"), ("Bad Id!", "bad id!")])
def test_unknown_header_agent(settings: Settings, value: str, shown: str) -> None:
    err = message_of({"messages": HI}, settings, {"x-openclaw-agent-id": value})
    assert err == f"Unknown agent '{shown}'."


def test_invalid_model_is_reported_even_with_valid_header(settings: Settings) -> None:
    body = {"model": "gpt-4o", "messages": HI}
    assert message_of(body, settings, {"x-openclaw-agent-id": "main"}) == INVALID_MODEL


def test_no_agents_configured_means_main() -> None:
    settings = parse_settings({}, env={})
    assert parse({"messages": HI}, settings).agent_id == "main"
    assert parse({"model": "openclaw/main", "messages": HI}, settings).agent_id == "main"
    assert message_of({"model": "openclaw/beta", "messages": HI}, settings) == (
        "Unknown agent 'beta'."
    )


def test_default_agent_is_first_entry_without_default_flag() -> None:
    settings = parse_settings({"agents": {"list": [{"id": "first"}, {"id": "second"}]}}, env={})
    assert parse({"messages": HI}, settings).agent_id == "first"


# --- session key -----------------------------------------------------------------


def test_session_header_used_as_given_trimmed(settings: Settings) -> None:
    req = parse({"messages": HI}, settings, {"x-openclaw-session-key": "  My Key.with*chars >  "})
    assert req.session_key == "My Key.with*chars >"


def test_session_header_wins_over_user(settings: Settings) -> None:
    req = parse(
        {"messages": HI, "user": "alice"}, settings, {"x-openclaw-session-key": "agent:beta:custom"}
    )
    assert req.session_key == "agent:beta:custom"


def test_blank_session_header_is_ignored(settings: Settings) -> None:
    req = parse({"messages": HI, "user": "alice"}, settings, {"x-openclaw-session-key": "   "})
    assert req.session_key == "agent:beta:openai-user:alice"


@pytest.mark.parametrize(
    "key",
    [
        "subagent:worker",
        "cron:daily",
        "acp:run-1",
        "SUBAGENT:x",
        "Cron:x",
        "agent:main:subagent:worker",
        "agent:main:cron:daily",
        "agent:main:acp:run-1",
        "AGENT:Main:ACP:x",
        "  cron:padded",
    ],
)
def test_reserved_session_namespaces(settings: Settings, key: str) -> None:
    assert message_of({"messages": HI}, settings, {"x-openclaw-session-key": key}) == RESERVED


@pytest.mark.parametrize(
    "key", ["my-cron:job", "agent:main:openai:abc", "agent:main:main", "crontab", "x:subagent:y"]
)
def test_non_reserved_session_keys(settings: Settings, key: str) -> None:
    assert parse({"messages": HI}, settings, {"x-openclaw-session-key": key}).session_key == key


def test_user_session_key(settings: Settings) -> None:
    req = parse({"messages": HI, "user": "  Alice@Example.COM "}, settings)
    assert req.session_key == "agent:beta:openai-user:alice@example.com"


def test_user_session_key_uses_resolved_agent(settings: Settings) -> None:
    req = parse(
        {"model": "openclaw/main", "messages": HI, "user": "bob"},
        settings,
        {"x-openclaw-agent-id": "ops-2"},
    )
    assert req.session_key == "agent:ops-2:openai-user:bob"


@pytest.mark.parametrize("user", ["", "   ", None])
def test_blank_user_gives_fresh_session(settings: Settings, user: str | None) -> None:
    req = parse({"messages": HI, "user": user}, settings)
    assert re.fullmatch(rf"agent:beta:openai:{UUID_RE}", req.session_key)


@pytest.mark.parametrize("user", [1, True, ["a"], {"id": "a"}])
def test_user_must_be_a_string(settings: Settings, user: object) -> None:
    assert message_of({"messages": HI, "user": user}, settings) == "`user` must be a string."


# --- params ----------------------------------------------------------------------


def test_all_params_pass_through(settings: Settings) -> None:
    req = parse(
        {
            "messages": HI,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 100,
            "temperature": 0.5,
            "top_p": 1,
            "frequency_penalty": -2,
            "presence_penalty": 1.5,
            "seed": -7,
            "stop": ["a", "b"],
            "n": 3,
            "tools": [],
            "response_format": {"type": "text"},
        },
        settings,
    )
    assert req.stream is True
    assert req.include_usage is True
    assert req.params == SamplingParams(
        max_tokens=100,
        temperature=0.5,
        top_p=1.0,
        frequency_penalty=-2.0,
        presence_penalty=1.5,
        seed=-7,
        stop=("a", "b"),
    )
    assert isinstance(req.params.top_p, float)


def test_null_params_mean_absent(settings: Settings) -> None:
    body: dict[str, Any] = {
        "messages": HI,
        "stream": None,
        "stream_options": None,
        "max_tokens": None,
        "max_completion_tokens": None,
        "temperature": None,
        "top_p": None,
        "frequency_penalty": None,
        "presence_penalty": None,
        "seed": None,
        "stop": None,
        "user": None,
    }
    req = parse(body, settings)
    assert req.params == SamplingParams()
    assert req.stream is False
    assert req.include_usage is False


@pytest.mark.parametrize("stream", [1, 0, "true", "false", [], {}])
def test_stream_must_be_boolean(settings: Settings, stream: object) -> None:
    assert message_of({"messages": HI, "stream": stream}, settings) == "`stream` must be a boolean."


@pytest.mark.parametrize("options", [True, "x", 1, []])
def test_stream_options_must_be_object(settings: Settings, options: object) -> None:
    body = {"messages": HI, "stream": True, "stream_options": options}
    assert message_of(body, settings) == "`stream_options` must be an object."


@pytest.mark.parametrize("flag", [1, "true", {}])
def test_include_usage_must_be_boolean(settings: Settings, flag: object) -> None:
    body = {"messages": HI, "stream": True, "stream_options": {"include_usage": flag}}
    assert message_of(body, settings) == "`stream_options.include_usage` must be a boolean."


def test_include_usage_only_applies_to_streaming(settings: Settings) -> None:
    body: dict[str, Any] = {"messages": HI, "stream_options": {"include_usage": True}}
    assert parse(body, settings).include_usage is False
    body["stream"] = True
    assert parse(body, settings).include_usage is True
    body["stream_options"] = {}
    assert parse(body, settings).include_usage is False


def test_max_completion_tokens_wins(settings: Settings) -> None:
    body = {"messages": HI, "max_tokens": 10, "max_completion_tokens": 20}
    assert parse(body, settings).params.max_tokens == 20
    assert parse({"messages": HI, "max_completion_tokens": 5}, settings).params.max_tokens == 5


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 10.0, True, False, "10", [10], 2**63])
def test_token_limits_must_be_positive_ints(settings: Settings, name: str, value: object) -> None:
    body = {"messages": HI, name: value}
    assert message_of(body, settings) == f"`{name}` must be a positive integer."


def test_invalid_max_tokens_reported_even_when_max_completion_tokens_valid(
    settings: Settings,
) -> None:
    body = {"messages": HI, "max_tokens": 0, "max_completion_tokens": 5}
    assert message_of(body, settings) == "`max_tokens` must be a positive integer."


@pytest.mark.parametrize(
    ("name", "low", "high", "shown"),
    [
        ("temperature", 0.0, 2.0, "between 0 and 2"),
        ("top_p", 0.0, 1.0, "between 0 and 1"),
        ("frequency_penalty", -2.0, 2.0, "between -2 and 2"),
        ("presence_penalty", -2.0, 2.0, "between -2 and 2"),
    ],
)
def test_float_ranges(settings: Settings, name: str, low: float, high: float, shown: str) -> None:
    for ok in (low, high, (low + high) / 2, int(high)):
        assert getattr(parse({"messages": HI, name: ok}, settings).params, name) == float(ok)
    for bad in (low - 0.001, high + 0.001, float("nan"), float("inf"), float("-inf"), 10**400):
        assert message_of({"messages": HI, name: bad}, settings) == f"`{name}` must be {shown}."
    wrong_types: list[object] = ["1", True, [1], {}]
    for wrong_type in wrong_types:
        body = {"messages": HI, name: wrong_type}
        assert message_of(body, settings) == f"`{name}` must be a number."


def test_temperature_message_matches_spec(settings: Settings) -> None:
    assert message_of({"messages": HI, "temperature": 3}, settings) == (
        "`temperature` must be between 0 and 2."
    )


def test_nan_from_json_is_rejected(settings: Settings) -> None:
    body = json.loads('{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}')
    assert message_of(body, settings) == "`top_p` must be between 0 and 1."


@pytest.mark.parametrize("seed", [0, 42, -(2**63), 2**63 - 1])
def test_seed_ok(settings: Settings, seed: int) -> None:
    assert parse({"messages": HI, "seed": seed}, settings).params.seed == seed


@pytest.mark.parametrize("seed", [1.5, 1.0, True, "1", 2**63, -(2**63) - 1])
def test_seed_must_be_integer(settings: Settings, seed: object) -> None:
    assert message_of({"messages": HI, "seed": seed}, settings) == "`seed` must be an integer."


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("END", ("END",)),
        (["a"], ("a",)),
        (["a", "b", "c", "d"], ("a", "b", "c", "d")),
        ([], None),
    ],
)
def test_stop_ok(settings: Settings, stop: object, expected: tuple[str, ...] | None) -> None:
    assert parse({"messages": HI, "stop": stop}, settings).params.stop == expected


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [1], ["a", None], 1, {"a": 1}, True])
def test_stop_invalid(settings: Settings, stop: object) -> None:
    assert message_of({"messages": HI, "stop": stop}, settings) == (
        "`stop` must be a string or an array of at most 4 strings."
    )


# --- validation order ------------------------------------------------------------


def test_order_model_before_messages(settings: Settings) -> None:
    assert message_of({"model": "gpt-4o"}, settings) == INVALID_MODEL


def test_order_model_before_agent(settings: Settings) -> None:
    assert message_of({"model": 5}, settings, {"x-openclaw-agent-id": "ghost"}) == INVALID_MODEL


def test_order_agent_before_session_header(settings: Settings) -> None:
    headers = {"x-openclaw-agent-id": "ghost", "x-openclaw-session-key": "cron:x"}
    assert message_of({"messages": HI}, settings, headers) == "Unknown agent 'ghost'."


def test_order_session_header_before_params(settings: Settings) -> None:
    body = {"messages": HI, "temperature": 9}
    assert message_of(body, settings, {"x-openclaw-session-key": "acp:x"}) == RESERVED


def test_order_params_before_messages(settings: Settings) -> None:
    assert message_of({"stream": "yes", "messages": "nope"}, settings) == (
        "`stream` must be a boolean."
    )


def test_order_within_params_follows_field_list(settings: Settings) -> None:
    body = {"messages": HI, "stream": 1, "temperature": 9, "stop": 5}
    assert message_of(body, settings) == "`stream` must be a boolean."
    body = {"messages": HI, "max_tokens": 0, "temperature": 9}
    assert message_of(body, settings) == "`max_tokens` must be a positive integer."


# --- messages ---------------------------------------------------------------------


@pytest.mark.parametrize("messages", ["hi", {"role": "user", "content": "hi"}, 3, True])
def test_messages_must_be_array(settings: Settings, messages: object) -> None:
    assert message_of({"messages": messages}, settings) == "`messages` must be an array."


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        [{"role": "system", "content": "be nice"}],
        [{"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "   \n "}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "  "}]}],
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
        [{"content": "no role"}],
        [{"role": "critic", "content": "unknown role"}],
        ["hi", 1, None, ["user"]],
    ],
)
def test_missing_user_message(settings: Settings, messages: object) -> None:
    assert message_of({"messages": messages}, settings) == MISSING


def test_spec_flattening_example_verbatim(settings: Settings) -> None:
    req = parse(
        {
            "messages": [
                {"role": "user", "content": "Hello, who are you?"},
                {"role": "assistant", "content": "I am Claude."},
                {"role": "user", "content": "What did I just ask you?"},
            ]
        },
        settings,
    )
    assert req.message == (
        "[Chat messages since your last reply - for context]\n"
        "User: Hello, who are you?\n"
        "Assistant: I am Claude.\n"
        "\n"
        "[Current message - respond to this]\n"
        "User: What did I just ask you?"
    )


def flatten_messages(messages: object) -> tuple[str, str]:
    """The SPEC §2 text form of a conversation without tool traffic."""
    conversation = read_conversation(messages, stateless=True)
    assert not conversation.structured
    return conversation.message, conversation.extra_system_prompt


def test_single_message_is_the_text_alone() -> None:
    assert flatten_messages([{"role": "user", "content": "  hello \n"}]) == ("hello", "")


def test_system_and_developer_join_into_extra_system_prompt() -> None:
    message, extra = flatten_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use English."}]},
            {"role": "system", "content": "  "},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "Late rule."},
        ]
    )
    assert message == "hi"  # system messages are not "earlier entries"
    assert extra == "Be brief.\n\nUse English.\n\nLate rule."


def test_content_parts_text_and_input_text_joined_with_newline() -> None:
    message, _ = flatten_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "  line one"},
                    {"type": "input_text", "text": "line two"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "text", "text": ""},
                    {"type": "text"},
                    {"type": "text", "text": 5},
                    {"type": "other", "text": "ignored"},
                    "stray",
                    {"type": "text", "text": "line three  "},
                ],
            }
        ]
    )
    assert message == "line one\nline two\nline three"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_image", "image_url": "https://x/y.png"},
    ],
)
def test_image_only_current_message(part: dict[str, Any]) -> None:
    assert flatten_messages([{"role": "user", "content": [part]}]) == ("[image]", "")


def test_image_only_current_message_with_history() -> None:
    message, _ = flatten_messages(
        [
            {"role": "user", "content": "look at this"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
        ]
    )
    assert message.endswith("[Current message - respond to this]\nUser: [image]")
    assert "User: look at this\n" in message


def test_earlier_image_only_entries_are_skipped() -> None:
    message, _ = flatten_messages(
        [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
            {"role": "user", "content": "what is it?"},
        ]
    )
    assert message == "what is it?"


def test_entries_after_the_current_message_are_dropped() -> None:
    message, _ = flatten_messages(
        [
            {"role": "user", "content": "question"},
            {"role": "assistant", "content": "a trailing assistant prefill"},
        ]
    )
    assert message == "question"


def test_empty_last_user_entry_falls_back_to_earlier_one() -> None:
    message, _ = flatten_messages(
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "dropped"},
            {"role": "user", "content": "   "},
        ]
    )
    assert message == (
        "[Chat messages since your last reply - for context]\n"
        "User: first\n"
        "Assistant: reply\n"
        "\n"
        "[Current message - respond to this]\n"
        "User: second"
    )


def test_tool_labels_and_tool_as_current_message() -> None:
    # Legacy tool messages (no tool_call_id, hence no tool traffic to keep
    # structured) are flattened with their labels, as SPEC §2 says.
    message, _ = flatten_messages(
        [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "function", "name": "get_time", "content": "noon"},
            {"role": "tool", "content": "anon"},
            {"role": "tool", "name": "lookup", "content": "rain later"},
        ]
    )
    assert message == (
        "[Chat messages since your last reply - for context]\n"
        "User: weather?\n"
        "Tool:get_time: noon\n"
        "Tool: anon\n"
        "\n"
        "[Current message - respond to this]\n"
        "Tool:lookup: rain later"
    )


def test_tool_alone_is_its_text() -> None:
    assert flatten_messages([{"role": "function", "name": "f", "content": "42"}]) == ("42", "")


def test_roles_are_case_insensitive_and_non_objects_skipped() -> None:
    message, extra = flatten_messages(
        ["junk", None, {"role": " System ", "content": "sys"}, {"role": "USER", "content": "hey"}]
    )
    assert (message, extra) == ("hey", "sys")


def test_multiline_texts_are_kept() -> None:
    message, _ = flatten_messages(
        [
            {"role": "user", "content": "a\nb"},
            {"role": "assistant", "content": "c\n\nd"},
            {"role": "user", "content": "e\nf"},
        ]
    )
    assert message == (
        "[Chat messages since your last reply - for context]\n"
        "User: a\nb\n"
        "Assistant: c\n\nd\n"
        "\n"
        "[Current message - respond to this]\n"
        "User: e\nf"
    )


def test_full_request_flattening(settings: Settings) -> None:
    req = parse(
        {
            "model": "openclaw:main",
            "user": "Zed",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": [{"type": "text", "text": "times 3?"}]},
            ],
        },
        settings,
    )
    assert req.agent_id == "main"
    assert req.session_key == "agent:main:openai-user:zed"
    assert req.extra_system_prompt == "You are terse."
    assert req.message.endswith("[Current message - respond to this]\nUser: times 3?")


def test_only_generated_session_keys_are_ephemeral(settings: Settings) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse(body, settings).ephemeral_session is True
    assert parse({**body, "user": "bob"}, settings).ephemeral_session is False
    keyed = parse(body, settings, {"x-openclaw-session-key": "agent:main:openai:fixed"})
    assert keyed.ephemeral_session is False
