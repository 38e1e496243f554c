"""The nats-py internals bus.nats_adapter relies on, checked against the installed
nats-py (so an upgrade that changes them fails here, not in production), and the
adapter's own behaviour against a real nats-server.

The other guard: tests/test_direct.py (subscribe_direct)."""

from __future__ import annotations

import asyncio
import inspect

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api as js_api

from bus.nats_adapter import BatchingClient, consumer_name, parse_header_block
from clawbus.natsserver import NatsServer
from tests.natsfixtures import scratch_stream


def test_the_flusher_we_replace_is_the_loop_we_copied() -> None:
    """BatchingClient._flusher is nats-py's loop plus one ``sleep(0)``: the statements
    it copies must still be nats-py's, in that order."""
    theirs = inspect.getsource(Client._flusher)
    copied = [
        "if not self.is_connected or self.is_connecting:",
        "future: asyncio.Future = await self._flush_queue.get()",
        "if self._pending_data_size > 0:",
        "self._transport.writelines(self._pending[:])",
        "self._pending = []",
        "self._pending_data_size = 0",
        "await self._transport.drain()",
        "await self._error_cb(e)",
        "await self._process_op_err(e)",
        "if not future.done():",
        "future.set_result(None)",
    ]
    at = -1
    for line in copied:
        found = theirs.find(line, at + 1)
        assert found > at, f"nats-py's Client._flusher changed: {line!r}"
        at = found
    # Who fills the buffer the flusher writes out:
    assert "self._pending.append(" in inspect.getsource(Client._send_command)
    assert "self._pending_data_size +=" in inspect.getsource(Client._send_command)


def test_parse_header_block() -> None:
    block = b"NATS/1.0\r\nNats-Sequence: 7\r\nX-Text: caf\xc3\xa9\r\n\r\n"
    assert parse_header_block(block) == {"Nats-Sequence": "7", "X-Text": "café"}
    assert parse_header_block(b"") == {}
    assert parse_header_block(b"garbage") == {}


async def test_a_burst_of_publishes_arrives_whole_and_in_order(nats_server: NatsServer) -> None:
    """The batching flusher under load: one event-loop pass of publishes shares a
    write, and nothing is lost or reordered."""
    nc = BatchingClient()
    await nc.connect(nats_server.url)
    reader = await nats.connect(nats_server.url)
    try:
        got: list[bytes] = []
        done = asyncio.Event()

        async def collect(msg: Msg) -> None:
            got.append(msg.data)
            if len(got) == 2000:
                done.set()

        await reader.subscribe("burst.test", cb=collect)
        await reader.flush()

        async def publisher(k: int) -> None:
            for i in range(100):
                await nc.publish("burst.test", f"{k}:{i}".encode())
                if i % 10 == 0:
                    await asyncio.sleep(0)

        await asyncio.gather(*(publisher(k) for k in range(20)))
        await nc.flush()
        async with asyncio.timeout(10):
            await done.wait()
        for k in range(20):  # each publisher's messages in its order
            mine = [m for m in got if m.startswith(f"{k}:".encode())]
            assert mine == [f"{k}:{i}".encode() for i in range(100)]
    finally:
        await reader.close()
        await nc.close()


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
