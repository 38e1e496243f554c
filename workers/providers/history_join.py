"""A session's history, encoded for a provider once and then extended run by run.

A session's run sends its whole history window upstream. The worker serves the
window from its cache as the same message objects run after run
(``workers/memo.py``), and from one run to the next the window only grows at
its end (the turn just stored) and, once at its budget, loses turns at its
start. So the encoded history (each message's JSON, joined with commas) of the
previous run is kept, and the next run's is cut from it and extended with the
new messages: one slice and one join instead of a lookup per message, which
with a long window (hundreds of messages, each lookup a cache miss in a large
table) was the largest share of a run's own work.

The proof that a kept encoding is this history's prefix is by identity: the new
history ends with some new messages after one that ended the kept history, and
starts with a message of the kept history at the place its length says. A
history is a contiguous run of one session's messages, the same objects while
the window is cached, so two such runs that share both ends share everything
between them. Anything else (a window read again, new objects) is a miss, and
is encoded from the per-message memo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Generic, TypeVar

M = TypeVar("M")

MAX_ENTRIES = 2048
MAX_BYTES = 64 * 1024 * 1024
MAX_NEW = 16  # messages a history may have gained since the kept one


@dataclass(slots=True)
class _Joined(Generic[M]):
    messages: Sequence[M]
    data: bytes
    # Offsets of each message's end, counted from a base that stays fixed as the
    # front is cut off (so cutting never rewrites them): message i ends at
    # ends[i] - base in ``data``; the next starts one comma later.
    ends: list[int]
    base: int


class HistoryJoin(Generic[M]):
    """The encoded histories of recent runs, by their last message's identity."""

    __slots__ = ("_bytes", "_encode", "_entries")

    def __init__(self, encode: Callable[[Sequence[M]], list[bytes]]) -> None:
        self._encode = encode  # messages → each one's JSON
        self._entries: dict[int, _Joined[M]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def joined(self, messages: Sequence[M]) -> bytes:
        """``b",".join(each message's JSON)`` for a non-empty ``messages``."""
        n = len(messages)
        kept = self._find(messages)
        if kept is None:
            pieces = self._encode(messages)
            data = b",".join(pieces)
            ends = [end + i for i, end in enumerate(accumulate(map(len, pieces)))]
            self._keep(messages, data, ends, 0)
            return data
        old, new = kept
        cut = len(old.messages) - (n - new)  # kept messages the window dropped
        if new == 0 and cut == 0:
            return old.data  # the same history again (an agent's next tool round)
        start = old.base if cut == 0 else old.ends[cut - 1] + 1
        data = old.data[start - old.base:]  # (at least one kept message: see _find)
        ends = old.ends[cut:]
        if new:
            pieces = self._encode(messages[n - new:])
            data = data + b"," + b",".join(pieces)
            offset = ends[-1]
            for piece in pieces:
                offset += 1 + len(piece)
                ends.append(offset)
        self._keep(messages, data, ends, start)
        return data

    def _find(self, messages: Sequence[M]) -> tuple[_Joined[M], int] | None:
        """A kept history this one extends, and how many messages it gained."""
        n = len(messages)
        entries = self._entries
        for new in range(min(MAX_NEW, n - 1) + 1):
            last = messages[n - 1 - new]
            old = entries.get(id(last))
            if old is None or old.messages[-1] is not last:
                continue
            cut = len(old.messages) - (n - new)
            if 0 <= cut < len(old.messages) and old.messages[cut] is messages[0]:
                return old, new
        return None

    def _keep(self, messages: Sequence[M], data: bytes, ends: list[int], base: int) -> None:
        key = id(messages[-1])
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.data)
        entries[key] = _Joined(messages, data, ends, base)
        self._bytes += len(data)
        while len(entries) > MAX_ENTRIES or self._bytes > MAX_BYTES:
            oldest = entries.pop(next(iter(entries)))
            self._bytes -= len(oldest.data)
