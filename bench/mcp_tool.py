"""The MCP tool of the benchmark's tool-round scenario: a stdio server (the
official ``mcp`` SDK's, as ``examples/mcp_files_server.py``) with one tool,
``echo``, that answers at once with its ``text`` argument::

    python -m bench.mcp_tool            # serves over stdio (a worker starts it)
    python -m bench.mcp_tool --time 200 # the tool alone: 200 calls from an MCP client

``--time N`` starts the server the way a worker does (stdio, the SDK's client),
makes N ``tools/call`` requests one after another and prints, as JSON, their round
trip in milliseconds (:func:`time_calls`): what a call of this tool costs without
clawbus, subtracted from the measured cost of a tool round.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio
import orjson

from .stats import summary

TOOL = "echo"


def build_server() -> Any:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("bench", log_level="WARNING")

    @server.tool(description="Answer with the text it was given, at once.")
    def echo(text: str = "") -> str:
        return text

    return server


def command(cpus: str | None = None) -> list[str]:
    """The server's command line (under ``taskset -c cpus`` when given)."""
    cmd = [sys.executable, "-m", "bench.mcp_tool"]
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


async def time_calls(calls: int, cpus: str | None = None, cwd: str | None = None,
                     warmup: int = 20) -> dict[str, Any]:
    """``calls`` sequential ``tools/call`` round trips to a fresh stdio server (after
    ``warmup`` unmeasured ones); their summary in milliseconds."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    cmd = command(cpus)
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], cwd=cwd)
    times: list[float] = []
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        for k in range(warmup + calls):
            t0 = time.perf_counter()
            result = await session.call_tool(TOOL, {"text": f"r{k}"})
            elapsed = (time.perf_counter() - t0) * 1000.0
            if result.is_error:
                raise RuntimeError(f"the bench tool failed: {result}")
            if k >= warmup:
                times.append(elapsed)
    return {"calls": calls, "call_ms": summary(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mcp_tool", description=__doc__
                                     and __doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=None, metavar="N",
                        help="time N calls from an MCP client instead of serving")
    parser.add_argument("--cpus", default=None, help="with --time: taskset the server")
    args = parser.parse_args(argv)
    if args.time is not None:
        result = anyio.run(time_calls, args.time, args.cpus)
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    anyio.run(build_server().run_stdio_async)


if __name__ == "__main__":
    main()
