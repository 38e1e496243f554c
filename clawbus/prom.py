"""A labelled Prometheus metric's children, each looked up once.

``metric.labels(*values)`` validates the values, takes a lock and builds a key on
every call; the label sets here are few and fixed (endpoints, statuses, outcomes,
provider names), so each child is kept after its first use (a handful of lookups
per request on the hot path)."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child
