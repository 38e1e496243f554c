"""The header parser of stored messages (bus.nats_adapter.gets) gives exactly the
results of nats-py's parser of delivered messages, and headers survive a real
round trip through nats-server."""

from __future__ import annotations

import asyncio

import nats
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from bus.nats_adapter.gets import parse_header_lines
from clawbus.natsserver import NatsServer

# Bytes that matter to the parser: separators, every kind of whitespace str.isspace
# knows in ASCII, a non-ASCII lead byte, and ordinary token characters.
PIECES = [b":", b": ", b"\r\n", b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\x85",
          b"\xc3\xa9", b"\xff", b"Nats-Sequence", b"X-Key", b"12", b"value", b"", b"-", b"_"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join))
@example(b"Nats-Stream: TX\r\nNats-Sequence: 12\r\n\r\n")
@example(b"Bad Name: x\r\nGood: y\r\n: empty name\r\nno colon\r\n\xc3\xa9: non-ascii\r\n")
@example(b"K\x1cey: v\r\nK:\tv2 \r\nV: caf\xc3\xa9 \xff\r\n")
def test_same_result_as_nats_py(raw: bytes) -> None:
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)


async def test_headers_survive_a_round_trip(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    plain = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("hdr.test")
        await nc.flush()  # the server knows the subscription before the publish
        headers = {"Nats-Msg-Id": "turn-1", "Clawbus-Window-Start": "42", "X-Text": "café"}
        await plain.publish("hdr.test", b"x", headers=headers)
        msg = await asyncio.wait_for(sub.next_msg(), 5)
        assert msg.headers == headers
    finally:
        await plain.close()
        await nc.close()
