"""A session's run published as its head: the proof, carried by the run message
itself, that no earlier run of the session can still be waiting.

A session's runs execute in the order of their ``RUNS`` stream sequences: a run
may start only while it is the oldest run of its session still stored (the
*head*). A worker normally asks the stream leader for that before it starts a
run. But most of a session's runs are published when the session has no other
run stored at all (its client waits for one turn before it sends the next), and
then the run is the head from the moment it is stored until it leaves the stream:
every later run of the session gets a higher sequence.

So a gateway publishes a session's run *conditionally* first, with
``Nats-Expected-Last-Subject-Sequence: 0`` — stored only if no message is stored
on the session's subject — and, if JetStream refuses it (another run of the
session is stored), publishes it again plainly. JetStream keeps the header with
the stored message and delivers it with every delivery, so a worker that finds
it there knows the run is its session's head without asking
(:func:`published_as_head`). The header cannot be forged by a later run: the
server stored the message only because the condition held.

A retried publish (the first one's ack lost) that JetStream refuses for the
condition goes out plainly and is deduplicated by its ``Nats-Msg-Id``: the
stored message, with its header, is the one that counts.
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.js.errors import APIError

from .connection import EXPECTED_LAST_SUBJECT_SEQ, WRONG_LAST_SEQUENCE

_NONE_STORED = "0"


def as_head(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` for the conditional publish: stored only as the session's head."""
    return {**headers, EXPECTED_LAST_SUBJECT_SEQ: _NONE_STORED}


def not_head(exc: BaseException) -> bool:
    """Was a conditional publish refused because the session has a run stored?"""
    return isinstance(exc, APIError) and exc.err_code in WRONG_LAST_SEQUENCE


def published_as_head(headers: Mapping[str, str] | None) -> bool:
    """Does a delivered run message carry the proof that it is its session's head?"""
    return headers is not None and headers.get(EXPECTED_LAST_SUBJECT_SEQ) == _NONE_STORED


class BusySessions:
    """A gateway's guess of which sessions have a run stored, so that it does not
    publish their runs conditionally only to be refused (two publishes instead of
    one, in a hot session). A guess costs nothing in correctness either way: a run
    published plainly is checked by its worker, one refused is published again.

    Busy: the gateway has a run of the session under way, or a conditional publish
    for it was refused less than :attr:`memory` seconds ago (another gateway's
    run). Bounded: the oldest refusals are forgotten first."""

    __slots__ = ("_live", "_refused", "limit", "memory")

    def __init__(self, memory: float = 1.0, limit: int = 4096) -> None:
        self.memory = memory
        self.limit = limit
        self._live: dict[str, int] = {}
        self._refused: dict[str, float] = {}

    def busy(self, session_key: str, now: float) -> bool:
        if session_key in self._live:
            return True
        until = self._refused.get(session_key)
        if until is None:
            return False
        if now < until:
            return True
        del self._refused[session_key]
        return False

    def started(self, session_key: str) -> None:
        self._live[session_key] = self._live.get(session_key, 0) + 1

    def ended(self, session_key: str) -> None:
        left = self._live.get(session_key, 0) - 1
        if left > 0:
            self._live[session_key] = left
        else:
            self._live.pop(session_key, None)

    def refused(self, session_key: str, now: float) -> None:
        self._refused.pop(session_key, None)  # (re-inserted: the newest)
        self._refused[session_key] = now + self.memory
        while len(self._refused) > self.limit:
            del self._refused[next(iter(self._refused))]
