"""The agent tools of one worker process (SPEC §9): every configured MCP server,
started once and shared by the runs of every agent that names it, and each
agent's view of their tools as the model sees them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson
from mcp.shared.exceptions import MCPError
from mcp.types import RequestParamsMeta

from bus.messages import ToolSpec
from clawbus import tracing
from clawbus.config import Settings

from ..metrics import WorkerMetrics
from .config import ServerKey, ToolLimits, server_key
from .errors import ServerUnavailable, describe
from .names import allowed, model_names
from .outcome import ToolOutcome, cut, result_text
from .server import McpServer

log = logging.getLogger("clawbus.mcp")

META_RUN_ID: Final = "clawbus/runId"
META_TOOL_CALL_ID: Final = "clawbus/toolCallId"


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """A configured MCP server as this worker last saw it: ``agents`` use it,
    ``tools`` it lists (None: never listed), ``problem`` why its last start failed
    (None: it did not)."""

    server: str
    transport: str
    agents: tuple[str, ...]
    tools: int | None
    problem: str | None


class _AgentView:
    """One agent's servers and, built from their current tool lists, the tools the
    model is offered and which server tool each name calls."""

    __slots__ = ("allow", "deny", "limits", "servers", "specs", "targets", "versions")

    def __init__(self, servers: tuple[McpServer, ...], allow: tuple[str, ...] | None,
                 deny: tuple[str, ...], limits: ToolLimits) -> None:
        self.servers = servers
        self.allow = allow
        self.deny = deny
        self.limits = limits
        self.versions: tuple[int, ...] | None = None
        self.specs: tuple[ToolSpec, ...] = ()
        self.targets: dict[str, tuple[McpServer, str]] = {}

    def current(self) -> _AgentView:
        """Rebuilt if a server's tool list changed since the last look."""
        versions = tuple(server.version for server in self.servers)
        if versions != self.versions:
            self._build()
            self.versions = versions
        return self

    def _build(self) -> None:
        listed = [(server, tool) for server in self.servers for tool in server.offered]
        names = model_names([(server.name, tool.name) for server, tool in listed])
        specs: list[ToolSpec] = []
        targets: dict[str, tuple[McpServer, str]] = {}
        for name, (server, tool) in zip(names, listed, strict=True):
            if not allowed(name, self.allow, self.deny):
                continue
            specs.append(ToolSpec(name=name, description=tool.description or None,
                                  parameters=tool.input_schema))
            targets[name] = (server, tool.name)
        self.specs = tuple(specs)
        self.targets = targets


class AgentTools:
    """One per worker process: the MCP servers of every agent, shared by that
    worker's runs.

    Lifecycle: :meth:`start` once (servers that fail are retried on later use),
    then :meth:`tools_for` / :meth:`call` from any number of runs, and
    :meth:`aclose` at shutdown. Tool and server failures never raise: they come
    back as error :class:`ToolOutcome`\\ s for the model.
    """

    def __init__(self, settings: Settings, env: Mapping[str, str],
                 metrics: WorkerMetrics | None = None) -> None:
        self._metrics = metrics
        self._servers: dict[ServerKey, McpServer] = {}
        self._agents: dict[str, _AgentView] = {}
        self._limits: dict[str, ToolLimits] = {}
        self._default_limits = ToolLimits.of(settings.agents.defaults.tools)
        for agent_id in settings.agent_ids:
            agent = settings.agent(agent_id)
            assert agent is not None
            tools = settings.agent_tools(agent)
            self._limits[agent_id] = ToolLimits.of(tools)
            if not tools.mcp_servers:
                continue
            servers = []
            for name, config in tools.mcp_servers.items():
                key = server_key(name, config)
                if key not in self._servers:
                    self._servers[key] = McpServer(name, config, env=env,
                                                   config_dir=settings.config_dir,
                                                   metrics=metrics)
                servers.append(self._servers[key])
            self._agents[agent_id] = _AgentView(tuple(servers), tools.allow, tools.deny,
                                                self._limits[agent_id])

    async def start(self) -> None:
        """Start every configured server, concurrently. One that fails is logged
        (a warning naming it and why), counted, and tried again on a later use;
        this never raises."""
        await asyncio.gather(*(server.refresh() for server in self._servers.values()))

    def limits(self, agent_id: str) -> ToolLimits:
        """The agent's ``maxRounds``, ``callTimeoutSeconds`` and ``resultMaxChars``."""
        return self._limits.get(agent_id, self._default_limits)

    async def tools_for(self, agent_id: str) -> tuple[ToolSpec, ...]:
        """The agent's tools as the model sees them (``<server>__<tool>``, filtered
        by its allow/deny), from the servers' cached lists. A server not running
        (not started yet, or its connection ended) is started first, one whose
        list changed is listed again; one whose last start failed is left out and
        started again in the background. Empty, after one dict lookup, for an
        agent without tools."""
        view = self._agents.get(agent_id)
        if view is None:
            return ()
        pending = [server.refresh() for server in view.servers if server.needs_refresh()]
        if pending:
            await asyncio.gather(*pending)
        return view.current().specs

    def owns(self, agent_id: str, name: str) -> bool:
        """Whether ``name`` is one of the agent's own tools (not a client tool)."""
        view = self._agents.get(agent_id)
        return view is not None and name in view.current().targets

    async def call(self, agent_id: str, name: str, arguments: str, *, run_id: str,
                   call_id: str) -> ToolOutcome:
        """Run the agent tool ``name`` with the model's JSON ``arguments``.

        The request carries ``_meta`` ``{"clawbus/runId", "clawbus/toolCallId"}``
        (and, with tracing on, the tool span's ``traceparent``/``tracestate``)
        and is bounded by the agent's ``callTimeoutSeconds``. Never raises for a
        tool or server failure (the outcome says what went wrong); a cancellation
        of the caller propagates and cancels the request in flight."""
        if not tracing.ENABLED:
            return await self._call_tool(agent_id, name, arguments, run_id, call_id)
        spans = tracing.spans()
        with spans.active(f"execute_tool {name}", attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                "gen_ai.tool.call.id": call_id}) as span:
            outcome = await self._call_tool(agent_id, name, arguments, run_id, call_id)
            if outcome.is_error:
                spans.failed(span, description=outcome.text[:200])
            return outcome

    async def _call_tool(self, agent_id: str, name: str, arguments: str, run_id: str,
                         call_id: str) -> ToolOutcome:
        started = time.monotonic()
        view = self._agents.get(agent_id)
        if view is None:
            return ToolOutcome(f"unknown tool {name!r}", True, 0.0)
        target = view.current().targets.get(name)
        if target is None:  # maybe a server not listed yet (no tools_for before)
            await self.tools_for(agent_id)
            target = view.current().targets.get(name)
        if target is None:
            return ToolOutcome(f"unknown tool {name!r}", True, time.monotonic() - started)
        server, tool = target
        limits = view.limits
        outcome = "error"
        try:
            parsed = _arguments(arguments)
            if isinstance(parsed, str):
                text, is_error = parsed, True
            else:
                fields = {META_RUN_ID: run_id, META_TOOL_CALL_ID: call_id}
                if tracing.ENABLED:
                    tracing.spans().inject(fields)  # traceparent, tracestate
                # An open TypedDict (PEP 728 extra_items), which mypy does not model yet.
                meta = cast(RequestParamsMeta, fields)
                text, is_error, outcome = await self._call(server, tool, parsed, meta,
                                                           limits.call_timeout_seconds)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            seconds = time.monotonic() - started
            if self._metrics is not None:
                self._metrics.tool_calls_by(server.name, tool, outcome).inc()
                self._metrics.tool_call_seconds_by(server.name).observe(seconds)
        return ToolOutcome(cut(text, limits.result_max_chars), is_error, seconds)

    async def _call(self, server: McpServer, tool: str, arguments: dict[str, Any],
                    meta: RequestParamsMeta, seconds: float) -> tuple[str, bool, str]:
        """(text, is_error, metric outcome) of one call, bounded by ``seconds``."""
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                result = await server.call(tool, arguments, meta)
        except TimeoutError:
            if not deadline.expired():
                raise
            return f"tool call timed out after {seconds:g} s", True, "timeout"
        except ServerUnavailable as exc:
            return str(exc), True, "error"
        except MCPError as exc:
            return f"tool call failed: {exc.message}", True, "error"
        except Exception as exc:  # the SDK's own checks (e.g. an invalid structured result)
            log.warning("MCP server %r: tool %r failed: %s", server.name, tool, describe(exc))
            return f"tool call failed: {describe(exc)}", True, "error"
        return result_text(result), result.is_error, "error" if result.is_error else "ok"

    def servers(self) -> tuple[ServerStatus, ...]:
        """Every configured server and how it stands (for reports)."""
        return tuple(
            ServerStatus(server.name, server.transport,
                         tuple(agent_id for agent_id, view in self._agents.items()
                               if server in view.servers),
                         None if server.tools is None else len(server.tools), server.problem)
            for server in self._servers.values())

    async def aclose(self) -> None:
        """Close every session; stdio children are stopped and reaped. Idempotent."""
        await asyncio.gather(*(server.aclose() for server in self._servers.values()))


def _arguments(text: str) -> dict[str, Any] | str:
    """The model's arguments as a JSON object, or why they are not one."""
    if not text.strip():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"the arguments are not valid JSON ({exc}); no call was made"
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        return f"the arguments must be a JSON object, not {kind}; no call was made"
    return value


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
