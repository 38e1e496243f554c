"""The README's agent-tools example works as documented: its config loads, its
filesystem MCP server starts and lists its tools through `clawbus tools list`,
reads a file and refuses a path outside its root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clawbus.config import load_settings
from workers.mcp.toolbox import AgentTools

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "agent-tools.json5"
# As the README says: the server's `python` is the one with the mcp SDK.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_tools_list_as_in_the_readme() -> None:
    out = subprocess.run([sys.executable, "-m", "clawbus", "tools", "list", "--config",
                          str(CONFIG)], capture_output=True, text=True, env=ENV, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "files__list_files(path?)" in out.stdout
    assert "files__read_file(path)" in out.stdout


async def test_the_server_reads_inside_its_root_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", ENV["PATH"])  # (the MCP SDK passes this process's PATH on)
    tools = AgentTools(load_settings(CONFIG, env={}), ENV)
    try:
        await tools.start()
        ok = await tools.call("main", "files__read_file", '{"path": "hello.txt"}',
                              run_id="r", call_id="c1")
        assert (ok.text, ok.is_error) == ("Hello from the files MCP server.\n", False)
        outside = await tools.call("main", "files__read_file", '{"path": "../README.md"}',
                                   run_id="r", call_id="c2")
        assert outside.is_error and "outside the served directory" in outside.text
    finally:
        await tools.aclose()
