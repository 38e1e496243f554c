"""``clawbus tools list`` and ``clawbus config check`` with MCP servers (SPEC §9),
run as the real CLI in a subprocess against real MCP servers (stdio and HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.mcp_servers import HttpMcpServer, stdio_command
from tests.procs import write_config

REPO = Path(__file__).resolve().parent.parent
BAD = "error: MCP server 'bad' (stdio; agents: main) failed to start: cannot run " \
      "'/nonexistent/mcp-server': No such file or directory"


@pytest.fixture(scope="module")
def http_server() -> Iterator[HttpMcpServer]:
    with HttpMcpServer() as server:
        yield server


def config(tmp_path: Path, http_server: HttpMcpServer, *, bad: bool = True) -> Path:
    servers: dict[str, Any] = {
        "fs": {"command": stdio_command(), "cwd": str(REPO), "env": {"ROOT_TOKEN": "env-secret"}},
        "web": {"url": http_server.url, "headers": {"Authorization": "Bearer header-secret"}},
    }
    if bad:
        servers["bad"] = {"command": ["/nonexistent/mcp-server"]}
    return write_config(tmp_path / "clawbus.json5", {"agents": {"list": [
        {"id": "main", "default": True,
         "tools": {"mcpServers": servers, "deny": ["fs__crash", "web__*"],
                   "allow": ["fs__*", "web__add"]}},
        {"id": "other", "tools": {"mcpServers": {"web": servers["web"]},
                                  "allow": ["web__add", "web__b*"], "deny": ["web__boom"]}},
        {"id": "plain"},
    ]}})


def clawbus(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWBUS_", "OPENCLAW_"))}
    env.update({"HOME": str(tmp_path / "home"), "CLAWBUS_STATE_DIR": str(tmp_path / "state")})
    return subprocess.run([sys.executable, "-m", "clawbus", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_tools_list(tmp_path: Path, http_server: HttpMcpServer) -> None:
    proc = clawbus(tmp_path, "tools", "list", "--config", str(config(tmp_path, http_server)))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "agent main: 9 tools"
    assert "  fs__add(a, b)  Add two integers." in lines
    assert "  fs__slow(seconds, marker?)  Sleep, then answer." in lines
    assert not any("fs__crash" in line for line in lines)  # denied
    assert "agent other: 1 tool" in lines
    assert "  web__add(a, b)  Add two integers." in lines
    assert "agent plain: no tools" in lines
    assert lines[-1] == BAD
    assert "Traceback" not in proc.stderr


def test_tools_list_json_for_one_agent(tmp_path: Path, http_server: HttpMcpServer) -> None:
    proc = clawbus(tmp_path, "tools", "list", "--agent", "OTHER", "--json",
                   "--config", str(config(tmp_path, http_server)))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["failures"] == []
    [agent] = data["agents"]
    assert agent["id"] == "other"
    [tool] = agent["tools"]
    assert tool["name"] == "web__add"
    assert tool["description"] == "Add two integers.\nReturns their sum."
    assert tool["parameters"]["required"] == ["a", "b"]


def test_tools_list_failures_in_json(tmp_path: Path, http_server: HttpMcpServer) -> None:
    proc = clawbus(tmp_path, "tools", "list", "--agent", "main", "--json",
                   "--config", str(config(tmp_path, http_server)))
    assert proc.returncode == 1
    [failure] = json.loads(proc.stdout)["failures"]
    assert failure == {"server": "bad", "transport": "stdio", "agents": ["main"],
                       "error": "cannot run '/nonexistent/mcp-server': No such file or "
                                "directory"}


def test_tools_list_unknown_agent(tmp_path: Path, http_server: HttpMcpServer) -> None:
    proc = clawbus(tmp_path, "tools", "list", "--agent", "nobody",
                   "--config", str(config(tmp_path, http_server)))
    assert proc.returncode == 2
    assert "unknown agent 'nobody'" in proc.stderr


def test_config_check_starts_the_servers(tmp_path: Path, http_server: HttpMcpServer) -> None:
    proc = clawbus(tmp_path, "config", "check", "--config", str(config(tmp_path, http_server)))
    assert proc.returncode == 1
    for secret in ("env-secret", "header-secret"):
        assert secret not in proc.stdout + proc.stderr
    servers = json.loads(proc.stdout)["agents"]["list"][0]["tools"]["mcpServers"]
    assert servers["fs"]["env"] == {"ROOT_TOKEN": "***"}
    assert servers["web"]["headers"] == {"Authorization": "***"}
    lines = proc.stderr.splitlines()
    assert "MCP server 'fs' (stdio; agents: main): ok, 10 tools" in lines
    assert "MCP server 'web' (http; agents: main, other): ok, 10 tools" in lines
    assert BAD in lines
    assert "Traceback" not in proc.stderr


def test_config_check_good_servers(tmp_path: Path, http_server: HttpMcpServer) -> None:
    path = config(tmp_path, http_server, bad=False)
    proc = clawbus(tmp_path, "config", "check", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr


def test_config_check_without_tools_is_unchanged(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.json5", {"agents": {"list": [{"id": "main"}]}})
    proc = clawbus(tmp_path, "config", "check", "--config", str(path))
    assert proc.returncode == 0
    assert proc.stderr == ""
    data = json.loads(proc.stdout)
    assert "tools" not in data["agents"]["defaults"]
    assert "tools" not in data["agents"]["list"][0]
