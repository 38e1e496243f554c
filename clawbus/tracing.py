"""The tracing switch: one module-level boolean that every hot path checks.

Tracing (SPEC §13) is off unless :func:`clawbus.telemetry.setup` turned it on
for this process. While off, no span is built, no header added, and nothing of
OpenTelemetry is even imported: call sites read :data:`ENABLED` and only then
ask :func:`spans` for the helpers (:class:`clawbus.spans.Spans`)::

    if tracing.ENABLED:
        tracing.spans().inject(headers)
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spans import Attributes, Kind, Span, Spans

__all__ = ["ENABLED", "disable", "enable", "span", "spans"]

ENABLED = False
_spans: Spans | None = None


def spans() -> Spans:
    """The tracing helpers; only while :data:`ENABLED`."""
    assert _spans is not None, "tracing is off"
    return _spans


def enable(helpers: Spans) -> None:
    global ENABLED, _spans  # noqa: PLW0603 - the switch is this module's state
    _spans = helpers
    ENABLED = True


def disable() -> None:
    global ENABLED, _spans  # noqa: PLW0603 - the switch is this module's state
    ENABLED = False
    _spans = None


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def span(name: str, *, kind: Kind = "internal",
         attributes: Attributes | None = None) -> AbstractContextManager[Span | None]:
    """A span current for a ``with`` block when tracing is on (see
    :meth:`clawbus.spans.Spans.active`); a no-op, building nothing, when off."""
    if not ENABLED:
        return _OFF
    return spans().active(name, kind=kind, attributes=attributes)
