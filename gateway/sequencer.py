"""What a client is shown of one run's events, in order: a pure state machine.

A run's events arrive over core NATS (at most once) from whichever worker runs
the current attempt. :class:`Sequencer` turns them into what the client sees:
exactly one ``Accepted``, then text ``Delta``s, then exactly one ``Done`` or
``Failed`` (an embeddings run: ``Embedded`` instead of ``Done``). It needs no
bus and no clock, so every case is tested on its own (``tests/test_sequencer.py``):

- **Attempts.** Each event carries the attempt (the delivery count of the run
  message). Events of an older attempt are dropped (its worker died or was
  fenced). A newer attempt before any text reached the client replaces the
  old one transparently; after text was shown, it would duplicate text, so the
  run fails as interrupted. Only an attempt that started (its ``Accepted``,
  text or end) takes over: ``Queued`` notices and heartbeats never do.
- **Gaps.** Events of an attempt are numbered from 1 (heartbeats and queued
  notices carry 0 and are not numbered). A missing number means an event was
  lost on the way (e.g. a NATS node died with it in its buffers): no more
  deltas are relayed, and the final ``Done``, which carries the whole reply,
  supplies the missing tail, so the client still gets the text exactly once.
- **Acceptance.** A stateless run may skip its ``accepted`` notice: its first
  text or its end says a worker took it, and an ``Accepted`` is shown first.
- **Tool calls.** Streamed tool-call pieces (``ToolDelta``) count as shown
  output like text; after a gap, the final ``Done`` (which carries the calls
  whole) supplies what the client has not seen of each call. Agent tool steps
  (``ToolEvent``) are shown as they come but are not reply output: a retry
  before any text stays transparent (its steps are shown again).
"""

from __future__ import annotations

from bus.messages import (
    Accepted,
    Delta,
    Done,
    Embedded,
    Failed,
    Heartbeat,
    Queued,
    ToolCallChunk,
    ToolDelta,
    ToolEvent,
)

RunEvent = Accepted | Delta | ToolDelta | ToolEvent | Done | Embedded | Failed | Heartbeat

_NOTHING: tuple[RunEvent, ...] = ()


def failure(status: int, error_type: str, message: str, code: str) -> Failed:
    """A failure the gateway itself reports for a run (not sent by a worker)."""
    return Failed(seq=0, attempt=0, status=status, error_type=error_type, message=message,
                  code=code)


class Sequencer:
    """Feeds on one run's events (:meth:`feed`); see the module doc."""

    __slots__ = ("_next_seq", "accepted", "attempt", "ended", "gaps", "interrupted",
                 "resync", "sent", "sent_calls", "streamed")

    def __init__(self) -> None:
        self.attempt = 0
        self._next_seq = 1
        self.accepted = False  # an Accepted was shown
        self.streamed = False  # text was shown
        self.ended = False  # the final event was shown
        self.interrupted = False  # a newer attempt came after text was shown
        self.resync = False  # an event was lost: finish from the final text
        self.gaps = 0
        self.sent = 0  # characters of reply text shown
        self.sent_calls: dict[int, int] = {}  # tool call index → argument characters shown

    def feed(self, event: RunEvent | Queued) -> tuple[RunEvent, ...]:
        """What to show the client for ``event``, in order (often nothing or the
        event itself). After a final event (``Done``/``Failed``), feed no more."""
        if event.attempt < self.attempt:
            return _NOTHING  # a stale attempt
        if isinstance(event, Queued | Heartbeat):
            # Signs of life, never the switch to a newer attempt: a copy of the
            # run that a worker holds but has not started (it may be a duplicate
            # delivery that will never run) must not end the attempt that does.
            return _NOTHING
        if event.attempt > self.attempt:
            if self.streamed:
                self.interrupted = self.ended = True
                return (failure(503, "api_error",
                                "agent run interrupted: its worker was lost mid-reply",
                                "interrupted"),)
            self.attempt = event.attempt
            self._next_seq = 1
            self.resync = False
        if event.seq != self._next_seq and not self.resync:
            self.resync = True
            self.gaps += 1
        self._next_seq = event.seq + 1
        if not self.accepted:
            self.accepted = True
            if isinstance(event, Accepted):
                return (event,)
            first = Accepted(seq=event.seq, attempt=event.attempt, worker_id="")
            return (first, *self._show(event))
        if isinstance(event, Accepted):
            return _NOTHING  # a notice that came after the text
        return self._show(event)

    def retire(self, attempt: int) -> None:
        """``attempt`` was handed to another worker before it showed any text: its
        late events are dropped from now on, and the next attempt starts afresh."""
        if attempt >= self.attempt and not self.streamed:
            self.attempt = attempt + 1
            self._next_seq = 1
            self.resync = False

    def _show(self, event: Delta | ToolDelta | ToolEvent | Done | Embedded | Failed) \
            -> tuple[RunEvent, ...]:
        if isinstance(event, Delta):  # (first: one per streamed token)
            if self.resync:
                return _NOTHING
            self.sent += len(event.text)
            self.streamed = True
            return (event,)
        if isinstance(event, ToolEvent):
            return _NOTHING if self.resync else (event,)
        if isinstance(event, ToolDelta):
            if self.resync:
                return _NOTHING
            for chunk in event.calls:
                self.sent_calls[chunk.index] = \
                    self.sent_calls.get(chunk.index, 0) + len(chunk.arguments)
            self.streamed = True
            return (event,)
        self.ended = True
        if not self.resync or not isinstance(event, Done):
            return (event,)
        tail: list[RunEvent] = []
        if len(event.text) > self.sent:
            tail.append(Delta(seq=event.seq, attempt=event.attempt, text=event.text[self.sent:]))
        calls = [_rest(i, call.id, call.name, call.arguments, self.sent_calls.get(i))
                 for i, call in enumerate(event.tool_calls)]
        calls = [c for c in calls if c is not None]
        if calls:
            tail.append(ToolDelta(seq=event.seq, attempt=event.attempt, calls=tuple(calls)))
        if tail:
            self.streamed = True
        return (*tail, event)


def _rest(index: int, call_id: str, name: str, arguments: str,
          shown: int | None) -> ToolCallChunk | None:
    """What the client has not seen of a tool call (``shown``: None if nothing)."""
    if shown is None:
        return ToolCallChunk(index=index, id=call_id, name=name, arguments=arguments)
    if len(arguments) > shown:
        return ToolCallChunk(index=index, arguments=arguments[shown:])
    return None
