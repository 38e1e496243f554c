"""A session's run published as its head (bus/heads.py), against a real
nats-server: the conditional publish is stored only while no other run of the
session is, its header reaches the worker with the message, and the gateway's
``RunClient.submit`` uses it for session runs (and only for them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import APIError

from bus import heads, subjects
from bus.connection import connect, ensure_bus
from clawbus.config import BusConfig, SessionConfig
from clawbus.natsserver import NatsServer
from gateway.runs import RunClient, RunSpec

BUS = BusConfig()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, "test-heads")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    return await ensure_bus(nc, BUS, SessionConfig())


def _token() -> str:
    return subjects.session_token(f"heads-{uuid.uuid4().hex[:8]}")


async def _headers(js: JetStreamContext, seq: int) -> dict[str, str] | None:
    return (await js.get_msg(subjects.RUNS_STREAM, seq, direct=False)).headers


async def test_the_conditional_publish_is_stored_only_as_the_head(js: JetStreamContext) -> None:
    subject = subjects.run(_token())
    first = await js.publish(subject, b"1", headers=heads.as_head({"Nats-Msg-Id": "h1"}))
    with pytest.raises(APIError) as refused:  # the session has a run stored
        await js.publish(subject, b"2", headers=heads.as_head({"Nats-Msg-Id": "h2"}))
    assert heads.not_head(refused.value)
    second = await js.publish(subject, b"2", headers={"Nats-Msg-Id": "h2"})
    assert heads.published_as_head(await _headers(js, first.seq))
    assert not heads.published_as_head(await _headers(js, second.seq))
    # Both gone (served): the next run is the head again.
    for seq in (first.seq, second.seq):
        await js.delete_msg(subjects.RUNS_STREAM, seq)
    third = await js.publish(subject, b"3", headers=heads.as_head({"Nats-Msg-Id": "h3"}))
    assert heads.published_as_head(await _headers(js, third.seq))
    await js.delete_msg(subjects.RUNS_STREAM, third.seq)


def test_only_the_conditions_own_value_is_a_proof() -> None:
    assert not heads.published_as_head(None)
    assert not heads.published_as_head({})
    assert not heads.published_as_head({"Nats-Expected-Last-Subject-Sequence": "12"})
    assert not heads.not_head(RuntimeError("x"))


async def test_the_gateway_publishes_session_runs_as_heads(nc: Client,
                                                           js: JetStreamContext) -> None:
    client = RunClient(nc, js, BUS)
    await client.start()
    key = f"heads-{uuid.uuid4().hex[:8]}"
    try:
        first = await client.submit(RunSpec(agent_id="main", session_key=key, message="a"))
        second = await client.submit(RunSpec(agent_id="main", session_key=key, message="b"))
        lone = await client.submit(RunSpec(agent_id="main", session_key=f"{key}-x",
                                           message="c", ephemeral=True))
        assert first.stream_seq is not None and second.stream_seq is not None
        assert second.stream_seq > first.stream_seq
        assert heads.published_as_head(await _headers(js, first.stream_seq))
        assert not heads.published_as_head(await _headers(js, second.stream_seq))
        assert lone.stream_seq is not None  # (a stateless run has no order to prove)
        assert not heads.published_as_head(await _headers(js, lone.stream_seq))
        for handle in (first, second, lone):
            assert handle.stream_seq is not None
            await js.delete_msg(subjects.RUNS_STREAM, handle.stream_seq)
    finally:
        await client.close()


def test_busy_sessions_are_those_under_way_here_or_lately_refused() -> None:
    busy = heads.BusySessions(memory=1.0, limit=2)
    assert not busy.busy("k", 0.0)
    busy.started("k")
    busy.started("k")
    busy.ended("k")
    assert busy.busy("k", 0.0)  # one run still under way
    busy.ended("k")
    assert not busy.busy("k", 0.0)
    busy.refused("k", 10.0)  # another gateway's run was stored
    assert busy.busy("k", 10.5) and not busy.busy("k", 11.0)
    for key in ("a", "b", "c"):  # bounded: the oldest refusal goes first
        busy.refused(key, 20.0)
    assert not busy.busy("a", 20.1) and busy.busy("b", 20.1) and busy.busy("c", 20.1)


async def test_a_busy_sessions_runs_are_not_offered_as_heads(nc: Client,
                                                            js: JetStreamContext) -> None:
    """A second gateway's run of a session whose run is stored is refused once as
    the head, then published plainly at once for a while (one publish, not two)."""
    ours, theirs = RunClient(nc, js, BUS), RunClient(nc, js, BUS)
    for client in (ours, theirs):
        await client.start()
    key = f"busy-{uuid.uuid4().hex[:8]}"
    try:
        first = await theirs.submit(RunSpec(agent_id="main", session_key=key, message="a"))
        refused = await ours.submit(RunSpec(agent_id="main", session_key=key, message="b"))
        assert ours._busy.busy(key, time.monotonic())
        sent: list[dict[str, str]] = []
        publish = ours._publish_retrying

        async def counted(subject: str, payload: bytes,
                          headers: dict[str, str]) -> dict[str, Any]:
            sent.append(headers)
            return await publish(subject, payload, headers)

        ours._publish_retrying = counted  # type: ignore[method-assign]
        plain = await ours.submit(RunSpec(agent_id="main", session_key=key, message="c"))
        assert len(sent) == 1 and not heads.published_as_head(sent[0])
        for handle, marked in ((first, True), (refused, False), (plain, False)):
            assert handle.stream_seq is not None
            assert heads.published_as_head(await _headers(js, handle.stream_seq)) == marked
            await js.delete_msg(subjects.RUNS_STREAM, handle.stream_seq)
    finally:
        for client in (ours, theirs):
            await client.close()
