"""Real MCP servers for the agent-tools tests, written with the official SDK's
``MCPServer`` (mcp 2's name for FastMCP).

One set of tools, served two ways:

- over stdio, as a child process: ``python -m tests.fakes.mcp_servers stdio``;
- over streamable HTTP on a free loopback port, by uvicorn in a thread
  (:class:`HttpMcpServer`): the socket is bound and listening before the thread
  starts, so a client may connect at once (the kernel queues the connection until
  uvicorn accepts it) and no readiness wait is needed.

The tools: ``add``, ``echo_env`` (an environment variable as the server sees it),
``slow`` (hangs; with ``marker`` it writes ``started`` to that file, then
``cancelled`` when its call is cancelled), ``boom`` (raises), ``crash`` (the
process exits mid-call), ``exit_soon`` (the process exits just after answering),
``meta`` (the request's ``_meta`` as JSON), ``picture`` (an image and a text part),
``pid`` (the server's process id) and ``add_tool`` (registers a tool and sends
``notifications/tools/list_changed``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from starlette.types import Receive, Scope, Send

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def build_server(name: str = "fake") -> MCPServer:
    """A fresh server with every tool of the module docstring."""
    server: MCPServer = MCPServer(name, log_level="WARNING")

    @server.tool(description="Add two integers.\nReturns their sum.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="The value of an environment variable inside the server.")
    def echo_env(name: str) -> str:
        return os.environ.get(name, "")

    @server.tool(description="Sleep, then answer.")
    async def slow(seconds: float, marker: str = "") -> str:
        if marker:
            await anyio.Path(marker).write_text("started")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            if marker:
                with anyio.CancelScope(shield=True):  # (or this await is cancelled too)
                    await anyio.Path(marker).write_text("cancelled")
            raise
        return "done"

    @server.tool(description="Always fails.")
    def boom() -> str:
        raise ToolError("boom went the tool")

    @server.tool(description="Kills the server process in the middle of the call.")
    def crash() -> str:
        os._exit(3)

    @server.tool(description="Answers, then the server process exits (idle, between calls).")
    def exit_soon() -> str:
        threading.Timer(0.2, os._exit, args=(4,)).start()
        return "bye"

    @server.tool(description="The _meta of this request.")
    def meta(ctx: Context) -> str:
        received = ctx.request_context.meta
        return json.dumps(dict(received) if received else {})

    @server.tool(description="A picture and a caption.", structured_output=False)
    def picture() -> list[Any]:
        return ["a red dot", Image(data=PNG_1PX, format="png")]

    @server.tool(description="The server's process id.")
    def pid() -> int:
        return os.getpid()

    @server.tool(description="Register a tool named `name` and announce the change.")
    async def add_tool(name: str, ctx: Context) -> str:
        def added() -> str:
            return f"I am {name}"

        server.add_tool(added, name=name, description=f"Added at run time: {name}")
        await ctx.session.send_tool_list_changed()
        return "added"

    return server


class HttpMcpServer:
    """The tools over streamable HTTP at :attr:`url`, uvicorn in a thread."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/mcp"
        # The headers of the last HTTP request (lower-case names).
        self.seen_headers: dict[str, str] = {}
        inner = build_server("fake-http").streamable_http_app()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.seen_headers = {k.decode().lower(): v.decode()
                                     for k, v in scope["headers"]}
            await inner(scope, receive, send)

        config = uvicorn.Config(app, log_level="warning", lifespan="on", loop="asyncio",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="mcp-http-server")

    def __enter__(self) -> HttpMcpServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


def children_of(pid: int) -> dict[int, str]:
    """The child processes of ``pid``: ``{pid: state}`` from /proc (state ``Z``: a
    zombie, exited and never reaped), to check that stdio servers are cleaned up."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]  # (the name may hold spaces)
        if int(ppid) == pid:
            found[int(entry.name)] = state
    return found


def stdio_command() -> list[str]:
    """The command line of a stdio server of these tools."""
    return [sys.executable, "-m", "tests.fakes.mcp_servers", "stdio"]


def main(argv: list[str]) -> None:
    if argv[1:] != ["stdio"]:
        sys.exit("usage: python -m tests.fakes.mcp_servers stdio")
    anyio.run(build_server("fake-stdio").run_stdio_async)


if __name__ == "__main__":
    main(sys.argv)
