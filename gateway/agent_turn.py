"""Validating an ``agent`` turn as the WebSocket protocol and ``clawbus agent``
send it (``{message, agentId?, sessionKey?, extraSystemPrompt?}``) into the
same :class:`~gateway.runs.RunSpec` the HTTP endpoint produces."""

from __future__ import annotations

from typing import Any

from clawbus.config import AGENT_ID_RE, Settings

from .chat_request import MAX_SESSION_KEY, RESERVED_SESSION_KEY, is_reserved_session_key
from .errors import invalid_request
from .runs import RunSpec


def main_session_key(agent_id: str) -> str:
    """An agent's default conversation (as OpenClaw's ``agent`` command uses)."""
    return f"agent:{agent_id}:main"


def agent_turn(params: Any, settings: Settings) -> RunSpec:
    """Raises ApiError (400) on the first invalid field."""
    if not isinstance(params, dict):
        raise invalid_request("`params` must be an object.")
    message = params.get("message")
    if not isinstance(message, str) or not message.strip():
        raise invalid_request("`message` must be a non-empty string.")
    raw_agent = params.get("agentId")
    if raw_agent is None:
        agent_id = settings.default_agent_id
    elif isinstance(raw_agent, str):
        agent_id = raw_agent.strip().lower()
        if not AGENT_ID_RE.match(agent_id) or settings.agent(agent_id) is None:
            raise invalid_request(f"Unknown agent '{agent_id}'.")
    else:
        raise invalid_request("`agentId` must be a string.")
    raw_key = params.get("sessionKey")
    if raw_key is None or (isinstance(raw_key, str) and not raw_key.strip()):
        session_key = main_session_key(agent_id)
    elif isinstance(raw_key, str):
        session_key = raw_key.strip()
        if len(session_key) > MAX_SESSION_KEY:
            raise invalid_request(f"`sessionKey` is longer than {MAX_SESSION_KEY} characters.")
        if is_reserved_session_key(session_key):
            raise invalid_request(RESERVED_SESSION_KEY.replace(
                "`x-openclaw-session-key`", "`sessionKey`"))
    else:
        raise invalid_request("`sessionKey` must be a string.")
    extra = params.get("extraSystemPrompt", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise invalid_request("`extraSystemPrompt` must be a string.")
    return RunSpec(agent_id=agent_id, session_key=session_key, message=message.strip(),
                   extra_system_prompt=extra)
