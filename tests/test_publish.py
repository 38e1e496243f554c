"""bus.nats_adapter.AckedPublisher against a real nats-server: the stored message and its
ack, de-duplication, and each failure raising the nats-py error that
``js.publish`` raises for it (callers' retry rules depend on those types)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.connection import BUS_UNAVAILABLE
from bus.nats_adapter import AckedPublisher
from tests.natsfixtures import scratch_stream

BOTH_LOOPS = True  # tests/conftest.py: asyncio and uvloop


@pytest.fixture
async def stream(nc: Client) -> AsyncIterator[str]:
    """A stream of its own (at most 3 messages, new ones refused); its subject prefix."""
    async with scratch_stream(nc, "PUB", max_msgs=3, discard="new",
                              duplicate_window=60) as name:
        yield name.lower()


@pytest.fixture
async def publisher(nc: Client) -> AsyncIterator[AckedPublisher]:
    pub = AckedPublisher(nc)
    await pub.start()
    try:
        yield pub
    finally:
        await pub.close()


async def test_stores_the_message_and_returns_the_ack(
        nc: Client, stream: str, publisher: AckedPublisher) -> None:
    acks = await asyncio.gather(*(
        publisher.publish(f"{stream}.s{i}", f"m{i}".encode(), ack_wait=5) for i in range(3)))
    assert sorted(a["seq"] for a in acks) == [1, 2, 3]
    assert {a["stream"] for a in acks} == {stream.upper()}
    js = nc.jetstream()
    for ack in acks:
        stored = await js.get_msg(ack["stream"], ack["seq"])
        assert stored.subject is not None
        assert stored.data == f"m{stored.subject.rsplit('.s', 1)[1]}".encode()
    assert publisher._waiting == {}


async def test_a_repeated_msg_id_is_stored_once(stream: str, publisher: AckedPublisher) -> None:
    first = await publisher.publish(f"{stream}.a", b"x", ack_wait=5,
                                    headers={"Nats-Msg-Id": "run-1"})
    again = await publisher.publish(f"{stream}.a", b"x", ack_wait=5,
                                    headers={"Nats-Msg-Id": "run-1"})
    assert again["seq"] == first["seq"] and again.get("duplicate") is True
    assert not first.get("duplicate")


async def test_no_stream_for_the_subject(publisher: AckedPublisher) -> None:
    with pytest.raises(nats.js.errors.NoStreamResponseError) as caught:
        await publisher.publish(f"nostream.{uuid.uuid4().hex}", b"x", ack_wait=5)
    assert isinstance(caught.value, BUS_UNAVAILABLE)


async def test_jetstream_error_replies_raise_their_api_error(
        stream: str, publisher: AckedPublisher) -> None:
    with pytest.raises(nats.js.errors.BadRequestError) as caught:
        await publisher.publish(f"{stream}.a", b"x", ack_wait=5,
                                headers={"Nats-Expected-Stream": "ANOTHER"})
    assert caught.value.code == 400 and caught.value.err_code is not None
    for _ in range(3):
        await publisher.publish(f"{stream}.a", b"fill", ack_wait=5)
    with pytest.raises(nats.js.errors.APIError) as full:  # discard=new, max_msgs=3
        await publisher.publish(f"{stream}.a", b"one too many", ack_wait=5)
    assert "maximum messages" in str(full.value)


@pytest.mark.parametrize("reply", [b"not json", b"[1, 2]", b'{"error": "no code"}',
                                   b'{"error": {"code": 500, "surprise": 1}}'])
async def test_unreadable_acks_are_api_errors(nc: Client, publisher: AckedPublisher,
                                              reply: bytes) -> None:
    subject = f"fakejs.{uuid.uuid4().hex}"

    async def answer(msg: Msg) -> None:
        await msg.respond(reply)

    sub = await nc.subscribe(subject, cb=answer)
    try:
        with pytest.raises(nats.js.errors.APIError):
            await publisher.publish(subject, b"x", ack_wait=5)
    finally:
        await sub.unsubscribe()
    assert publisher._waiting == {}


async def test_no_answer_is_a_timeout(nc: Client, publisher: AckedPublisher) -> None:
    subject = f"silent.{uuid.uuid4().hex}"
    sub = await nc.subscribe(subject)  # a responder that never answers
    try:
        with pytest.raises(nats.errors.TimeoutError) as caught:
            await publisher.publish(subject, b"x", ack_wait=0.05)
    finally:
        await sub.unsubscribe()
    assert isinstance(caught.value, BUS_UNAVAILABLE)
    assert publisher._waiting == {}


async def test_cancelled_while_waiting_leaves_nothing_behind(
        nc: Client, publisher: AckedPublisher) -> None:
    subject = f"silent.{uuid.uuid4().hex}"
    got = asyncio.Event()

    async def seen(msg: Msg) -> None:
        got.set()

    sub = await nc.subscribe(subject, cb=seen)
    try:
        task = asyncio.create_task(publisher.publish(subject, b"x", ack_wait=30))
        async with asyncio.timeout(5):
            await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await sub.unsubscribe()
    assert publisher._waiting == {}


async def test_closed_publisher_refuses(nc: Client, stream: str) -> None:
    pub = AckedPublisher(nc)
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pub.publish(f"{stream}.a", b"x", ack_wait=5)  # never started
    await pub.start()
    assert (await pub.publish(f"{stream}.a", b"x", ack_wait=5))["seq"] == 1
    await pub.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pub.publish(f"{stream}.a", b"x", ack_wait=5)
