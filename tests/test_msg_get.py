"""bus.nats_adapter.LeaderGet against a real nats-server: the same message, data and
headers nats-py's get_msg returns, None where it raises NotFoundError, and
nats-py's errors for everything else."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.connection import BUS_UNAVAILABLE
from bus.nats_adapter import LeaderGet, Requester
from bus.nats_adapter import gets as msg_get
from tests.natsfixtures import scratch_stream

BOTH_LOOPS = True  # tests/conftest.py: asyncio and uvloop


@pytest.fixture
async def stream(nc: Client) -> AsyncIterator[str]:
    async with scratch_stream(nc, "MG") as name:
        yield name


@pytest.fixture
async def leader(nc: Client) -> AsyncIterator[LeaderGet]:
    requester = Requester(nc)
    await requester.start()
    try:
        yield LeaderGet(requester, wait=5)
    finally:
        await requester.close()


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> str:
    """An API prefix no JetStream answers (the shared server's JetStream would answer
    any ``$JS.API`` subject first): tests answer it themselves."""
    prefix = f"$FAKEJS{uuid.uuid4().hex[:8]}.API"
    monkeypatch.setattr(msg_get, "API_PREFIX", prefix)
    return prefix


async def test_last_and_next_match_nats_py(nc: Client, stream: str,
                                           leader: LeaderGet) -> None:
    js = nc.jetstream()
    a, b = f"{stream.lower()}.a", f"{stream.lower()}.b"
    await js.publish(a, b"a1")
    await js.publish(b, b"b1")
    await js.publish(a, "a2 café".encode(), headers={"Nats-Msg-Id": "m2", "X-Window": "7"})
    await js.publish(b, b"")
    last = await leader.last(stream, a)
    theirs = await js.get_msg(stream, subject=a)
    assert last is not None and (last.seq, last.subject, last.data) == (
        theirs.seq, theirs.subject, theirs.data)
    assert last.headers == theirs.headers == {"Nats-Msg-Id": "m2", "X-Window": "7"}
    first = await leader.next(stream, 1, a)
    assert first is not None and (first.seq, first.data, first.headers) == (1, b"a1", {})
    after = await leader.next(stream, 2, a)
    assert after is not None and after.seq == 3
    empty = await leader.last(stream, b)
    assert empty is not None and empty.data == b"" and empty.seq == 4


async def test_not_found_is_none(stream: str, leader: LeaderGet) -> None:
    assert await leader.last(stream, f"{stream.lower()}.nothing") is None
    assert await leader.next(stream, 1, f"{stream.lower()}.nothing") is None
    assert await leader.last(f"NOSTREAM{uuid.uuid4().hex[:6].upper()}", "x.y") is None


@pytest.mark.parametrize("answer", [
    b"not json", b"[]", b'{"type": "io.nats.jetstream.api.v1.stream_msg_get_response"}',
    b'{"message": {"seq": 1, "subject": "s", "data": "***not base64***"}}',
    b'{"message": {"subject": "s"}}',
    b'{"error": {"code": 500, "err_code": 10001, "description": "boom"}}',
])
async def test_unreadable_answers_are_api_errors(nc: Client, leader: LeaderGet,
                                                 fake_api: str, answer: bytes) -> None:
    name = "FAKE"

    async def respond(msg: Msg) -> None:
        await msg.respond(answer)

    sub = await nc.subscribe(f"{fake_api}.STREAM.MSG.GET.{name}", cb=respond)
    try:
        with pytest.raises(nats.js.errors.APIError):
            await leader.last(name, "fake.a")
    finally:
        await sub.unsubscribe()


async def test_well_formed_fake_answer(nc: Client, leader: LeaderGet, fake_api: str) -> None:
    name = "FAKE"
    hdrs = base64.b64encode(b"NATS/1.0\r\nA: 1\r\nBad Name: 2\r\n\r\n").decode()
    body = orjson.dumps({"message": {"seq": 9, "subject": "fake.a",
                                     "data": base64.b64encode(b"hello").decode(),
                                     "hdrs": hdrs}})

    async def respond(msg: Msg) -> None:
        assert orjson.loads(msg.data) == {"last_by_subj": "fake.a"}
        await msg.respond(body)

    sub = await nc.subscribe(f"{fake_api}.STREAM.MSG.GET.{name}", cb=respond)
    try:
        got = await leader.last(name, "fake.a")
    finally:
        await sub.unsubscribe()
    assert got is not None and (got.seq, got.data, got.headers) == (9, b"hello", {"A": "1"})


async def test_no_jetstream_and_no_answer(nc: Client, fake_api: str) -> None:
    requester = Requester(nc)
    await requester.start()
    try:
        quick = LeaderGet(requester, wait=0.05)
        # No JetStream API behind the subject: the server says "no responders".
        with pytest.raises(nats.js.errors.ServiceUnavailableError) as gone:
            await quick.last("ANY", "any.a")
        assert isinstance(gone.value, BUS_UNAVAILABLE)
        sub = await nc.subscribe(f"{fake_api}.STREAM.MSG.GET.MUTE")  # never answers
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await quick.last("MUTE", "mute.a")
        finally:
            await sub.unsubscribe()
    finally:
        await requester.close()
