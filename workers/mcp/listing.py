"""Agent tools as a report, for ``clawbus tools list`` and ``clawbus config check``:
the configured MCP servers started by a throwaway :class:`AgentTools`, each
agent's tools as the model sees them, and the servers that failed to start."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bus.messages import ToolSpec
from clawbus.config import Settings

from .toolbox import AgentTools, ServerStatus


@dataclass(frozen=True, slots=True)
class Listing:
    agents: dict[str, tuple[ToolSpec, ...]]
    servers: tuple[ServerStatus, ...]

    @property
    def failures(self) -> tuple[ServerStatus, ...]:
        return tuple(status for status in self.servers if status.problem is not None)


async def list_tools(settings: Settings, env: Mapping[str, str],
                     agent_ids: Sequence[str]) -> Listing:
    """Start the servers of ``agent_ids`` once, list their tools, close them."""
    tools = AgentTools(settings, env)
    try:
        specs = await asyncio.gather(*(tools.tools_for(agent_id) for agent_id in agent_ids))
        agents = dict(zip(agent_ids, specs, strict=True))
        servers = tuple(status for status in tools.servers()
                        if set(status.agents) & set(agent_ids))
        return Listing(agents, servers)
    finally:
        await tools.aclose()


def status_line(status: ServerStatus) -> str:
    """``MCP server 'fs' (stdio; agents: main): ok, 3 tools``, or an ``error:`` line
    saying why it failed to start."""
    where = f"MCP server {status.server!r} ({status.transport}; agents: " \
            f"{', '.join(status.agents)})"
    if status.problem is not None:
        return f"error: {where} failed to start: {status.problem}"
    return f"{where}: ok, {_count(status.tools or 0)}"


def _count(tools: int) -> str:
    return f"{tools} tool{'' if tools == 1 else 's'}" if tools else "no tools"


def render(listing: Listing) -> str:
    """Each agent's tools, one line each (name, parameters, first line of the
    description), then the servers that failed."""
    lines: list[str] = []
    for agent_id, specs in listing.agents.items():
        lines.append(f"agent {agent_id}: {_count(len(specs))}")
        lines += [f"  {spec.name}({', '.join(_parameters(spec))})  {_summary(spec)}".rstrip()
                  for spec in specs]
    lines += [status_line(status) for status in listing.failures]
    return "\n".join(lines)


def as_json(listing: Listing) -> dict[str, Any]:
    return {
        "agents": [{"id": agent_id,
                    "tools": [spec.model_dump(exclude_none=True) for spec in specs]}
                   for agent_id, specs in listing.agents.items()],
        "failures": [{"server": s.server, "transport": s.transport, "agents": list(s.agents),
                      "error": s.problem} for s in listing.failures],
    }


def _parameters(spec: ToolSpec) -> list[str]:
    """Parameter names, optional ones marked ``?``."""
    schema = spec.parameters or {}
    properties = schema.get("properties")
    required = schema.get("required") or ()
    if not isinstance(properties, dict):
        return []
    return [name if name in required else f"{name}?" for name in properties]


def _summary(spec: ToolSpec) -> str:
    return (spec.description or "").strip().partition("\n")[0]
