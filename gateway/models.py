"""The model ids clawbus advertises on ``/v1/models`` (SPEC §3)."""

from __future__ import annotations

from clawbus.config import Settings


def model_ids(settings: Settings) -> list[str]:
    """``openclaw``, ``openclaw/default``, then ``openclaw/<agentId>`` per agent."""
    return ["openclaw", "openclaw/default", *(f"openclaw/{a}" for a in settings.agent_ids)]
