"""Unit tests for clawbus.config (SPEC §1) and the `clawbus config check` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clawbus.config import (
    PASSWORD_ENV,
    TOKEN_ENV,
    ConfigError,
    Settings,
    check_gateway_startable,
    env_proxies,
    load_settings,
    masked,
    parse_settings,
    proxy_for,
)

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def parse(raw: Any, **env: str) -> Settings:
    return parse_settings(raw, env=env)


def config_error(raw: Any, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, env=env)
    return str(info.value)


# --------------------------------------------------------------------------- JSON5 file


JSON5_TEXT = """
// a comment
{
  /* block comment */
  gateway: {
    port: 19999,          // unquoted key, trailing comma
    bind: 'loopback',
    auth: { mode: "token", token: 'file-token', },
    http: { endpoints: { chatCompletions: { enabled: true, maxBodyBytes: 1024, }, }, },
  },
  agents: {
    defaults: { model: "echo/echo", timeoutSeconds: 30, maxConcurrent: 4 },
    list: [
      { id: "Main", default: true, systemPrompt: "You are main." },
      { id: "beta", model: "openai/gpt-4o-mini" },
    ],
  },
  models: {
    providers: {
      openai: { api: "openai-completions", baseUrl: "https://api.example/v1",
                apiKey: "sk-secret", },
    },
  },
  bus: { url: null },
}
"""


def test_json5_file_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path / "cfg" / "clawbus.json5", JSON5_TEXT)
    settings = load_settings(path, env={"CLAWBUS_STATE_DIR": str(tmp_path / "state")})
    assert settings.gateway.port == 19999
    assert settings.gateway.bind == "loopback"
    assert settings.gateway.auth.mode == "token"
    assert settings.gateway.auth.token == "file-token"
    assert settings.gateway.http.endpoints.chat_completions.enabled is True
    assert settings.gateway.http.endpoints.chat_completions.max_body_bytes == 1024
    assert settings.agents.defaults.timeout_seconds == 30
    assert settings.agents.defaults.max_concurrent == 4
    assert settings.agent_ids == ["main", "beta"]
    assert settings.bus.url is None
    assert settings.models.providers["openai"].base_url == "https://api.example/v1"
    assert settings.config_dir == (tmp_path / "cfg").resolve()


def test_path_accepts_str(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json5", "{gateway: {port: 1234}}")
    assert load_settings(str(path), env={}).gateway.port == 1234


def test_defaults_match_spec() -> None:
    settings = parse({})
    assert settings.gateway.port == 18789
    assert settings.gateway.bind == "loopback"
    assert settings.gateway.host == "127.0.0.1"
    assert settings.gateway.auth.rate_limit.max_attempts == 10
    assert settings.gateway.auth.rate_limit.window_seconds == 60
    assert settings.gateway.auth.rate_limit.lockout_seconds == 300
    assert settings.gateway.http.endpoints.chat_completions.enabled is False
    assert settings.gateway.http.endpoints.chat_completions.max_body_bytes == 20971520
    assert settings.agents.defaults.model == "echo/echo"
    assert settings.agents.defaults.timeout_seconds == 600
    assert settings.agents.defaults.max_concurrent == 16
    assert settings.bus.url is None
    assert settings.auth_mode == "none"
    assert settings.secret is None
    assert settings.control_ui_enabled is True


def test_unparseable_file_is_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json5", "{ gateway: { port: 1, ")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_settings(path, env={})


def test_empty_file_is_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.json5", "")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_settings(path, env={})


def test_directory_as_config_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(tmp_path, env={})


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json5"
    path.write_bytes(b'{gateway: {auth: {token: "\xff\xfe"}}}')
    with pytest.raises(ConfigError, match="cannot parse"):
        load_settings(path, env={})


@pytest.mark.parametrize("text", ["[]", "[{gateway: {}}]", "'text'", "42", "true"])
def test_non_object_top_level_is_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "c.json5", text)
    with pytest.raises(ConfigError, match="top level must be an object"):
        load_settings(path, env={})


@pytest.mark.parametrize("raw", [[], "x", 1, [{"gateway": {}}]])
def test_parse_settings_non_object_is_error(raw: Any) -> None:
    assert "top level must be an object" in config_error(raw)


# --------------------------------------------------------------------------- file location


def test_explicit_path_wins_over_env(tmp_path: Path) -> None:
    explicit = write(tmp_path / "explicit.json5", "{gateway: {port: 1111}}")
    from_env = write(tmp_path / "env.json5", "{gateway: {port: 2222}}")
    settings = load_settings(explicit, env={"CLAWBUS_CONFIG": str(from_env)})
    assert settings.gateway.port == 1111


def test_env_path_used_without_explicit(tmp_path: Path) -> None:
    from_env = write(tmp_path / "env.json5", "{gateway: {port: 2222}}")
    settings = load_settings(None, env={"CLAWBUS_CONFIG": str(from_env)})
    assert settings.gateway.port == 2222
    assert settings.config_dir == tmp_path.resolve()


def test_default_path_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / ".clawbus" / "clawbus.json5", "{gateway: {port: 3333}}")
    settings = load_settings(None, env={})
    assert settings.gateway.port == 3333
    assert settings.config_dir == (tmp_path / ".clawbus").resolve()


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not (tmp_path / ".clawbus").exists()
    settings = load_settings(None, env={})
    assert settings.gateway.port == 18789
    assert settings.auth_mode == "none"
    assert settings.agent_ids == ["main"]
    assert settings.state_dir == tmp_path / ".clawbus"


def test_empty_env_config_falls_back_to_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(None, env={"CLAWBUS_CONFIG": ""})
    assert settings.gateway.port == 18789


def test_missing_explicit_file_is_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json5"
    with pytest.raises(ConfigError, match="not found") as info:
        load_settings(missing, env={})
    assert str(missing) in str(info.value)


def test_missing_env_file_is_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json5"
    with pytest.raises(ConfigError, match="not found"):
        load_settings(None, env={"CLAWBUS_CONFIG": str(missing)})


def test_explicit_path_expands_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "x.json5", "{gateway: {port: 4444}}")
    assert load_settings("~/x.json5", env={}).gateway.port == 4444


# --------------------------------------------------------------------------- state dir


def test_state_dir_from_env(tmp_path: Path) -> None:
    settings = parse({}, CLAWBUS_STATE_DIR=str(tmp_path / "state"))
    assert settings.state_dir == tmp_path / "state"


def test_state_dir_from_env_via_load(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json5", "{}")
    settings = load_settings(path, env={"CLAWBUS_STATE_DIR": str(tmp_path / "st")})
    assert settings.state_dir == tmp_path / "st"


def test_state_dir_default_is_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse({}).state_dir == tmp_path / ".clawbus"


@pytest.mark.parametrize("key", ["stateDir", "state_dir", "configDir", "config_dir"])
def test_resolved_fields_cannot_come_from_file(key: str) -> None:
    message = config_error({key: "/somewhere"})
    assert key in message
    assert "unknown key" in message


def test_resolved_fields_not_dumped() -> None:
    data = masked(parse({}))
    assert "stateDir" not in data
    assert "configDir" not in data


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"gatway": {}}, "gatway"),
        ({"gateway": {"prot": 1}}, "gateway.prot"),
        ({"gateway": {"auth": {"tokn": "x"}}}, "gateway.auth.tokn"),
        ({"gateway": {"auth": {"rateLimit": {"max": 1}}}}, "gateway.auth.rateLimit.max"),
        (
            {"gateway": {"http": {"endpoints": {"chatCompletion": {"enabled": True}}}}},
            "gateway.http.endpoints.chatCompletion",
        ),
        ({"agents": {"list": [{"id": "main", "foo": 1}]}}, "agents.list[0].foo"),
        (
            {"agents": {"list": [{"id": "a"}, {"id": "b", "sytemPrompt": "x"}]}},
            "agents.list[1].sytemPrompt",
        ),
        ({"agents": {"defaults": {"modle": "echo/echo"}}}, "agents.defaults.modle"),
        (
            {"models": {"providers": {"o": {"api": "openai-completions", "apikey": "k"}}}},
            "models.providers.o.apikey",
        ),
        ({"bus": {"uri": "nats://x"}}, "bus.uri"),
    ],
)
def test_unknown_key_names_path(raw: dict[str, Any], path: str) -> None:
    message = config_error(raw)
    assert f"{path}: unknown key" in message


def test_unknown_key_in_file_names_path_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json5", "{gateway: {auth: {mode: 'token', tokn: 'x'}}}")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={TOKEN_ENV: "env-token"})
    message = str(info.value)
    assert "gateway.auth.tokn" in message
    assert str(path) in message
    assert "\n" not in message  # one problem, one line


def test_several_problems_all_reported() -> None:
    message = config_error({"gatway": {}, "bus": {"uri": "x"}})
    assert "gatway: unknown key" in message
    assert "bus.uri: unknown key" in message


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"gateway": {"port": 70000}}, "gateway.port"),
        ({"gateway": {"port": -1}}, "gateway.port"),
        ({"gateway": {"auth": {"mode": "bearer"}}}, "gateway.auth.mode"),
        ({"gateway": {"auth": {"token": 123}}}, "gateway.auth.token"),
        ({"gateway": {"bind": "everywhere"}}, "gateway.bind"),
        ({"gateway": {"auth": {"rateLimit": {"maxAttempts": 0}}}}, "gateway.auth.rateLimit"),
        ({"agents": {"defaults": {"timeoutSeconds": 0}}}, "agents.defaults.timeoutSeconds"),
        ({"agents": {"list": [{"model": "echo/echo"}]}}, "agents.list[0].id"),
        ({"models": {"providers": {"x": {"api": "grpc"}}}}, "models.providers.x.api"),
        ({"models": {"providers": {"x": {}}}}, "models.providers.x.api"),
    ],
)
def test_invalid_values_name_path(raw: dict[str, Any], path: str) -> None:
    assert path in config_error(raw)


def test_null_top_level_means_defaults() -> None:
    assert parse(None).gateway.port == 18789


# --------------------------------------------------------------------------- secrets & auth mode


def test_env_token_used_when_file_has_none() -> None:
    settings = parse({}, **{TOKEN_ENV: "env-token"})
    assert settings.gateway.auth.token == "env-token"
    assert settings.auth_mode == "token"
    assert settings.secret == "env-token"


def test_env_password_used_when_file_has_none() -> None:
    settings = parse({}, **{PASSWORD_ENV: "env-pass"})
    assert settings.gateway.auth.password == "env-pass"
    assert settings.auth_mode == "password"
    assert settings.secret == "env-pass"


def test_file_token_wins_over_env() -> None:
    settings = parse({"gateway": {"auth": {"token": "file-token"}}}, **{TOKEN_ENV: "env-token"})
    assert settings.secret == "file-token"


def test_file_password_wins_over_env() -> None:
    settings = parse(
        {"gateway": {"auth": {"mode": "password", "password": "file-pass"}}},
        **{PASSWORD_ENV: "env-pass"},
    )
    assert settings.secret == "file-pass"


def test_empty_env_secret_is_ignored() -> None:
    settings = parse({}, **{TOKEN_ENV: "", PASSWORD_ENV: ""})
    assert settings.gateway.auth.token is None
    assert settings.gateway.auth.password is None
    assert settings.auth_mode == "none"


def test_parse_settings_defaults_to_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "proc-token")
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert parse_settings({}).secret == "proc-token"


def test_load_settings_env_mapping_isolated_from_process_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "proc-token")
    path = write(tmp_path / "c.json5", "{}")
    assert load_settings(path, env={}).secret is None


@pytest.mark.parametrize(
    ("auth", "env", "mode", "secret"),
    [
        ({}, {}, "none", None),
        ({"token": "t"}, {}, "token", "t"),
        ({"password": "p"}, {}, "password", "p"),
        ({"token": "t", "password": "p"}, {}, "token", "t"),
        ({"mode": "password", "token": "t", "password": "p"}, {}, "password", "p"),
        ({"mode": "none", "token": "t"}, {}, "none", None),
        ({"mode": "token"}, {}, "token", None),
        ({"mode": "password"}, {TOKEN_ENV: "t"}, "password", None),
        ({"password": "p"}, {TOKEN_ENV: "t"}, "token", "t"),
        ({"mode": "password"}, {PASSWORD_ENV: "p"}, "password", "p"),
    ],
)
def test_auth_mode_inference(
    auth: dict[str, Any], env: dict[str, str], mode: str, secret: str | None
) -> None:
    settings = parse({"gateway": {"auth": auth}}, **env)
    assert settings.auth_mode == mode
    assert settings.secret == secret


# --------------------------------------------------------------------------- startability


def test_token_mode_without_secret_refuses() -> None:
    settings = parse({"gateway": {"auth": {"mode": "token"}}})
    with pytest.raises(ConfigError) as info:
        check_gateway_startable(settings)
    message = str(info.value)
    assert "gateway.auth.token" in message
    assert TOKEN_ENV in message


def test_password_mode_without_secret_refuses() -> None:
    settings = parse({"gateway": {"auth": {"mode": "password", "token": "t"}}})
    with pytest.raises(ConfigError) as info:
        check_gateway_startable(settings)
    message = str(info.value)
    assert "gateway.auth.password" in message
    assert PASSWORD_ENV in message


def test_token_mode_with_env_secret_starts() -> None:
    check_gateway_startable(parse({"gateway": {"auth": {"mode": "token"}}}, **{TOKEN_ENV: "t"}))


def test_password_mode_with_env_secret_starts() -> None:
    check_gateway_startable(
        parse({"gateway": {"auth": {"mode": "password"}}}, **{PASSWORD_ENV: "p"})
    )


@pytest.mark.parametrize("bind", ["lan", "0.0.0.0", "192.168.1.20", "10.0.0.5", "::"])
@pytest.mark.parametrize("auth", [{}, {"mode": "none"}, {"mode": "none", "token": "t"}])
def test_non_loopback_without_auth_refuses(bind: str, auth: dict[str, Any]) -> None:
    settings = parse({"gateway": {"bind": bind, "auth": auth}})
    assert settings.auth_mode == "none"
    with pytest.raises(ConfigError, match="none"):
        check_gateway_startable(settings)


@pytest.mark.parametrize("bind", ["loopback", "127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_without_auth_starts(bind: str) -> None:
    settings = parse({"gateway": {"bind": bind, "auth": {"mode": "none"}}})
    assert settings.gateway.is_loopback
    check_gateway_startable(settings)


@pytest.mark.parametrize("bind", ["lan", "0.0.0.0", "192.168.1.20"])
def test_non_loopback_with_token_starts(bind: str) -> None:
    check_gateway_startable(parse({"gateway": {"bind": bind, "auth": {"token": "t"}}}))


def test_non_loopback_with_password_starts() -> None:
    check_gateway_startable(parse({"gateway": {"bind": "lan"}}, **{PASSWORD_ENV: "p"}))


@pytest.mark.parametrize(
    ("bind", "host"),
    [("loopback", "127.0.0.1"), ("lan", "0.0.0.0"), ("192.168.1.20", "192.168.1.20"),
     ("::1", "::1")],
)
def test_bind_host(bind: str, host: str) -> None:
    assert parse({"gateway": {"bind": bind}}).gateway.host == host


@pytest.mark.parametrize(
    ("gateway", "enabled"),
    [
        ({}, True),
        ({"bind": "lan", "auth": {"token": "t"}}, False),
        ({"bind": "lan", "auth": {"token": "t"}, "controlUi": {"enabled": True}}, True),
        ({"controlUi": {"enabled": False}}, False),
    ],
)
def test_control_ui_enabled(gateway: dict[str, Any], enabled: bool) -> None:
    assert parse({"gateway": gateway}).control_ui_enabled is enabled


# --------------------------------------------------------------------------- agents


def test_agent_ids_lowercased_and_lookup_case_insensitive() -> None:
    settings = parse({"agents": {"list": [{"id": "Main"}, {"id": "BETA_2"}]}})
    assert settings.agent_ids == ["main", "beta_2"]
    beta = settings.agent("Beta_2")
    assert beta is not None
    assert beta.id == "beta_2"
    assert settings.agent("missing") is None


@pytest.mark.parametrize("agent_id", ["a", "0", "main", "a-b_c", "x" * 64, "9lives"])
def test_valid_agent_ids(agent_id: str) -> None:
    assert parse({"agents": {"list": [{"id": agent_id}]}}).agent_ids == [agent_id]


@pytest.mark.parametrize(
    "agent_id", ["", "-main", "_main", "ma in", "ma.in", "main/x", "x" * 65, "émile", "a:b"]
)
def test_invalid_agent_ids(agent_id: str) -> None:
    assert "agents.list[0].id" in config_error({"agents": {"list": [{"id": agent_id}]}})


def test_duplicate_agent_ids_rejected() -> None:
    message = config_error({"agents": {"list": [{"id": "main"}, {"id": "beta"}, {"id": "main"}]}})
    assert "duplicate agent id 'main'" in message


def test_duplicate_agent_ids_rejected_case_insensitively() -> None:
    message = config_error({"agents": {"list": [{"id": "main"}, {"id": "MAIN"}]}})
    assert "duplicate agent id 'main'" in message


def test_default_agent_flagged() -> None:
    settings = parse({"agents": {"list": [{"id": "a"}, {"id": "b", "default": True}]}})
    assert settings.default_agent_id == "b"


def test_default_agent_first_without_flag() -> None:
    settings = parse({"agents": {"list": [{"id": "first"}, {"id": "second"}]}})
    assert settings.default_agent_id == "first"


def test_default_agent_main_without_list() -> None:
    settings = parse({})
    assert settings.default_agent_id == "main"
    assert settings.agent_ids == ["main"]
    main = settings.agent("MAIN")
    assert main is not None
    assert main.id == "main"
    assert settings.agent("other") is None


def test_main_not_implicit_when_list_given() -> None:
    settings = parse({"agents": {"list": [{"id": "solo"}]}})
    assert settings.agent("main") is None
    assert settings.default_agent_id == "solo"


def test_agent_timeout_falls_back_to_defaults() -> None:
    settings = parse({"agents": {"defaults": {"timeoutSeconds": 42},
                                 "list": [{"id": "a"}, {"id": "b", "timeoutSeconds": 7}]}})
    a, b = settings.agent("a"), settings.agent("b")
    assert a is not None
    assert b is not None
    assert settings.agent_timeout(a) == 42
    assert settings.agent_timeout(b) == 7


# --------------------------------------------------------------------------- models & providers


def test_echo_provider_built_in() -> None:
    settings = parse({"agents": {"list": [{"id": "main", "model": "echo/anything"}]}})
    agent = settings.agent("main")
    assert agent is not None
    name, provider, model = settings.agent_model(agent)
    assert (name, provider.api, model) == ("echo", "echo", "anything")


def test_agent_model_from_defaults() -> None:
    settings = parse({
        "agents": {"defaults": {"model": "openai/gpt-4o-mini"}, "list": [{"id": "main"}]},
        "models": {"providers": {"openai": {"api": "openai-completions"}}},
    })
    agent = settings.agent("main")
    assert agent is not None
    name, provider, model = settings.agent_model(agent)
    assert (name, provider.api, model) == ("openai", "openai-completions", "gpt-4o-mini")


def test_model_id_may_contain_slashes() -> None:
    settings = parse({
        "agents": {"list": [{"id": "main", "model": "ollama/library/llama3:8b"}]},
        "models": {"providers": {"ollama": {"api": "openai-completions"}}},
    })
    agent = settings.agent("main")
    assert agent is not None
    assert settings.agent_model(agent)[2] == "library/llama3:8b"


@pytest.mark.parametrize("model", ["gpt-4o", "openai/", "/gpt-4o", ""])
def test_model_must_be_provider_slash_id(model: str) -> None:
    raw = {"agents": {"list": [{"id": "main", "model": model}]},
           "models": {"providers": {"openai": {"api": "openai-completions"}}}}
    assert "provider/model-id" in config_error(raw)


@pytest.mark.parametrize("model", ["gpt-4o", "openai/"])
def test_default_model_must_be_provider_slash_id(model: str) -> None:
    raw = {"agents": {"defaults": {"model": model}},
           "models": {"providers": {"openai": {"api": "openai-completions"}}}}
    message = config_error(raw)
    assert "agents.defaults.model" in message
    assert "provider/model-id" in message


def test_unknown_provider_rejected() -> None:
    message = config_error({"agents": {"list": [{"id": "main", "model": "openai/gpt-4o"}]}})
    assert "unknown provider 'openai'" in message


def test_unknown_provider_in_defaults_rejected() -> None:
    message = config_error({"agents": {"defaults": {"model": "nope/x"}}})
    assert "unknown provider 'nope'" in message


def test_unknown_provider_via_defaults_for_listed_agent() -> None:
    raw = {"agents": {"defaults": {"model": "nope/x"}, "list": [{"id": "main"}]}}
    assert "unknown provider 'nope'" in config_error(raw)


def test_configured_provider_overrides_echo() -> None:
    settings = parse({"models": {"providers": {"echo": {"api": "echo", "tokenDelayMs": 5}}}})
    assert settings.providers["echo"].token_delay_ms == 5


def test_provider_api_key_file_then_env() -> None:
    settings = parse({"models": {"providers": {
        "a": {"api": "openai-completions", "apiKey": "file-key", "apiKeyEnv": "A_KEY"},
        "b": {"api": "anthropic-messages", "apiKeyEnv": "B_KEY"},
        "c": {"api": "openai-completions"},
    }}})
    env = {"A_KEY": "env-a", "B_KEY": "env-b"}
    providers = settings.providers
    assert settings.provider_api_key(providers["a"], env) == "file-key"
    assert settings.provider_api_key(providers["b"], env) == "env-b"
    assert settings.provider_api_key(providers["b"], {}) is None
    assert settings.provider_api_key(providers["b"], {"B_KEY": ""}) is None
    assert settings.provider_api_key(providers["c"], env) is None


# --------------------------------------------------------------------------- system prompts


def test_system_prompt_inline() -> None:
    settings = parse({"agents": {"list": [{"id": "main", "systemPrompt": "Be brief."}]}})
    agent = settings.agent("main")
    assert agent is not None
    assert settings.agent_system_prompt(agent) == "Be brief."


def test_system_prompt_empty_when_unset() -> None:
    settings = parse({"agents": {"list": [{"id": "main"}]}})
    agent = settings.agent("main")
    assert agent is not None
    assert settings.agent_system_prompt(agent) == ""


def test_system_prompt_file_relative_to_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_dir = tmp_path / "conf"
    write(cfg_dir / "prompts" / "main.md", "You are main.\nLine two.\n")
    path = write(
        cfg_dir / "clawbus.json5",
        "{agents: {list: [{id: 'main', systemPromptFile: 'prompts/main.md'}]}}",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(path, env={})
    agent = settings.agent("main")
    assert agent is not None
    assert settings.agent_system_prompt(agent) == "You are main.\nLine two.\n"


def test_system_prompt_file_relative_with_relative_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf" / "p.txt", "relative")
    write(tmp_path / "conf" / "c.json5", "{agents: {list: [{id: 'a', systemPromptFile: 'p.txt'}]}}")
    monkeypatch.chdir(tmp_path)
    settings = load_settings("conf/c.json5", env={})
    monkeypatch.chdir(tmp_path / "conf")  # a later cwd change must not matter
    agent = settings.agent("a")
    assert agent is not None
    assert settings.agent_system_prompt(agent) == "relative"


def test_system_prompt_file_absolute(tmp_path: Path) -> None:
    prompt = write(tmp_path / "abs" / "p.txt", "absolute")
    path = write(
        tmp_path / "conf" / "c.json5",
        json.dumps({"agents": {"list": [{"id": "a", "systemPromptFile": str(prompt)}]}}),
    )
    settings = load_settings(path, env={})
    agent = settings.agent("a")
    assert agent is not None
    assert settings.agent_system_prompt(agent) == "absolute"


def test_system_prompt_and_file_conflict() -> None:
    raw = {"agents": {"list": [{"id": "a", "systemPrompt": "x", "systemPromptFile": "y"}]}}
    message = config_error(raw)
    assert "agents.list[0]" in message
    assert "systemPromptFile" in message


# --------------------------------------------------------------------------- masked()


def test_masked_hides_secrets() -> None:
    settings = parse({
        "gateway": {"auth": {"token": "tok-secret", "password": "pw-secret"}},
        "models": {"providers": {
            "openai": {"api": "openai-completions", "apiKey": "sk-secret",
                       "apiKeyEnv": "OPENAI_API_KEY"},
            "local": {"api": "openai-completions", "baseUrl": "http://127.0.0.1:1/v1"},
        }},
    })
    data = masked(settings)
    text = json.dumps(data)
    for secret in ("tok-secret", "pw-secret", "sk-secret"):
        assert secret not in text
    auth = data["gateway"]["auth"]
    assert auth["token"] == "***"
    assert auth["password"] == "***"
    assert auth["mode"] == "token"
    assert data["models"]["providers"]["openai"]["apiKey"] == "***"
    assert data["models"]["providers"]["openai"]["apiKeyEnv"] == "OPENAI_API_KEY"
    assert data["models"]["providers"]["local"]["apiKey"] is None
    # the live settings are untouched
    assert settings.gateway.auth.token == "tok-secret"


def test_masked_hides_env_secret() -> None:
    data = masked(parse({}, **{TOKEN_ENV: "env-secret"}))
    assert "env-secret" not in json.dumps(data)
    assert data["gateway"]["auth"]["token"] == "***"
    assert data["gateway"]["auth"]["mode"] == "token"


def test_masked_is_camel_case_json_round_trip() -> None:
    settings = parse({"gateway": {"port": 1234}, "agents": {"list": [{"id": "Main"}]}})
    data = masked(settings)
    assert json.loads(json.dumps(data)) == data
    assert data["gateway"]["port"] == 1234
    assert "rateLimit" in data["gateway"]["auth"]
    assert "chatCompletions" in data["gateway"]["http"]["endpoints"]
    assert data["agents"]["list"][0]["id"] == "main"
    assert data["gateway"]["auth"]["mode"] == "none"
    assert data["gateway"]["auth"]["token"] is None


def test_masked_output_reloads(tmp_path: Path) -> None:
    settings = parse({"gateway": {"auth": {"mode": "token", "token": "t"}},
                      "agents": {"list": [{"id": "a", "default": True}]}})
    path = write(tmp_path / "again.json5", json.dumps(masked(settings)))
    again = load_settings(path, env={})
    assert again.agent_ids == ["a"]
    assert again.auth_mode == "token"


# --------------------------------------------------------------------------- `clawbus config check`


def run_check(tmp_path: Path, config: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (TOKEN_ENV, PASSWORD_ENV, "CLAWBUS_CONFIG", "CLAWBUS_STATE_DIR")}
    env.update({"HOME": str(tmp_path / "home"),
                "CLAWBUS_STATE_DIR": str(tmp_path / "state"), **extra_env})
    return subprocess.run(
        [sys.executable, "-m", "clawbus", "config", "check", "--config", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_cli_config_check_good_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.json5", """{
      // good file
      gateway: { auth: { token: "cli-secret-token", }, },
      models: { providers: { openai: { api: "openai-completions", apiKey: "sk-cli-secret" } } },
      agents: { list: [ { id: "Main", model: "openai/gpt-4o-mini" }, ], },
    }""")
    proc = run_check(tmp_path, config)
    assert proc.returncode == 0, proc.stderr
    assert "cli-secret-token" not in proc.stdout + proc.stderr
    assert "sk-cli-secret" not in proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["gateway"]["auth"]["token"] == "***"
    assert data["gateway"]["auth"]["mode"] == "token"
    assert data["models"]["providers"]["openai"]["apiKey"] == "***"
    assert data["agents"]["list"][0]["id"] == "main"
    assert "Traceback" not in proc.stderr


def test_cli_config_check_env_secret_masked(tmp_path: Path) -> None:
    config = write(tmp_path / "c.json5", "{gateway: {auth: {mode: 'password'}}}")
    proc = run_check(tmp_path, config, **{PASSWORD_ENV: "env-cli-pass"})
    assert proc.returncode == 0, proc.stderr
    assert "env-cli-pass" not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["gateway"]["auth"]["password"] == "***"


def test_cli_config_check_typo(tmp_path: Path) -> None:
    config = write(tmp_path / "c.json5", "{gateway: {auth: {mode: 'token', tokn: 'secret'}}}")
    proc = run_check(tmp_path, config)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "gateway.auth.tokn" in lines[0]
    assert "unknown key" in lines[0]


def test_cli_config_check_missing_file(tmp_path: Path) -> None:
    proc = run_check(tmp_path, tmp_path / "missing.json5")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not found" in proc.stderr


def test_cli_config_check_unparseable(tmp_path: Path) -> None:
    proc = run_check(tmp_path, write(tmp_path / "c.json5", "{gateway: "))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "cannot parse" in proc.stderr


def test_cli_config_check_unstartable_warns(tmp_path: Path) -> None:
    config = write(tmp_path / "c.json5", "{gateway: {bind: 'lan'}}")
    proc = run_check(tmp_path, config)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["gateway"]["bind"] == "lan"
    assert "0.0.0.0" in proc.stderr


# --------------------------------------------------------------------------- proxies


def openai_provider(**extra: Any) -> dict[str, Any]:
    return {"models": {"providers": {"up": {"api": "openai-completions", **extra}}}}


def test_env_proxies_read_as_urllib_reads_them() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1",
           "HTTP_PROXY": "http://h:1", "ALL_PROXY": "http://a:1", "no_proxy": "x",
           "FTP_PROXY": "", "ftp_proxy": "http://f:1", "NOT_A_PROXY_VAR": "v"}
    assert env_proxies(env) == {"https": "http://lower:1", "http": "http://h:1",
                                "all": "http://a:1", "no": "x", "ftp": "http://f:1"}
    assert "http" not in env_proxies({"HTTP_PROXY": "http://h:1", "REQUEST_METHOD": "GET"})


def test_proxy_for_a_url() -> None:
    env = {"HTTPS_PROXY": "http://p:3128", "ALL_PROXY": "http://all:1",
           "NO_PROXY": "localhost, .internal.example"}
    assert proxy_for("https://api.example/v1", env) == "http://p:3128"
    assert proxy_for("http://api.example/v1", env) == "http://all:1"
    assert proxy_for("https://localhost:8000/v1", env) is None
    assert proxy_for("https://llm.internal.example/v1", env) is None
    assert proxy_for("https://internal.example/v1", env) is None
    assert proxy_for("https://notinternal.example/v1", env) == "http://p:3128"
    assert proxy_for("https://api.example/v1", {**env, "NO_PROXY": "*"}) is None
    assert proxy_for("https://api.example/v1", {}) is None


@pytest.mark.parametrize("proxy", ["http://proxy:3128", "https://u:p@proxy:443", "proxy:3128"])
def test_http_and_https_proxies_are_accepted(proxy: str) -> None:
    parse(openai_provider(), HTTPS_PROXY=proxy)
    parse(openai_provider(baseUrl="http://llm.example/v1"), HTTP_PROXY=proxy)


@pytest.mark.parametrize(("variable", "base_url"), [
    ("HTTPS_PROXY", None), ("HTTPS_PROXY", "https://llm.example/v1"),
    ("HTTP_PROXY", "http://llm.example/v1"), ("ALL_PROXY", None)])
def test_an_unusable_proxy_is_a_config_error(variable: str, base_url: str | None) -> None:
    raw = openai_provider(**({"baseUrl": base_url} if base_url else {}))
    message = config_error(raw, **{variable: "socks5h://user:s3cret@proxy:1080"})
    assert f"models.providers.up: the proxy in {variable}" in message
    assert "socks5h://proxy:1080: only http:// and https:// proxies are supported" in message
    assert "s3cret" not in message


def test_a_malformed_proxy_is_a_config_error() -> None:
    message = config_error(openai_provider(), https_proxy="http://proxy:port")
    assert "the proxy in HTTPS_PROXY cannot be used: http://proxy:port" in message


def test_proxies_that_no_provider_uses_are_not_checked() -> None:
    socks = "socks5://proxy:1080"
    parse({}, HTTPS_PROXY=socks)  # echo only
    parse(openai_provider(baseUrl="https://llm.example/v1"), HTTP_PROXY=socks)
    parse(openai_provider(baseUrl="https://llm.example/v1"), HTTPS_PROXY=socks,
          NO_PROXY="example")


def test_cli_config_check_reports_an_unusable_proxy(tmp_path: Path) -> None:
    config = write(tmp_path / "c.json5", """{
      models: { providers: { claude: { api: "anthropic-messages" } } },
      agents: { defaults: { model: "claude/claude-x" } },
    }""")
    proc = run_check(tmp_path, config, HTTPS_PROXY="socks5://proxy:1080")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "models.providers.claude: the proxy in HTTPS_PROXY cannot be used" in proc.stderr


# --------------------------------------------------------------------------- bus.sync


@pytest.mark.parametrize(("value", "interval"), [
    ("default", None), ("always", "always"), ("10s", "10s"), ("500ms", "500ms"), ("2m", "2m"),
    ("1h", "1h"),
])
def test_bus_sync_values(value: str, interval: str | None) -> None:
    bus = parse({"bus": {"sync": value}}).bus
    assert bus.sync == value
    assert bus.sync_interval == interval


def test_bus_sync_default() -> None:
    assert parse({}).bus.sync == "default"
    assert parse({}).bus.sync_interval is None


@pytest.mark.parametrize("value", ["sometimes", "ALWAYS", "0s", "10", "10 s", "-1s", "1d", ""])
def test_bus_sync_invalid_names_the_key(value: str) -> None:
    message = config_error({"bus": {"sync": value}})
    assert "bus.sync" in message
    assert '"default", "always" or an interval like "10s"' in message


def test_bus_sync_must_be_a_string() -> None:
    assert "bus.sync" in config_error({"bus": {"sync": True}})


def test_cli_config_check_bus_sync(tmp_path: Path) -> None:
    good = run_check(tmp_path, write(tmp_path / "good.json5", "{bus: {sync: 'always'}}"))
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["bus"]["sync"] == "always"
    bad = run_check(tmp_path, write(tmp_path / "bad.json5", "{bus: {sync: 'sometimes'}}"))
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert "bus.sync" in bad.stderr and "'sometimes'" in bad.stderr
