"""Per-request objects are freed by reference counting, not left for the garbage
collector (issue #5).

A reference cycle per request keeps each finished request's objects in memory
until a full collection, which then frees the leftovers of every request since
the previous one at once: after 2,000 held streams that took ~100 ms in the
gateway and as much in the worker: a stall of every stream, growing with the
requests served in between.
It also doubled the young collections. Each test drops its last reference with
the collector switched off and checks, through a weak reference, that the
object is gone already.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import openai
import pytest
import uvicorn

from clawbus.config import parse_settings
from clawbus.natsserver import NatsServer
from gateway.app import create_app
from gateway.disconnect import CancelOnDisconnect
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, base_config
from workers.acceptance import Acceptance
from workers.deferred import Deferred
from workers.worker import Worker

BOTH_LOOPS = True  # the product runs on uvloop; tests on asyncio's loop too


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
    async def accepted(self, worker_id: str, ack: str, on_abandoned: Any) -> None:
        return None

    async def confirm_ours(self) -> None:
        return None


async def test_stateless_acceptance_is_freed_without_the_collector(no_gc: None) -> None:
    acceptance = Acceptance(_Emitter(), "w-test",  # type: ignore[arg-type]
                            on_abandoned=lambda superseded: None)
    acceptance.announce_later(3600.0)
    await acceptance.confirm(lambda: False)
    await acceptance.aclose()
    ref = weakref.ref(acceptance)
    del acceptance
    assert ref() is None


# -- the whole request path, gateway and worker in this process ----------------

OURS = ("gateway.", "workers.", "bus.", "uvicorn.", "starlette.", "fastapi.")
REQUESTS = 12  # of each kind: a type left in cycles per request shows up 12+ times


def _owner_module(obj: object) -> str:
    code = getattr(obj, "f_code", None) or getattr(obj, "cr_code", None) \
        or getattr(obj, "__code__", None)
    if code is not None:
        return str(code.co_filename)
    return type(obj).__module__ or ""


def _ours(obj: object) -> str | None:
    """A name for ``obj`` if clawbus or its server stack made it, else None."""
    owner = _owner_module(obj)
    if owner.startswith(OURS) or any(f"/{p.rstrip('.')}/" in owner for p in OURS):
        kind = type(obj).__name__
        code = getattr(obj, "f_code", None) or getattr(obj, "cr_code", None)
        return f"{kind}:{code.co_name}" if code is not None else f"{type(obj).__module__}.{kind}"
    return None


async def test_requests_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    """Non-streaming and streaming calls, stateless and on a session, through a
    real gateway (uvicorn on a socket) and worker over a real nats-server: none
    of clawbus's objects (nor uvicorn's or starlette's) may be left in cycles per
    request. The collector is off while they run; what it finds after is listed."""
    with NatsServer(store_dir=tmp_path / "nats").start() as server, \
            FakeOpenAI() as upstream:
        settings = parse_settings(base_config(upstream))
        nc = await nats.connect(server.url)
        worker = Worker(settings, nc)
        worker_task = asyncio.create_task(worker.run())
        await worker.ready.wait()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        listening = asyncio.Event()

        class Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                listening.set()

        http = Server(uvicorn.Config(create_app(settings, server.url), lifespan="on",
                                     log_level="warning", access_log=False))
        http_task = asyncio.create_task(http.serve(sockets=[sock]))
        try:
            await listening.wait()
            assert http.started
            port = sock.getsockname()[1]
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                        api_key=TOKEN, max_retries=0)

            async def calls(n: int) -> None:
                for i in range(n):
                    session = {"x-openclaw-session-key": "cycles"}
                    for headers in ({}, session):
                        reply = await client.chat.completions.create(
                            model="openclaw", extra_headers=headers,
                            messages=[{"role": "user", "content": f"hello {i}"}])
                        assert reply.choices[0].message.content
                        stream = await client.chat.completions.create(
                            model="openclaw", stream=True, extra_headers=headers,
                            messages=[{"role": "user", "content": f"stream {i}"}])
                        assert [c async for c in stream]

            await calls(2)  # first-use caches, lazy imports
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await calls(REQUESTS)
                gc.collect()
                left = Counter(name for name in map(_ours, gc.garbage) if name)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            await client.close()
        finally:
            http.should_exit = True
            await http_task
            worker.stop()
            await worker_task
            await nc.close()
    per_request = {name: n for name, n in left.items() if n >= REQUESTS}
    assert per_request == {}, left.most_common(20)
