"""bus.nats_adapter.BatchGetter against a real nats-server: runs of one subject's
messages across several batches, interleaved subjects, and every way an answer
can fall short (a lagging replica, a deleted message, a server without batched
direct gets, a stream without direct gets)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.nats_adapter import BatchGetter, Requester
from tests.natsfixtures import scratch_stream

BOTH_LOOPS = True  # tests/conftest.py: asyncio and uvloop


@pytest.fixture
async def stream(nc: Client) -> AsyncIterator[str]:
    """A stream with direct gets; its name (subjects ``<name lowercased>.>``)."""
    async with scratch_stream(nc, "BG", allow_direct=True) as name:
        yield name


async def fill(nc: Client, stream: str, pattern: str) -> dict[str, list[int]]:
    """Publish one message per letter of ``pattern`` on subject ``<stream>.<letter>``;
    each subject's sequences."""
    js = nc.jetstream()
    seqs: dict[str, list[int]] = {}
    for i, letter in enumerate(pattern):
        ack = await js.publish(f"{stream.lower()}.{letter}", f"{letter}{i}".encode())
        seqs.setdefault(letter, []).append(ack.seq)
    return seqs


@pytest.fixture
async def getter(nc: Client) -> AsyncIterator[BatchGetter]:
    requester = Requester(nc)  # started by the getter's first read
    try:
        yield BatchGetter(requester, batch=3)  # small batches: reads take several rounds
    finally:
        await requester.close()


async def test_reads_one_subject_across_batches(nc: Client, stream: str,
                                                getter: BatchGetter) -> None:
    seqs = await fill(nc, stream, "abaabbbabaaab")
    subject = f"{stream.lower()}.a"
    a = seqs["a"]
    got = await getter.read(stream, subject, 1, a[-1], wait=5)
    assert got is not None and [s for s, _ in got] == a
    assert all(data.startswith(b"a") for _, data in got)
    # From the middle, and stopping before the subject's end.
    got = await getter.read(stream, subject, a[2], a[5], wait=5)
    assert got is not None and [s for s, _ in got] == a[2:6]
    # A start between two of the subject's messages begins at the next one.
    got = await getter.read(stream, subject, a[2] + 1, a[4], wait=5)
    assert a[3] > a[2] + 1 and got is not None and [s for s, _ in got] == a[3:5]
    assert getter._requester._waiting == {}


async def test_short_answers_are_none(nc: Client, stream: str, getter: BatchGetter) -> None:
    seqs = await fill(nc, stream, "aab")
    subject = f"{stream.lower()}.a"
    # A replica that has not got the message the leader reported yet.
    assert await getter.read(stream, subject, 1, seqs["a"][-1] + 10, wait=5) is None
    # Nothing at all from there on (404).
    assert await getter.read(stream, subject, seqs["b"][-1] + 1, seqs["b"][-1] + 5,
                             wait=5) is None
    # The message the caller expected was deleted: a later one comes instead.
    js = nc.jetstream()
    await js.publish(subject, b"a-later")
    await js.delete_msg(stream, seqs["a"][1])
    assert await getter.read(stream, subject, 1, seqs["a"][1], wait=5) is None
    # A stream without direct gets: no responders.
    plain = f"BGPLAIN{uuid.uuid4().hex[:6].upper()}"
    await js.add_stream(name=plain, subjects=[f"{plain.lower()}.*"], storage="memory")
    try:
        await js.publish(f"{plain.lower()}.a", b"x")
        assert await getter.read(plain, f"{plain.lower()}.a", 1, 1, wait=5) is None
    finally:
        await js.delete_stream(plain)


async def test_server_without_batches(nc: Client, getter: BatchGetter) -> None:
    """Before nats-server 2.11 a direct get ignores ``batch`` and answers one plain
    message: the reader asks again from the next sequence."""
    name = f"OLD{uuid.uuid4().hex[:6].upper()}"
    store = {2: b"first", 5: b"second", 9: b"third"}
    asked: list[dict[str, int | str]] = []

    async def old_server(msg: Msg) -> None:
        request = orjson.loads(msg.data)
        asked.append(request)
        seq = next((s for s in sorted(store) if s >= request["seq"]), None)
        if seq is None:
            await nc.publish(msg.reply, b"", headers={"Status": "404",
                                                      "Description": "Message Not Found"})
            return
        await nc.publish(msg.reply, store[seq], headers={
            "Nats-Stream": name, "Nats-Subject": request["next_by_subj"],
            "Nats-Sequence": str(seq), "Nats-Time-Stamp": "2026-01-01T00:00:00Z"})

    sub = await nc.subscribe(f"$JS.API.DIRECT.GET.{name}", cb=old_server)
    try:
        got = await getter.read(name, "old.a", 1, 9, wait=5)
    finally:
        await sub.unsubscribe()
    assert got == [(2, b"first"), (5, b"second"), (9, b"third")]
    assert [r["seq"] for r in asked] == [1, 3, 6]


async def test_unanswered_request_times_out(nc: Client, getter: BatchGetter) -> None:
    name = f"MUTE{uuid.uuid4().hex[:6].upper()}"
    sub = await nc.subscribe(f"$JS.API.DIRECT.GET.{name}")  # takes it, never answers
    try:
        with pytest.raises(TimeoutError):
            await getter.read(name, "mute.a", 1, 1, wait=0.05)
    finally:
        await sub.unsubscribe()
    assert getter._requester._waiting == {}
