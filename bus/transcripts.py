"""Session transcripts in JetStream: stream ``TX``, one subject per session, one
message per completed turn (user input and assistant reply together, so a turn
is stored atomically: there is never a half turn).

Appends carry ``Nats-Expected-Last-Subject-Sequence`` = the last sequence the
writer read, so a stale writer (a worker that lost its lease) is rejected, and
``Nats-Msg-Id`` = the run id, so a retried publish is not stored twice.

**The history window.** A run sees only the newest turns that fit the history
budget, so a worker reads only those (:meth:`Transcripts.load_window`): every
turn a worker appends carries, in headers, where the window that ends with it
starts (``Clawbus-Window-Start``: the stream sequence of its oldest turn, 0 when
the new turn is the whole window) and for which budget (``Clawbus-Window-Budget``).
The next run reads the last turn, then only from that sequence on: a run's cost
does not grow with the session's length. Turns without the headers (written by an older
version, or by :meth:`Transcripts.record`), or a budget larger than the one
recorded, fall back to reading the whole transcript.

**Large turns.** A turn too large for one bus message is stored in the
``clawbus_turns`` object bucket (:mod:`bus.payloads`); the transcript holds a
stub naming it, which readers replace with the stored turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError

from . import subjects
from .connection import EXPECTED_LAST_SUBJECT_SEQ, JS_TIMEOUT, WRONG_LAST_SEQUENCE, stored_seq
from .messages import Turn
from .nats_adapter import (
    AckedPublisher,
    BatchGetter,
    LeaderGet,
    Requester,
    StoredMsg,
    consumer_name,
)
from .payloads import TURNS_BUCKET, Objects, fits

READ_TIMEOUT = 10.0
WINDOW_START = "Clawbus-Window-Start"
WINDOW_BUDGET = "Clawbus-Window-Budget"


@dataclass(slots=True)
class Window:
    """The newest turns of a session that fit a history budget, oldest first."""

    turns: list[Turn] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)  # the stream sequence of each turn
    last: Turn | None = None  # the newest stored turn, whether or not it fits
    last_seq: int = 0  # its sequence: what the next append expects (0: none)
    budget: int = 0
    chars: int = -1  # what ``turns`` cost against the budget (-1: count them)

    def __post_init__(self) -> None:
        if self.chars < 0:
            self.chars = sum(t.size() for t in self.turns)

    def after(self, turn: Turn, seq: int) -> Window:
        """The window the next run sees once ``turn`` is stored at ``seq`` (what
        :meth:`Transcripts.load_window` would then read): this one's turns and
        ``turn``, less the oldest until they fit the budget (the same suffix as
        :func:`within_budget`, counting only the new turn and the dropped ones)."""
        turns, seqs = [*self.turns, turn], [*self.seqs, seq]
        chars, drop = self.chars + turn.size(), 0
        while chars > self.budget and drop < len(turns):
            chars -= turns[drop].size()
            drop += 1
        return Window(turns[drop:], seqs[drop:], turn, seq, self.budget, chars)


class StaleTranscriptError(Exception):
    """Someone appended to the session since this writer read it."""


class Transcripts:
    """A session's turns on the ``TX`` stream. With the NATS connection, the last
    turn is read from the leader and the others with batched direct gets
    (:mod:`bus.nats_adapter`); without it, or when the replica that
    answered lags, with nats-py's ``get_msg`` and an ordered consumer deleted
    after the read."""

    def __init__(self, js: JetStreamContext, nc: Client | None = None,
                 publisher: AckedPublisher | None = None) -> None:
        self._js = js
        self._nc = nc
        # Reads share the publisher's reply subscription when there is one.
        requester = publisher or (Requester(nc) if nc is not None else None)
        self._getter = BatchGetter(requester) if requester is not None else None
        self._leader = LeaderGet(requester, wait=JS_TIMEOUT) if requester is not None else None
        self._publisher = publisher
        self._bodies = Objects(js, TURNS_BUCKET)

    async def _encoded(self, turn: Turn) -> bytes:
        """The turn as stored: itself, or a stub naming its object if it is too large."""
        data = turn.model_dump_json().encode()
        if self._nc is None or fits(len(data), self._nc.max_payload):
            return data
        name = f"turn-{turn.run_id}"
        await self._bodies.put(name, data)
        stub = Turn(run_id=turn.run_id, agent_id=turn.agent_id, user="", assistant="",
                    ts=turn.ts, usage=turn.usage, body=name)
        return stub.model_dump_json().encode()

    async def _whole(self, turns: list[Turn]) -> list[Turn]:
        """``turns`` with each stub replaced by the turn it names."""
        if not any(t.body for t in turns):
            return turns
        return [Turn.model_validate_json(await self._bodies.get(t.body)) if t.body else t
                for t in turns]

    async def _last(self, token: str) -> StoredMsg | None:
        """The session's last turn, read from the stream leader (never stale)."""
        subject = subjects.transcript(token)
        if self._leader is not None:
            return await self._leader.last(subjects.TX_STREAM, subject)
        try:
            msg = await self._js.get_msg(subjects.TX_STREAM, subject=subject, direct=False)
        except NotFoundError:
            return None
        if msg.seq is None:
            return None
        return StoredMsg(int(msg.seq), subject, msg.data or b"", msg.headers or {})

    async def last_seq(self, token: str) -> int:
        last = await self._last(token)
        return 0 if last is None else last.seq

    async def load(self, token: str) -> tuple[list[Turn], int]:
        """All stored turns of a session, oldest first, and the last sequence read."""
        last = await self.last_seq(token)
        if last == 0:
            return [], 0
        read = await self._read(token, 0, last)
        return await self._whole([t for _, t in read]), max(last, read[-1][0] if read else 0)

    async def _read(self, token: str, start: int, last: int) -> list[tuple[int, Turn]]:
        """The session's turns from stream sequence ``start`` (0: the first) up to
        ``last`` (which exists), with their sequences."""
        if self._getter is not None:
            got = await self._getter.read(subjects.TX_STREAM, subjects.transcript(token),
                                          start, last, wait=READ_TIMEOUT)
            if got is not None:
                return [(seq, Turn.model_validate_json(data)) for seq, data in got]
        return await self._read_with_consumer(token, start, last)

    async def _read_with_consumer(self, token: str, start: int,
                                  last: int) -> list[tuple[int, Turn]]:
        config = (js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                                        opt_start_seq=start) if start > 0
                  else js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL))
        read: list[tuple[int, Turn]] = []
        sub = await self._js.subscribe(
            subjects.transcript(token), stream=subjects.TX_STREAM, ordered_consumer=True,
            config=config)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                while True:
                    msg = await sub.next_msg(timeout=READ_TIMEOUT)
                    meta = msg.metadata
                    read.append((meta.sequence.stream, Turn.model_validate_json(msg.data)))
                    if meta.sequence.stream >= last or meta.num_pending == 0:
                        return read
        finally:
            await sub.unsubscribe()
            # Unsubscribing leaves the consumer on the server until it is reaped,
            # and JetStream refuses new ones past its limit: delete it now.
            name = consumer_name(sub)
            if name is not None:
                with contextlib.suppress(Exception):
                    await self._js.delete_consumer(subjects.TX_STREAM, name)

    async def load_window(self, token: str, budget_chars: int) -> Window:
        """The turns a run sees (see the module doc), reading only those when the
        last turn says where they start."""
        last = await self._last(token)
        if last is None:
            return Window(budget=budget_chars)
        last_seq = last.seq
        last_turn = Turn.model_validate_json(last.data)
        start = _window_start(last.headers, budget_chars)
        if start == 0:
            read = [(last_seq, last_turn)]
        else:
            read = await self._read(token, start or 0, last_seq)
        if any(t.body for _, t in read):  # large turns: read their objects
            whole = await self._whole([t for _, t in read])
            read = [(seq, t) for (seq, _), t in zip(read, whole, strict=True)]
            last_turn = read[-1][1]  # (read always ends with the last turn)
        kept = within_budget([t for _, t in read], budget_chars)
        seqs = [seq for seq, _ in read[len(read) - len(kept):]]
        return Window(kept, seqs, last_turn, max(last_seq, read[-1][0]), budget_chars)

    async def append(self, token: str, turn: Turn, expected_last_seq: int,
                     window: Window | None = None) -> int:
        """Store ``turn`` if the session's last turn is still ``expected_last_seq``;
        with the ``window`` it was generated from, the new turn says where the next
        run's window starts."""
        headers = {
            EXPECTED_LAST_SUBJECT_SEQ: str(expected_last_seq),
            "Nats-Msg-Id": f"turn-{turn.run_id}",
        }
        if window is not None:
            seqs = window.after(turn, 0).seqs  # (0: the new turn's, unknown yet)
            headers[WINDOW_START] = str(seqs[0] if len(seqs) > 1 else 0)
            headers[WINDOW_BUDGET] = str(window.budget)
        try:
            return await stored_seq(self._js, self._publisher, subjects.transcript(token),
                                    await self._encoded(turn), headers)
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise StaleTranscriptError(str(exc)) from None
            raise

    async def record(self, token: str, turn: Turn) -> None:
        """Store a turn without waiting for the store's ack (for ephemeral sessions,
        which nobody reads back through the API: a core publish onto the stream's
        subject, deduplicated by run id like :meth:`append`)."""
        if self._nc is None:
            raise RuntimeError("Transcripts.record needs the NATS connection")
        await self._nc.publish(
            subjects.transcript(token), await self._encoded(turn),
            headers={"Nats-Msg-Id": f"turn-{turn.run_id}"})

    async def reset(self, token: str) -> None:
        last = await self.last_seq(token)
        stubs = [t for _, t in await self._read(token, 0, last)] if last else []
        await self._js.purge_stream(subjects.TX_STREAM, subject=subjects.transcript(token))
        for turn in stubs:
            if turn.body:
                await self._bodies.delete(turn.body)


def _window_start(headers: dict[str, str] | None, budget_chars: int) -> int | None:
    """Where the window recorded on a turn starts (0: the turn alone), or None if
    the whole transcript must be read."""
    if not headers:
        return None
    try:
        start = int(headers.get(WINDOW_START, ""))
        budget = int(headers.get(WINDOW_BUDGET, ""))
    except ValueError:
        return None
    return start if start >= 0 and budget >= budget_chars else None


def within_budget(turns: list[Turn], budget_chars: int) -> list[Turn]:
    """The newest turns whose text fits the budget (oldest dropped first), in order."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(turns):
        size = turn.size()
        if used + size > budget_chars:
            break
        kept.append(turn)
        used += size
    kept.reverse()
    return kept
