"""bus.registry.WorkerWatch against a real nats-server: heartbeats keep a worker
alive, silence makes it lost (reported once), a clean deregistration is not a
loss, a draining worker is alive but takes no new runs; and the gateway's answer
to a probe of an attempt it handed to another worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from bus import subjects
from bus.connection import connect, ensure_bus
from bus.messages import REPLY_GONE, REPLY_OK, REPLY_STALE, Heartbeat
from bus.registry import WorkerWatch, beat_period, dead_after
from clawbus.config import BusConfig, SessionConfig
from clawbus.natsserver import NatsServer
from gateway.runs import _probe_answer
from tests.helpers import eventually

HB = 0.2


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[tuple[Client, KeyValue]]:
    nc = await connect(nats_server.url, "test-registry")
    try:
        js = await ensure_bus(nc, BusConfig(heartbeat_seconds=HB), SessionConfig())
        yield nc, await js.key_value(subjects.WORKERS_BUCKET)
    finally:
        await nc.close()


async def beat(kv: KeyValue, worker: str, *, draining: bool = False) -> None:
    await kv.put(subjects.session_token(worker), orjson.dumps({"id": worker,
                                                               "draining": draining}))


def test_the_timers_notice_a_death_within_three_heartbeats() -> None:
    # a beat may just have been missed, then the silence, then one check period
    assert beat_period(5) + dead_after(5) + 5 / 4 <= 3 * 5 + beat_period(5)
    assert dead_after(5) < 3 * 5


async def test_silence_is_a_loss_reported_once(bus: tuple[Client, KeyValue]) -> None:
    nc, kv = bus
    lost: list[str] = []
    watch = WorkerWatch(nc, nc.jetstream(), HB, lost.append)
    await beat(kv, "w-before")  # alive before the watch starts: read at start
    await watch.start()
    try:
        await beat(kv, "w-live")
        await beat(kv, "w-dies")
        await eventually(lambda: watch.alive == 3, 5)
        async with asyncio.timeout(5):
            while "w-dies" not in lost:  # w-live keeps beating, w-dies stops
                await beat(kv, "w-live")
                await asyncio.sleep(beat_period(HB))
        assert lost.count("w-dies") == 1 and "w-live" not in lost
        assert watch.is_alive("w-live") and not watch.is_alive("w-dies")
    finally:
        await watch.close()


async def test_a_clean_stop_is_not_a_loss_and_draining_takes_no_runs(
        bus: tuple[Client, KeyValue]) -> None:
    nc, kv = bus
    lost: list[str] = []
    watch = WorkerWatch(nc, nc.jetstream(), HB, lost.append)
    await watch.start()
    try:
        await beat(kv, "w-drains", draining=True)
        await beat(kv, "w-stops")
        await eventually(lambda: watch.is_alive("w-drains") and watch.is_alive("w-stops"), 5)
        assert watch.alive == 1  # the draining one takes no new runs
        await kv.purge(subjects.session_token("w-stops"))
        await eventually(lambda: not watch.is_alive("w-stops"), 5)
        await asyncio.sleep(dead_after(HB) + HB)  # past the horizon: still no loss
        assert "w-stops" not in lost
    finally:
        await watch.close()


class _Handle:
    def __init__(self, wanted: bool, handed_back_below: int) -> None:
        self.wanted = wanted
        self.handed_back_below = handed_back_below


@pytest.mark.parametrize(("wanted", "below", "attempt", "answer"), [
    (True, 0, 1, REPLY_OK),
    (False, 0, 1, REPLY_GONE),
    (True, 2, 1, REPLY_STALE),  # attempt 1 was handed to another worker
    (True, 2, 2, REPLY_OK),
])
def test_probe_answers(wanted: bool, below: int, attempt: int, answer: bytes) -> None:
    data = Heartbeat(seq=0, attempt=attempt).model_dump_json().encode()
    assert _probe_answer(_Handle(wanted, below), data) == answer  # type: ignore[arg-type]
    assert _probe_answer(None, data) == REPLY_GONE
