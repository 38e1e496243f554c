"""clawbus.gcstats: every garbage collection lands in the pause histogram of each live
registry, by generation, and a dropped one stops being fed."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from clawbus.gcstats import GCPauses


def counts(registry: CollectorRegistry) -> dict[str, float]:
    return {g: registry.get_sample_value("clawbus_gc_pause_seconds_count",
                                         {"generation": g}) or 0.0 for g in ("0", "1", "2")}


def test_collections_are_timed_by_generation() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    kept = [GCPauses(first), GCPauses(second)]
    before = counts(first)
    gc.collect(0)
    gc.collect(2)
    gc.collect(2)
    after = counts(first)
    assert after["0"] >= before["0"] + 1
    assert after["2"] >= before["2"] + 2
    assert counts(second)["2"] >= 2  # every registry is fed
    total = first.get_sample_value("clawbus_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and total > 0
    del kept


def test_a_dropped_histogram_is_no_longer_fed() -> None:
    registry = CollectorRegistry()
    pauses = GCPauses(registry)
    gc.collect(2)
    seen = counts(registry)["2"]
    assert seen >= 1
    del pauses  # the registry still holds the histogram, but nothing feeds it now
    gc.collect(2)
    gc.collect(2)
    assert counts(registry)["2"] == seen
