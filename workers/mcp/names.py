"""Model-facing names of agent tools (SPEC §9) and the allow/deny filter.

A tool ``read`` of the server ``files`` is offered to the model as
``files__read``. Providers take function names of ``[A-Za-z0-9_-]{1,64}``, so
other characters become ``_``, names are cut to 64 characters, and a name that
would collide with another of the same agent gets a ``_2``, ``_3``, ... suffix.
Names that need none of this are never changed by another tool's presence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fnmatch import fnmatchcase

MAX_NAME = 64
SEPARATOR = "__"
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_-]")


def model_names(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The model-facing name of each ``(server, tool)`` pair, in the same order,
    all distinct."""
    natural = [f"{server}{SEPARATOR}{tool}" for server, tool in pairs]
    names: list[str | None] = [None] * len(pairs)
    taken: set[str] = set()
    # Names already valid keep themselves; only the rewritten ones may move aside.
    for i, name in enumerate(natural):
        if len(name) <= MAX_NAME and not _NOT_ALLOWED.search(name) and name not in taken:
            names[i] = name
            taken.add(name)
    for i, name in enumerate(natural):
        if names[i] is None:
            free = _free(_NOT_ALLOWED.sub("_", name)[:MAX_NAME], taken)
            names[i] = free
            taken.add(free)
    return [name for name in names if name is not None]


def _free(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"_{n}"
        candidate = base[:MAX_NAME - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def allowed(name: str, allow: Sequence[str] | None, deny: Sequence[str]) -> bool:
    """Whether the model-facing ``name`` passes the agent's globs: ``deny`` wins;
    without ``allow`` every other name passes (case-sensitive :func:`fnmatchcase`)."""
    if any(fnmatchcase(name, pattern) for pattern in deny):
        return False
    return allow is None or any(fnmatchcase(name, pattern) for pattern in allow)
