"""What a session's history window becomes, built once and then extended run by run.

A session's run sends its whole history window upstream. The worker serves the
window from its cache as the same objects run after run (``workers/memo.py``),
and from one run to the next the window only grows at its end (the turn just
stored) and, once at its budget, loses items at its start. So what the previous
run's window became (its chat messages, the provider's encoded JSON) is kept,
and the next run's is cut from it and extended with what its new items
become: a slice and a join instead of a memo lookup per item, which with a long
window (hundreds of items, each lookup a cache miss in a large table) was the
largest share of a run's own work.

The proof that a kept value is this window's prefix is by identity: the new
window ends with some new items after one that ended the kept window, and
starts with an item of the kept window at the place its length says. A window
is a contiguous run of one session's items, the same objects while it is
cached, so two such runs that share both ends share everything between them.
Anything else (a window read again: new objects) is a miss, built afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Generic, TypeVar

K = TypeVar("K")  # an item of a window (a turn, a message)
P = TypeVar("P")  # what one item becomes
D = TypeVar("D")  # what a window becomes: its items' pieces joined

MAX_ENTRIES = 2048
MAX_SIZE = 64 * 1024 * 1024  # in ``size`` units, over all entries
MAX_NEW = 16  # items a window may have gained since the kept one


@dataclass(slots=True)
class _Kept(Generic[K, D]):
    items: Sequence[K]
    data: D
    # Where each item's piece ends, counted from a base that stays fixed as the
    # front is cut off (so cutting never rewrites them): item i ends at
    # ends[i] - base in ``data``.
    ends: list[int]
    base: int


class WindowMemo(Generic[K, P, D]):
    """What recent windows became, by their last item's identity.

    ``pieces(items)`` is what each item becomes (None: this window is not to be
    kept); ``size(piece)`` its length in ``data`` (with any separator after it);
    ``join(pieces)`` the window's value; ``concat(a, b)`` two values one after
    the other. Entries keep their items alive, so an id is never reused while
    its entry is kept."""

    __slots__ = ("_concat", "_entries", "_join", "_pieces", "_size", "_total")

    def __init__(self, pieces: Callable[[Sequence[K]], list[P] | None],
                 size: Callable[[P], int], join: Callable[[list[P]], D],
                 concat: Callable[[D, D], D]) -> None:
        self._pieces = pieces
        self._size = size
        self._join = join
        self._concat = concat
        self._entries: dict[int, _Kept[K, D]] = {}
        self._total = 0

    def __call__(self, items: Sequence[K]) -> D | None:
        """What the non-empty window ``items`` becomes (None: not to be kept)."""
        n = len(items)
        found = self._find(items)
        if found is None:
            pieces = self._pieces(items)
            if pieces is None:
                return None
            data = self._join(pieces)
            self._keep(items, data, list(accumulate(map(self._size, pieces))), 0)
            return data
        old, new = found
        cut = len(old.items) - (n - new)  # kept items the window dropped
        if new == 0 and cut == 0:
            return old.data  # the same window again (an agent's next tool round)
        start = old.base if cut == 0 else old.ends[cut - 1]
        data = old.data[start - old.base:]  # type: ignore[index]  # (D: bytes or tuple)
        ends = old.ends[cut:]
        if new:
            pieces = self._pieces(items[n - new:])
            if pieces is None:
                return None
            data = self._concat(data, self._join(pieces))
            offset = ends[-1]
            for piece in pieces:
                offset += self._size(piece)
                ends.append(offset)
        self._keep(items, data, ends, start)
        return data

    def _find(self, items: Sequence[K]) -> tuple[_Kept[K, D], int] | None:
        """A kept window this one extends, and how many items it gained (at least
        one kept item is in this window)."""
        n = len(items)
        entries = self._entries
        for new in range(min(MAX_NEW, n - 1) + 1):
            last = items[n - 1 - new]
            old = entries.get(id(last))
            if old is None or old.items[-1] is not last:
                continue
            cut = len(old.items) - (n - new)
            if 0 <= cut < len(old.items) and old.items[cut] is items[0]:
                return old, new
        return None

    def _keep(self, items: Sequence[K], data: D, ends: list[int], base: int) -> None:
        key = id(items[-1])
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self._total -= old.ends[-1] - old.base
        # (a tuple: a list the caller changed later would void the proof)
        entries[key] = _Kept(items if isinstance(items, tuple) else tuple(items), data, ends,
                             base)
        self._total += ends[-1] - base
        while len(entries) > MAX_ENTRIES or self._total > MAX_SIZE:
            oldest = entries.pop(next(iter(entries)))
            self._total -= oldest.ends[-1] - oldest.base
