"""What an agent tool call gives back to the model: :class:`ToolOutcome`, the
MCP result as text (:func:`result_text`), cut to the agent's ``resultMaxChars``."""

from __future__ import annotations

from dataclasses import dataclass

import mcp.types as mcp
import orjson


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """One agent tool call's result, as the model gets it.

    ``text``: the result as text (text parts joined; other parts described, e.g.
    ``[image: image/png]``; the structured content as JSON when no part is text),
    cut to ``resultMaxChars`` with a ``… [cut: N more characters]`` marker.
    ``is_error``: the tool reported an error, raised, timed out, or its server died
    or is unavailable. ``seconds``: how long the call took.
    """

    text: str
    is_error: bool
    seconds: float


def result_text(result: mcp.CallToolResult) -> str:
    """The text the model sees for an MCP tool result (before cutting)."""
    parts = [_part_text(part) for part in result.content]
    has_text = any(isinstance(part, mcp.TextContent) for part in result.content)
    if not has_text and result.structured_content is not None:
        parts.append(orjson.dumps(result.structured_content).decode())
    text = "\n".join(parts)
    if not text and result.is_error:
        return "the tool reported an error"
    return text


def _part_text(part: mcp.ContentBlock) -> str:
    if isinstance(part, mcp.TextContent):
        return part.text
    if isinstance(part, mcp.ImageContent):
        return f"[image: {part.mime_type}]"
    if isinstance(part, mcp.AudioContent):
        return f"[audio: {part.mime_type}]"
    if isinstance(part, mcp.ResourceLink):
        return f"[resource link: {part.uri}]"
    if isinstance(part, mcp.EmbeddedResource):
        resource = part.resource
        if isinstance(resource, mcp.TextResourceContents):
            return resource.text
        return f"[resource: {resource.uri}, {resource.mime_type or 'binary'}]"
    return f"[{part.type}]"


def cut(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters; else its first ``limit``
    characters and a marker saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [cut: {len(text) - limit} more characters]"
