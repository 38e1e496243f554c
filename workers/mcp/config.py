"""What the MCP client layer reads from the settings: an agent's loop limits
(:class:`ToolLimits`) and the identity of a configured server (:func:`server_key`)."""

from __future__ import annotations

from dataclasses import dataclass

from clawbus.config import AgentToolsConfig, McpServerConfig

ServerKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ToolLimits:
    """An agent's tool-loop limits (``tools.maxRounds``, ``callTimeoutSeconds``,
    ``resultMaxChars``)."""

    max_rounds: int
    call_timeout_seconds: float
    result_max_chars: int

    @classmethod
    def of(cls, tools: AgentToolsConfig) -> ToolLimits:
        return cls(tools.max_rounds, tools.call_timeout_seconds, tools.result_max_chars)


def server_key(name: str, config: McpServerConfig) -> ServerKey:
    """One session per key: agents naming the same server with the same config
    share it; the same name with another config is another server."""
    return name, config.model_dump_json()
