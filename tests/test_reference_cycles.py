"""Per-request objects are freed by reference counting, not left for the garbage
collector (issue #5).

A reference cycle per request makes every full collection walk (and free) the
leftovers of thousands of requests at once: with 2,000 held streams that was a
~100 ms pause of the gateway and of the worker together, which made streams
late. Each test drops its last reference with the collector switched off and
checks, through a weak reference, that the object is gone already.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.disconnect import CancelOnDisconnect
from workers.acceptance import Acceptance
from workers.deferred import Deferred


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _watcher() -> asyncio.Task[Any]:
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "watch-disconnect"]
    return task


async def test_disconnect_watch_is_freed_without_the_collector(no_gc: None) -> None:
    async with CancelOnDisconnect(_never_disconnects) as watch:
        watcher = _watcher()
    # Wait for it without taking its CancelledError (nobody does in the gateway).
    await asyncio.wait([watcher])
    assert watcher.cancelled()
    ref = weakref.ref(watch)
    del watch, watcher
    assert ref() is None


async def test_disconnect_watch_that_fired_is_freed_without_the_collector(
        no_gc: None) -> None:
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async with CancelOnDisconnect(receive) as watch:
        watcher = _watcher()
        gone.set()
        await asyncio.Event().wait()  # cancelled by the watcher
    assert watch.disconnected
    await watcher
    ref = weakref.ref(watch)
    del watch, watcher
    assert ref() is None


class _Owner:
    """Holds a Deferred made from one of its own methods, as Acceptance does."""

    def __init__(self, delay: float) -> None:
        self.ran = asyncio.Event()
        self.later = Deferred(delay, self.run, "test-deferred")

    async def run(self) -> None:
        self.ran.set()


async def test_deferred_never_started_is_freed_without_the_collector(no_gc: None) -> None:
    owner = _Owner(3600.0)
    owner.later.stop_waiting()
    ref = weakref.ref(owner)
    del owner
    assert ref() is None


async def test_deferred_that_ran_is_freed_without_the_collector(no_gc: None) -> None:
    owner = _Owner(0.0)
    await owner.ran.wait()
    assert owner.later.task is not None
    await owner.later.task
    ref = weakref.ref(owner)
    del owner
    assert ref() is None


class _Emitter:
    async def accepted(self, worker_id: str, on_abandoned: Any) -> None:
        return None


async def test_stateless_acceptance_is_freed_without_the_collector(no_gc: None) -> None:
    acceptance = Acceptance(_Emitter(), "w-test", on_abandoned=lambda: None)  # type: ignore[arg-type]
    acceptance.announce_later(3600.0)
    await acceptance.confirm(lambda: False)
    await acceptance.aclose()
    ref = weakref.ref(acceptance)
    del acceptance
    assert ref() is None
