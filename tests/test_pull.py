"""The continuous pull consumer against a real nats-server: messages arrive one
by one as published, never more in flight than the caller has room for, and the
credit survives pull requests expiring."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from bus.pull import PullConsumer
from clawbus.natsserver import NatsServer


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    conn = await nats.connect(nats_server.url)
    js = conn.jetstream()
    await js.add_stream(api.StreamConfig(name="Q", subjects=["q.>"],
                                         retention=api.RetentionPolicy.WORK_QUEUE))
    await js.add_consumer("Q", api.ConsumerConfig(durable_name="c",
                                                  ack_policy=api.AckPolicy.EXPLICIT))
    try:
        yield conn
    finally:
        await conn.close()


class Caller:
    """What a worker does with the consumer: each message handled in a task of its
    own, at most ``room`` at a time, room reported back as tasks end."""

    def __init__(self, nc: Client, handle: Callable[[Msg], Coroutine[None, None, None]], *,
                 room: int, expires: float, heartbeat: float, min_batch: int) -> None:
        self.handle = handle
        self.tasks: set[asyncio.Task[None]] = set()
        self.consumer = PullConsumer(nc, "Q", "c", self._on_message,
                                     lambda: room - len(self.tasks), expires=expires,
                                     heartbeat=heartbeat, min_batch=min_batch)

    async def _on_message(self, msg: Msg) -> None:
        task = asyncio.create_task(self.handle(msg))
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.consumer.room_changed()

    async def __aenter__(self) -> Caller:
        await self.consumer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.consumer.stop()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize("min_batch", [1, 2])
async def test_delivers_each_message_at_once_within_room(nc: Client, min_batch: int) -> None:
    js = nc.jetstream()
    room = 3
    in_flight: set[str] = set()
    peak = 0
    done: list[str] = []
    all_done = asyncio.Event()
    handled: dict[str, asyncio.Event] = {s: asyncio.Event() for s in ("q.first", "q.late")}

    async def handle(msg: Msg) -> None:
        nonlocal peak
        in_flight.add(msg.subject)
        peak = max(peak, len(in_flight))
        await asyncio.sleep(0.01)
        await msg.ack()
        in_flight.discard(msg.subject)
        done.append(msg.subject)
        if msg.subject in handled:
            handled[msg.subject].set()
        if len(done) == 30:
            all_done.set()

    async with Caller(nc, handle, room=room, expires=0.5, heartbeat=0.2, min_batch=min_batch):
        # A lone message is handed over at once (no batch to fill first).
        await js.publish("q.first", b"")
        async with asyncio.timeout(0.5):
            await handled["q.first"].wait()
        for i in range(29):
            await js.publish(f"q.{i}", b"")
        async with asyncio.timeout(10):
            await all_done.wait()
        # Pull requests expire and are renewed while idle: a late message still arrives.
        await asyncio.sleep(1.2)
        await js.publish("q.late", b"")
        async with asyncio.timeout(3):
            await handled["q.late"].wait()
    assert peak <= room
    assert len(done) == 31 and len(set(done)) == 31


async def test_tops_up_in_batches_not_per_message(nats_server: NatsServer, nc: Client) -> None:
    """With min_batch, credit is renewed a batch at a time (each pull request is a
    message to the server), and a worker out of credit still asks at once."""
    js = nc.jetstream()
    spy = await nats.connect(nats_server.url)
    requests: list[bytes] = []

    async def record(msg: Msg) -> None:
        requests.append(msg.data)

    await spy.subscribe("$JS.API.CONSUMER.MSG.NEXT.Q.c", cb=record)
    await spy.flush()
    done = asyncio.Event()
    handled: list[str] = []

    async def handle(msg: Msg) -> None:
        await msg.ack()
        handled.append(msg.subject)
        if len(handled) == 64:
            done.set()

    try:
        async with Caller(nc, handle, room=8, expires=5.0, heartbeat=1.0, min_batch=4):
            for i in range(64):
                await js.publish(f"q.{i}", b"")
            async with asyncio.timeout(10):
                await done.wait()
    finally:
        await spy.close()
    assert len(handled) == 64
    # One request per handled message would be 64; batches of >= 4 need at most 17.
    assert 1 <= len(requests) <= 64 // 4 + 1, len(requests)


async def test_credit_stays_right_across_expiries(nc: Client,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Pull requests expire while idle, several at once, and the server spreads
    messages over a client's requests in any order: the credit count must not
    drift above the server's (it starved the worker until the silence check)."""
    js = nc.jetstream()
    handled: list[str] = []
    wanted = asyncio.Event()
    target = 0

    async def handle(msg: Msg) -> None:
        await asyncio.sleep(0.005)
        await msg.ack()
        handled.append(msg.subject)
        if len(handled) >= target:
            wanted.set()

    async with Caller(nc, handle, room=8, expires=0.5, heartbeat=0.2, min_batch=2):
        for burst in range(4):
            target += 12
            wanted.clear()
            for i in range(12):
                await js.publish(f"q.{burst}.{i}", b"")
            # Well inside the silence check (2 x heartbeat + 1 s): no stall.
            async with asyncio.timeout(1.0):
                await wanted.wait()
            await asyncio.sleep(0.8)  # idle: every pull request expires
    assert len(handled) == 48
    assert "went silent" not in caplog.text
