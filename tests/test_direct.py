"""bus.nats_adapter.subscribe_direct against a real nats-server: order, no loss across
the switch, unsubscribe and drain, a failing handler, and the nats-py internals it
relies on (so an upgrade that changes them fails here, not in production)."""

from __future__ import annotations

import asyncio
import inspect
import logging

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.nats_adapter import subscribe_direct

BOTH_LOOPS = True  # tests/conftest.py: asyncio and uvloop


class Seen:
    """What a handler received; ``until(n)`` waits for the n-th message."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self._grew = asyncio.Event()

    def __call__(self, msg: Msg) -> None:
        self.data.append(msg.data)
        self._grew.set()

    async def until(self, count: int) -> list[bytes]:
        async with asyncio.timeout(10):
            while len(self.data) < count:
                self._grew.clear()
                await self._grew.wait()
        return self.data


def test_the_nats_py_internals_it_relies_on_are_there() -> None:
    source = inspect.getsource(Client._process_msg)
    assert "sub._pending_size += payload_size" in source
    assert "sub._pending_queue.put_nowait(msg)" in source
    assert "_wait_for_msgs_task" in inspect.getsource(Subscription._start)


async def test_messages_arrive_in_order_without_a_task(nc: Client) -> None:
    seen: list[bytes] = []
    done = asyncio.Event()

    def handler(msg: Msg) -> None:
        seen.append(msg.data)
        if len(seen) == 500:
            done.set()

    sub = await subscribe_direct(nc, "direct.order.*", handler)
    assert sub._wait_for_msgs_task is not None
    await asyncio.sleep(0)  # let the cancelled callback task finish
    assert sub._wait_for_msgs_task.cancelled()
    publisher = await nats.connect(nc.connected_url.geturl())
    try:
        for i in range(500):
            await publisher.publish(f"direct.order.{i % 7}", b"%d" % i)
        await publisher.flush()
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await publisher.close()
    assert seen == [b"%d" % i for i in range(500)]
    assert sub.pending_bytes == 0 and sub.pending_msgs == 0


async def test_messages_queued_before_the_switch_come_first(nc: Client) -> None:
    """What nats-py queued while ``subscribe`` was still running is handled, in
    order, before anything that arrives afterwards."""
    seen = Seen()
    original = nc.subscribe

    async def subscribe_then_receive(*args: object, **kwargs: object) -> Subscription:
        sub = await original(*args, **kwargs)  # type: ignore[arg-type]
        for i in range(3):  # as the reader would have, before the switch
            msg = Msg(nc, subject="direct.early", data=b"early%d" % i)
            sub._pending_size += len(msg.data)
            sub._pending_queue.put_nowait(msg)
        return sub

    nc.subscribe = subscribe_then_receive  # type: ignore[method-assign]
    try:
        sub = await subscribe_direct(nc, "direct.early", seen)
    finally:
        nc.subscribe = original  # type: ignore[method-assign]
    await nc.publish("direct.early", b"late")
    assert await seen.until(4) == [b"early0", b"early1", b"early2", b"late"]
    assert sub.pending_bytes == 0


async def test_a_failing_handler_does_not_stop_delivery(
        nc: Client, caplog: pytest.LogCaptureFixture) -> None:
    seen = Seen()

    def handler(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("boom")
        seen(msg)

    await subscribe_direct(nc, "direct.fail", handler)
    with caplog.at_level(logging.ERROR, logger="clawbus.bus"):
        for data in (b"a", b"bad", b"b"):
            await nc.publish("direct.fail", data)
        assert await seen.until(2) == [b"a", b"b"]
    assert "message handler failed on direct.fail" in caplog.text


async def test_unsubscribe_and_drain(nc: Client) -> None:
    seen = Seen()
    sub = await subscribe_direct(nc, "direct.unsub", seen)
    await nc.publish("direct.unsub", b"1")
    await seen.until(1)
    await sub.unsubscribe()
    await nc.publish("direct.unsub", b"2")
    other = await subscribe_direct(nc, "direct.drain", seen)
    await nc.publish("direct.drain", b"3")
    # "2", published before "3" on the same connection, never came
    assert await seen.until(2) == [b"1", b"3"]
    await asyncio.wait_for(other.drain(), 5)  # type: ignore[no-untyped-call]
    assert other._closed
