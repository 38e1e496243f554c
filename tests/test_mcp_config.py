"""The agent-tools keys of the config (SPEC §9): ``tools`` in ``agents.defaults``
and per agent, MCP servers (stdio or streamable HTTP), and how an agent's tools
merge with the defaults'."""

from __future__ import annotations

import json
from typing import Any

import pytest

from clawbus.config import (
    AgentToolsConfig,
    ConfigError,
    McpServerConfig,
    Settings,
    masked,
    parse_settings,
)


def parse(raw: dict[str, Any]) -> Settings:
    return parse_settings(raw, env={})


def error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    return str(info.value)


def agent_tools(tools: dict[str, Any], defaults: dict[str, Any] | None = None) -> Settings:
    agents: dict[str, Any] = {"list": [{"id": "main", "tools": tools}, {"id": "other"}]}
    if defaults is not None:
        agents["defaults"] = {"tools": defaults}
    return parse({"agents": agents})


def effective(settings: Settings, agent_id: str = "main") -> AgentToolsConfig:
    agent = settings.agent(agent_id)
    assert agent is not None
    return settings.agent_tools(agent)


def test_defaults() -> None:
    tools = effective(parse({}), "main")
    assert tools == AgentToolsConfig()
    assert (tools.mcp_servers, tools.allow, tools.deny) == ({}, None, ())
    assert (tools.max_rounds, tools.call_timeout_seconds, tools.result_max_chars) == \
        (8, 60.0, 16_000)


def test_stdio_and_http_servers() -> None:
    tools = effective(agent_tools({
        "mcpServers": {
            "files": {"command": ["python", "-m", "fs"], "env": {"ROOT": "/srv"}, "cwd": "/srv"},
            "search-2": {"url": "https://example.com/mcp",
                         "headers": {"Authorization": "Bearer x"}},
        },
        "allow": ["files__*", "search-2__query"], "deny": ["files__delete"],
        "maxRounds": 3, "callTimeoutSeconds": 2.5, "resultMaxChars": 100,
    }))
    files = tools.mcp_servers["files"]
    assert files == McpServerConfig(command=("python", "-m", "fs"), env={"ROOT": "/srv"},
                                    cwd="/srv")
    assert tools.mcp_servers["search-2"].url == "https://example.com/mcp"
    assert tools.allow == ("files__*", "search-2__query")
    assert tools.deny == ("files__delete",)
    assert (tools.max_rounds, tools.call_timeout_seconds, tools.result_max_chars) == \
        (3, 2.5, 100)


@pytest.mark.parametrize(("server", "message"), [
    ({"command": ["x"], "url": "http://h/mcp"}, "not both"),
    ({}, "set command (a stdio server) or url (a streamable-HTTP server)"),
    ({"env": {"A": "b"}}, "set command"),
    ({"command": []}, "command must name a program"),
    ({"command": [""]}, "command must name a program"),
    ({"command": "python -m fs"}, "command"),
    ({"url": "ftp://h/mcp"}, "is not an http:// or https:// URL"),
    ({"url": "http://h/mcp", "env": {"A": "b"}}, "env and cwd apply to stdio servers"),
    ({"url": "http://h/mcp", "cwd": "/srv"}, "env and cwd apply to stdio servers"),
    ({"command": ["x"], "headers": {"A": "b"}}, "headers apply to streamable-HTTP servers"),
    ({"url": "http://h/mcp", "headers": {"bad name": "b"}}, "is not an HTTP token"),
    ({"command": ["x"], "env": {"1BAD": "b"}}, "is not an environment variable name"),
    ({"command": ["x"], "args": ["y"]}, "unknown key"),
])
def test_bad_servers(server: dict[str, Any], message: str) -> None:
    text = error({"agents": {"list": [{"id": "main", "tools": {"mcpServers": {"s": server}}}]}})
    assert "agents.list[0].tools.mcpServers.s" in text
    assert message in text


@pytest.mark.parametrize("name", ["", "a b", "a.b", "x" * 33, "ü"])
def test_bad_server_names(name: str) -> None:
    text = error({"agents": {"defaults": {"tools": {"mcpServers": {name: {"command": ["x"]}}}}}})
    assert "agents.defaults.tools.mcpServers" in text
    assert "does not match [A-Za-z0-9_-]{1,32}" in text


@pytest.mark.parametrize("name", ["a", "A-b_9", "x" * 32])
def test_good_server_names(name: str) -> None:
    tools = effective(agent_tools({"mcpServers": {name: {"command": ["x"]}}}))
    assert list(tools.mcp_servers) == [name]


@pytest.mark.parametrize(("key", "value"), [
    ("maxRounds", 0), ("callTimeoutSeconds", 0), ("resultMaxChars", 99), ("allow", "x*"),
    ("maxRounds", 1.5),
])
def test_bad_limits(key: str, value: Any) -> None:
    assert f"agents.list[0].tools.{key}" in error(
        {"agents": {"list": [{"id": "main", "tools": {key: value}}]}})


def test_merge_servers_and_settings() -> None:
    settings = agent_tools(
        {"mcpServers": {"b": {"url": "http://agent/mcp"}, "c": {"command": ["c"]}},
         "deny": ["c__*"], "callTimeoutSeconds": 5},
        defaults={"mcpServers": {"a": {"command": ["a"]}, "b": {"command": ["b"]}},
                  "allow": ["*"], "deny": ["a__x"], "maxRounds": 2, "callTimeoutSeconds": 30})
    main = effective(settings)
    assert list(main.mcp_servers) == ["a", "b", "c"]
    assert main.mcp_servers["b"] == McpServerConfig(url="http://agent/mcp")  # the agent's wins
    assert main.allow == ("*",)  # not set by the agent: the defaults'
    assert main.deny == ("c__*",)  # set by the agent: its own, not joined
    assert (main.max_rounds, main.call_timeout_seconds) == (2, 5.0)
    other = effective(settings, "other")  # no tools of its own
    assert other == settings.agents.defaults.tools


def test_an_agent_can_clear_the_defaults_allow() -> None:
    settings = agent_tools({"allow": None}, defaults={"allow": ["a__*"]})
    assert effective(settings).allow is None


def test_the_default_agent_gets_the_default_tools() -> None:
    settings = parse({"agents": {"defaults": {"tools": {"mcpServers": {"a": {"command": ["a"]}}}}}})
    assert list(effective(settings, "main").mcp_servers) == ["a"]


def test_masked_hides_server_env_and_headers() -> None:
    settings = agent_tools(
        {"mcpServers": {"web": {"url": "http://h/mcp", "headers": {"Authorization": "hdr-1"}}},
         "maxRounds": 4},
        defaults={"mcpServers": {"fs": {"command": ["fs"], "env": {"KEY": "env-1"}}}})
    data = masked(settings)
    assert "hdr-1" not in json.dumps(data) and "env-1" not in json.dumps(data)
    assert data["agents"]["defaults"]["tools"]["mcpServers"]["fs"]["env"] == {"KEY": "***"}
    # an agent's tools show what it sets, not defaults that would hide the merge
    assert data["agents"]["list"][0]["tools"] == {
        "mcpServers": {"web": {"url": "http://h/mcp", "headers": {"Authorization": "***"}}},
        "maxRounds": 4}
    assert "tools" not in data["agents"]["list"][1]
    again = parse(json.loads(json.dumps(data)))  # what config check prints loads again
    assert effective(again).max_rounds == 4


def test_masked_without_tools_shows_none() -> None:
    data = masked(parse({"agents": {"list": [{"id": "main"}]}}))
    assert "tools" not in data["agents"]["defaults"]
    assert "tools" not in data["agents"]["list"][0]
