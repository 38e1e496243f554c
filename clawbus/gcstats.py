"""Garbage-collector pauses as a Prometheus histogram.

A collection stops the process: a young one walks what was allocated since the
last, a full one every tracked object, and a pause is a stall for every stream
the process serves. ``prometheus-client``'s ``python_gc_*`` metrics count
collections but not their length: :class:`GCPauses` adds
``clawbus_gc_pause_seconds{generation}``, timed from ``gc.callbacks`` (wall time:
on a shared core, the time the process could not serve).
"""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

GENERATIONS = ("0", "1", "2")


class _Pauses:
    """One registry's histogram, its per-generation children made up front: the
    callback runs inside the collector, and creating a labelled child there would
    take the metric's (non-reentrant) lock while allocating."""

    def __init__(self, histogram: Histogram) -> None:
        self.by_generation = [histogram.labels(g) for g in GENERATIONS]


# Every histogram fed by the one callback (a process may hold several registries:
# the tests run several apps in one process). Dropped with their metrics objects.
_pauses: weakref.WeakSet[_Pauses] = weakref.WeakSet()
_started: list[float] = [0.0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - _started[0]
    generation = info.get("generation")
    if not isinstance(generation, int) or not 0 <= generation < len(GENERATIONS):
        return
    for pauses in list(_pauses):
        pauses.by_generation[generation].observe(seconds)


class GCPauses:
    """``clawbus_gc_pause_seconds{generation}`` in a registry, fed by every
    collection for as long as this object lives."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram("clawbus_gc_pause_seconds",
                                   "Garbage-collector pauses of this process (wall time)",
                                   ["generation"], buckets=PAUSE_BUCKETS, registry=registry)
        self._pauses = _Pauses(self.histogram)
        _pauses.add(self._pauses)
        if _on_gc not in gc.callbacks:
            gc.callbacks.append(_on_gc)
