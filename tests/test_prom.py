"""clawbus.prom.Children: one child per label set, counting into the real metric."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from clawbus.prom import Children


def test_children_are_looked_up_once_and_count_into_the_metric() -> None:
    registry = CollectorRegistry()
    counter = Counter("things", "Things", ["kind", "status"], registry=registry)
    by = Children(counter)
    assert by("a", "200") is by("a", "200")
    assert by("a", "200") is not by("a", "500")
    by("a", "200").inc()
    by("a", "200").inc(2)
    by("b", "500").inc()
    text = generate_latest(registry).decode()
    assert 'things_total{kind="a",status="200"} 3.0' in text
    assert 'things_total{kind="b",status="500"} 1.0' in text
