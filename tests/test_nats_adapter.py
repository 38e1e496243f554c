"""The nats-py internals bus.nats_adapter relies on, checked against the installed
nats-py (so an upgrade that changes them fails here, not in production), and the
adapter's own behaviour against a real nats-server.

The other guard: tests/test_direct.py (subscribe_direct)."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api as js_api

from bus.connection import connect
from bus.nats_adapter import CoalescingClient, consumer_name, parse_header_block
from tests.natsfixtures import SingleNats, scratch_stream


def test_parse_header_block() -> None:
    block = b"NATS/1.0\r\nNats-Sequence: 7\r\nX-Text: caf\xc3\xa9\r\n\r\n"
    assert parse_header_block(block) == {"Nats-Sequence": "7", "X-Text": "café"}
    assert parse_header_block(b"") == {}
    assert parse_header_block(b"garbage") == {}


async def test_consumer_name_of_an_ordered_consumer(nc: Client) -> None:
    js = nc.jetstream()
    async with scratch_stream(nc, "CONSUMERNAME") as stream:
        subject = f"{stream.lower()}.x"
        await js.publish(subject, b"1")
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                                 config=js_api.ConsumerConfig(
                                     deliver_policy=js_api.DeliverPolicy.ALL))
        try:
            await sub.next_msg(timeout=5)
            name = consumer_name(sub)
            assert name is not None
            info = await js.consumer_info(stream, name)
            assert info.name == name
        finally:
            await sub.unsubscribe()
    assert consumer_name(object()) is None  # type: ignore[arg-type]


def test_the_flusher_coalescing_client_overrides_is_as_expected() -> None:
    """CoalescingClient._flusher is nats-py's own with a ``sleep(0)`` added and the
    queued flush requests answered at once: the original must still do what the
    copy does."""
    original = inspect.getsource(Client._flusher)
    for line in ("future: asyncio.Future = await self._flush_queue.get()",
                 "if self._pending_data_size > 0:",
                 "self._transport.writelines(self._pending[:])",
                 "self._pending = []", "self._pending_data_size = 0",
                 "await self._transport.drain()", "await self._error_cb(e)",
                 "await self._process_op_err(e)", "future.set_result(None)"):
        assert line in original, line
    ours = inspect.getsource(CoalescingClient._flusher)
    assert "await asyncio.sleep(0)" in ours


async def _writes_for_concurrent_publishers(nc: Client, tasks: int, each: int) -> int:
    """Socket writes ``nc`` makes while ``tasks`` tasks publish ``each`` messages,
    one per loop turn (as concurrent runs do); every message must arrive, in
    each task's order."""
    subject = f"coalesce.{uuid.uuid4().hex}"
    got: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def received(msg: Msg) -> None:
        task, n = map(int, msg.data.split(b"."))
        got.append((task, n))
        if len(got) == tasks * each:
            done.set()

    async def publisher(task: int) -> None:
        for n in range(each):
            await nc.publish(subject, f"{task}.{n}".encode())
            await asyncio.sleep(0)

    sub = await nc.subscribe(subject, cb=received)
    await nc.flush()
    transport: Any = nc._transport
    writes = 0
    write = transport.writelines

    def counted(data: Any) -> None:
        nonlocal writes
        writes += 1
        write(data)

    transport.writelines = counted
    try:
        await asyncio.gather(*(publisher(t) for t in range(tasks)))
        await nc.flush()
    finally:
        transport.writelines = write
    await asyncio.wait_for(done.wait(), 10)
    await sub.unsubscribe()
    for task in range(tasks):
        assert [n for t, n in got if t == task] == list(range(each))
    return writes


async def test_concurrent_publishers_share_writes(shared_nats: SingleNats) -> None:
    """Many tasks publishing a message each loop turn: nats-py's own client writes
    about once a turn, ours about once every other turn; nothing lost or reordered."""
    plain = await nats.connect(shared_nats.url)  # nats-py's own client
    ours = await connect(shared_nats.url, "test-coalescing")
    assert isinstance(ours, CoalescingClient)
    try:
        baseline = await _writes_for_concurrent_publishers(plain, tasks=20, each=30)
        coalesced = await _writes_for_concurrent_publishers(ours, tasks=20, each=30)
    finally:
        await plain.close()
        await ours.close()
    assert coalesced <= 0.7 * baseline, (coalesced, baseline)
