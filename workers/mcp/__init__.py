"""Agent tools served by MCP servers, run by the worker (SPEC §9).

- :mod:`.toolbox`: :class:`AgentTools`, the one object a worker uses (start,
  tools per agent, calls, close).
- :mod:`.server`: one MCP server's session, its owner task, restarts.
- :mod:`.names`: model-facing tool names and the allow/deny filter.
- :mod:`.outcome`: :class:`ToolOutcome`, MCP results as text for the model.
- :mod:`.config`: :class:`ToolLimits` and server identity, from the settings.
"""

from .config import ToolLimits
from .outcome import ToolOutcome
from .toolbox import AgentTools, ServerStatus

__all__ = ["AgentTools", "ServerStatus", "ToolLimits", "ToolOutcome"]
