"""Errors of the MCP client layer. They stay inside it: :class:`AgentTools`
turns each into an error :class:`~workers.mcp.outcome.ToolOutcome` for the model,
so a tool or server failure never fails a run."""

from __future__ import annotations


class ServerUnavailable(Exception):
    """An MCP server could not be started, or its connection ended mid-use."""

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(f"MCP server {server!r} is unavailable: {reason}")
        self.server = server
        self.reason = reason


def describe(exc: BaseException) -> str:
    """A one-line reason for a log line or a tool result: the innermost error of
    an exception group of one, as ``Type: message``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, ServerUnavailable):
        return exc.reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
