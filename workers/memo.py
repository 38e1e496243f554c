"""Per-object memos for the prompt a session's history becomes.

A worker serves a session's history window from its cache (workers/session_cache.py)
as the same :class:`~bus.messages.Turn` objects run after run, so what each turn
becomes on the way upstream (chat messages, then a provider's JSON dicts) can be
worked out once per turn instead of once per run: with a long history that was most
of a run's own work. Keys are object identities; each entry keeps its object, so
an id is never reused while it is cached. Only pure functions of immutable
objects may be memoised this way, and their results must not be mutated.

:meth:`IdentityMemo.many` looks a whole history up at once: since an entry keeps
its key alive, an entry found under a live object's id is that object's, so the
lookups need no Python-level step per item (a 230-turn window: ~4x less work).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

SIZE = 16_384
_VALUE = itemgetter(1)


class IdentityMemo(Generic[K, V]):
    __slots__ = ("_entries", "_fn", "_size")

    def __init__(self, fn: Callable[[K], V], size: int = SIZE) -> None:
        self._fn = fn
        self._size = size
        self._entries: dict[int, tuple[K, V]] = {}

    def __call__(self, key: K) -> V:
        entry = self._entries.get(id(key))
        if entry is not None and entry[0] is key:
            return entry[1]
        value = self._fn(key)
        entries = self._entries
        if len(entries) >= self._size:  # the oldest goes first
            del entries[next(iter(entries))]
        entries[id(key)] = (key, value)
        return value

    def many(self, keys: Sequence[K]) -> list[V]:
        """``[self(key) for key in keys]``, with the hits looked up in C."""
        entries = self._entries
        found = list(map(entries.get, map(id, keys)))
        if None in found:
            for i, entry in enumerate(found):
                if entry is None:
                    key = keys[i]
                    found[i] = (key, self(key))
        return list(map(_VALUE, found))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._entries)
