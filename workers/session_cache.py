"""A worker's recently served sessions: their history windows, kept between runs.

A session's transcript only changes through the holder of its lease (every
append is a compare-and-set on the transcript, made by the lease holder; a
session reset marks the lease too: ``bus/leases.py`` ``Leases.touch``). So a
window this worker read or extended while holding the lease stays exact for as
long as nobody else has written the lease since. The worker proves that with the
lease itself, at no extra cost: it keeps the revision of the ``free`` marker it
wrote when it let the lease go, and its next acquire is a compare-and-set
*at that revision* (``SessionLease.acquire(..., expected=rev)``). If that
succeeds, nobody held the lease in between and the cached window is served
without reading the transcript; if it fails, the entry is dropped and the window
read again. A window is never served stale.

While the worker holds the lease (a run in progress, or the lease handed
straight to the session's next run held here) the entry is current by
construction: the runs extend it with each turn they store.

Bounded: least recently used sessions go first, past :data:`MAX_SESSIONS`
entries or :data:`MAX_CHARS` characters of turns.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from bus.transcripts import Window

MAX_SESSIONS = 2048
MAX_CHARS = 32 * 1024 * 1024


@dataclass(slots=True)
class _Entry:
    window: Window
    chars: int
    # The revision of the free marker this worker wrote on release: the entry
    # is good for an acquire at exactly that revision. 0 while the lease is held.
    rev: int = 0
    # Every run of the session up to this ``RUNS`` sequence is gone (served or
    # dropped): a fact that never stops being true (sequences are not reused).
    gone: int = 0


def _chars(window: Window) -> int:
    chars = window.chars
    if window.last is not None and (not window.turns or window.turns[-1] is not window.last):
        chars += window.last.size()  # (a last turn too large for the window)
    return chars


class SessionCache:
    __slots__ = ("_chars", "_entries", "max_chars", "max_sessions")

    def __init__(self, max_sessions: int = MAX_SESSIONS, max_chars: int = MAX_CHARS) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._chars = 0
        self.max_sessions = max_sessions
        self.max_chars = max_chars

    def __len__(self) -> int:
        return len(self._entries)

    def released_at(self, token: str) -> int:
        """The lease revision an acquire should expect to find the cached window
        valid (0: nothing cached for the session)."""
        entry = self._entries.get(token)
        return 0 if entry is None else entry.rev

    def gone_through(self, token: str) -> int:
        """The session's runs up to this ``RUNS`` sequence are gone (0: unknown)."""
        entry = self._entries.get(token)
        return 0 if entry is None else entry.gone

    def window(self, token: str, budget: int) -> Window | None:
        """The cached window of a session whose lease we hold and whose cache is
        proven current (see the module doc); None if there is none to serve."""
        entry = self._entries.get(token)
        if entry is None or entry.window.budget != budget:
            return None
        self._entries.move_to_end(token)
        entry.rev = 0  # held again: no acquire may rely on the old marker
        return entry.window

    def current(self, token: str) -> bool:
        """Was the session's entry read or extended under the lease held now (rather
        than kept from before it)?"""
        entry = self._entries.get(token)
        return entry is not None and entry.rev == 0

    def put(self, token: str, window: Window) -> None:
        """The session's window as of now, while we hold its lease."""
        old = self._entries.get(token)
        self.drop(token)
        entry = _Entry(window, _chars(window), gone=0 if old is None else old.gone)
        if entry.chars > self.max_chars:
            return
        self._entries[token] = entry
        self._chars += entry.chars
        while len(self._entries) > self.max_sessions or self._chars > self.max_chars:
            _, oldest = self._entries.popitem(last=False)
            self._chars -= oldest.chars

    def released(self, token: str, rev: int, *, unbroken: bool, gone: int = 0) -> None:
        """We let the lease go, writing its free marker at ``rev``, knowing the
        session's runs up to ``gone`` are gone. The entry stays good for an acquire
        there if it was current under this hold: read or extended during it, or
        carried over a hold taken at our own marker (``unbroken``); otherwise it
        is dropped."""
        entry = self._entries.get(token)
        if entry is None:
            return
        if entry.rev == 0 or unbroken:
            entry.rev = rev
            entry.gone = max(entry.gone, gone)
        else:
            self.drop(token)

    def drop(self, token: str) -> None:
        entry = self._entries.pop(token, None)
        if entry is not None:
            self._chars -= entry.chars
