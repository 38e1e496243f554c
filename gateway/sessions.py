"""Session management served from the shared JetStream state, so any gateway
answers for any session: list sessions, read a transcript, reset one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus import subjects
from bus.leases import Leases
from bus.messages import ChatItem, Turn
from bus.transcripts import Transcripts

LIST_LIMIT = 500
LOOKUP_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class SessionSummary:
    key: str
    agent_id: str
    turns: int
    last_activity: float

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "agentId": self.agent_id, "turns": self.turns,
                "lastActivity": self.last_activity}


class Sessions:
    def __init__(self, js: JetStreamContext, nc: Client | None = None) -> None:
        self._js = js
        self._nc = nc
        self._transcripts = Transcripts(js, nc)
        self._leases = Leases(js, ttl_seconds=0)  # (only touched here: no lease taken)

    async def summaries(self, limit: int = LIST_LIMIT) -> list[SessionSummary]:
        """Sessions with at least one turn, most recently active first."""
        info = await self._js.stream_info(subjects.TX_STREAM,
                                          subjects_filter=subjects.transcripts_all())
        counts: dict[str, int] = dict(info.state.subjects or {})
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def summary(subject: str, turns: int) -> SessionSummary | None:
            async with gate:
                try:
                    last = await self._js.get_last_msg(subjects.TX_STREAM, subject)
                except NotFoundError:
                    return None
            turn = Turn.model_validate_json(last.data or b"")
            key = subjects.session_key_from_token(subjects.last_token(subject))
            return SessionSummary(key, turn.agent_id, turns, turn.ts)

        found = await asyncio.gather(*(summary(s, n) for s, n in counts.items()))
        result = sorted((s for s in found if s is not None),
                        key=lambda s: s.last_activity, reverse=True)
        return result[:limit]

    async def history(self, session_key: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The transcript as chat messages (user, assistant, …), oldest first."""
        turns, _ = await self._transcripts.load(subjects.session_token(session_key))
        messages: list[dict[str, Any]] = []
        for turn in turns:
            common = {"ts": turn.ts, "runId": turn.run_id}
            if not turn.structured():
                messages.append({"role": "user", "content": turn.user, **common})
            else:  # tool results and agent tool steps are messages of their own
                messages.extend(_item(item, common) for item in turn.input_items())
                messages.extend(_item(item, common) for item in turn.steps)
            final = _item(turn.reply_item(), common)
            final["usage"] = turn.usage.model_dump() | {"total_tokens": turn.usage.total_tokens}
            messages.append(final)
        if limit is not None:
            messages = messages[-limit:] if limit > 0 else []
        return messages

    async def reset(self, session_key: str) -> None:
        token = subjects.session_token(session_key)
        await self._transcripts.reset(token)
        # Workers keep a session's history between its runs for as long as its
        # lease's free marker is the one they wrote: a new one makes them read again.
        await self._leases.touch(token)
        if self._nc is not None:
            # ... and a worker keeping the lease itself between runs
            # (workers/warm_leases.py) hears it here. Flushed before the reset
            # returns: the server has it queued for every worker before any run
            # published after the reset, and workers handle it in message order.
            await self._nc.publish(subjects.session_reset(token), b"")
            await self._nc.flush()


def _item(item: ChatItem, common: dict[str, Any]) -> dict[str, Any]:
    """One structured transcript message as ``chat.history`` shows it."""
    message: dict[str, Any] = {"role": item.role, "content": item.text, **common}
    if item.tool_calls:
        message["toolCalls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                                for c in item.tool_calls]
    if item.role == "tool":
        message["toolCallId"] = item.tool_call_id
        message["name"] = item.name
    return message
