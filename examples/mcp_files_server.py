"""A small read-only filesystem MCP server, for the README's agent-tools example.

It serves two tools over stdio — ``list_files`` and ``read_file`` — confined to
the directory in ``$ROOT`` (default: the current directory): a path that leaves
it is refused. Written with the official ``mcp`` SDK; run by a clawbus worker as
``python mcp_files_server.py`` (see ``examples/agent-tools.json5``).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

ROOT = Path(os.environ.get("ROOT", ".")).resolve()
MAX_BYTES = 64 * 1024

server: MCPServer = MCPServer("files", log_level="WARNING")


def _inside(path: str) -> Path:
    target = (ROOT / path).resolve()
    if target != ROOT and ROOT not in target.parents:
        raise ToolError(f"{path!r} is outside the served directory")
    return target


@server.tool(description="List the files and directories under a directory (default: the root).")
def list_files(path: str = ".") -> list[str]:
    directory = _inside(path)
    if not directory.is_dir():
        raise ToolError(f"{path!r} is not a directory")
    return sorted(f"{p.name}/" if p.is_dir() else p.name for p in directory.iterdir())


@server.tool(description="Read a text file (at most 64 KB).")
def read_file(path: str) -> str:
    target = _inside(path)
    if not target.is_file():
        raise ToolError(f"{path!r} is not a file")
    return target.read_bytes()[:MAX_BYTES].decode("utf-8", errors="replace")


if __name__ == "__main__":
    anyio.run(server.run_stdio_async)
