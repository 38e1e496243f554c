"""The nats-py internals bus.nats_adapter relies on, checked against the installed
nats-py (so an upgrade that changes them fails here, not in production), and the
adapter's own behaviour against a real nats-server.

The other guard: tests/test_direct.py (subscribe_direct)."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import api as js_api

from bus.nats_adapter import consumer_name, parse_header_block
from tests.natsfixtures import scratch_stream


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
