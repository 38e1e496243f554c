"""Session transcripts in JetStream: stream ``TX``, one subject per session, one
message per completed turn (user input and assistant reply together, so a turn
is stored atomically: there is never a half turn).

Appends carry ``Nats-Expected-Last-Subject-Sequence`` = the last sequence the
writer read, so a stale writer (a worker that lost its lease) is rejected, and
``Nats-Msg-Id`` = the run id, so a retried publish is not stored twice.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError

from . import subjects
from .messages import Turn

_WRONG_LAST_SEQUENCE = (10071, 10164)
READ_TIMEOUT = 10.0


class StaleTranscriptError(Exception):
    """Someone appended to the session since this writer read it."""


class Transcripts:
    def __init__(self, js: JetStreamContext, nc: Client | None = None) -> None:
        self._js = js
        self._nc = nc

    async def last_seq(self, token: str) -> int:
        try:
            msg = await self._js.get_msg(
                subjects.TX_STREAM, subject=subjects.transcript(token), direct=False)
        except NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def load(self, token: str) -> tuple[list[Turn], int]:
        """All stored turns of a session, oldest first, and the last sequence read."""
        last = await self.last_seq(token)
        if last == 0:
            return [], 0
        turns: list[Turn] = []
        sub = await self._js.subscribe(
            subjects.transcript(token), stream=subjects.TX_STREAM, ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                while True:
                    msg = await sub.next_msg(timeout=READ_TIMEOUT)
                    meta = msg.metadata
                    turns.append(Turn.model_validate_json(msg.data))
                    if meta.sequence.stream >= last or meta.num_pending == 0:
                        return turns, max(last, meta.sequence.stream)
        finally:
            await sub.unsubscribe()

    async def append(self, token: str, turn: Turn, expected_last_seq: int) -> int:
        try:
            ack = await self._js.publish(
                subjects.transcript(token), turn.model_dump_json().encode(),
                headers={
                    "Nats-Expected-Last-Subject-Sequence": str(expected_last_seq),
                    "Nats-Msg-Id": f"turn-{turn.run_id}",
                },
            )
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise StaleTranscriptError(str(exc)) from None
            raise
        return int(ack.seq)

    async def record(self, token: str, turn: Turn) -> None:
        """Store a turn without waiting for the store's ack (for ephemeral sessions,
        which nobody reads back through the API: a core publish onto the stream's
        subject, deduplicated by run id like :meth:`append`)."""
        if self._nc is None:
            raise RuntimeError("Transcripts.record needs the NATS connection")
        await self._nc.publish(
            subjects.transcript(token), turn.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"turn-{turn.run_id}"})

    async def reset(self, token: str) -> None:
        await self._js.purge_stream(subjects.TX_STREAM, subject=subjects.transcript(token))


def within_budget(turns: list[Turn], budget_chars: int) -> list[Turn]:
    """The newest turns whose text fits the budget (oldest dropped first), in order."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(turns):
        size = len(turn.user) + len(turn.assistant)
        if used + size > budget_chars:
            break
        kept.append(turn)
        used += size
    kept.reverse()
    return kept
