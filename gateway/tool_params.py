"""Validating a request's client tools: ``tools``, ``tool_choice`` and
``parallel_tool_calls`` (SPEC §7), into the bus's :class:`ToolSpec` and
:class:`ToolChoice`. Pure; every failure is a 400 naming the field."""

from __future__ import annotations

import re
from typing import Any

from bus.messages import ToolChoice, ToolSpec

from .errors import invalid_request

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

TOOLS_NOT_ARRAY = "`tools` must be an array."
TOOL_CHOICE_INVALID = (
    '`tool_choice` must be "auto", "none", "required" or '
    '{"type": "function", "function": {"name": ...}}.')
TOOL_CHOICE_NEEDS_TOOLS = '`tool_choice` "required" needs `tools`.'
PARALLEL_NOT_BOOL = "`parallel_tool_calls` must be a boolean."


def parse_tools(body: dict[str, Any]) -> tuple[tuple[ToolSpec, ...], ToolChoice | None]:
    """(the tools, the tool choice) of a request body; ``()`` and None when absent."""
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid_request(PARALLEL_NOT_BOOL)
    if parallel is not None and tools:
        choice = (choice or ToolChoice()).model_copy(update={"parallel": parallel})
    return tools, choice


def _tools(raw: object) -> tuple[ToolSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid_request(TOOLS_NOT_ARRAY)
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"`tools[{i}]`"
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("type") != "function" \
                or not isinstance(function, dict):
            raise invalid_request(f"{where} must be a function tool "
                                  '({"type": "function", "function": {...}}).')
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            raise invalid_request(
                f"`tools[{i}].function.name` must match ^[A-Za-z0-9_-]{{1,64}}$.")
        if name in seen:
            raise invalid_request(f"`tools` has a duplicate function name '{name}'.")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid_request(f"`tools[{i}].function.description` must be a string.")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid_request(f"`tools[{i}].function.parameters` must be an object.")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid_request(f"`tools[{i}].function.strict` must be a boolean.")
        specs.append(ToolSpec(name=name, description=description, parameters=parameters,
                              strict=strict))
    return tuple(specs)


def _tool_choice(raw: object, tools: tuple[ToolSpec, ...]) -> ToolChoice | None:
    if raw is None:
        return None
    if raw in ("auto", "none"):
        return ToolChoice(mode="auto" if raw == "auto" else "none")
    if raw == "required":
        if not tools:
            raise invalid_request(TOOL_CHOICE_NEEDS_TOOLS)
        return ToolChoice(mode="required")
    function = raw.get("function") if isinstance(raw, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(name, str):
        raise invalid_request(TOOL_CHOICE_INVALID)
    if all(tool.name != name for tool in tools):
        raise invalid_request(f"`tool_choice` names a function that is not in `tools`: '{name}'.")
    return ToolChoice(mode="function", name=name)
