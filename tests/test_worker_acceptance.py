"""The worker's ``accepted`` probe: sent at once, answered while the run goes on.

The worker does not wait for the gateway's answer before calling the provider
(that round trip is off the critical path), so these tests pin what must still
hold: a run its gateway let go of (``gone``) or whose gateway is dead (no
responders) is stopped, its provider call cut, nothing stored, its message
removed from ``RUNS``; a wanted run's events arrive with ``accepted`` first.

A real worker process and nats-server; the test plays the gateway with its own
NATS connection, publishing runs to ``RUNS`` and answering (or not) the probes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from bus import subjects
from bus.messages import REPLY_GONE, REPLY_OK, RunRequest
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import Stack, base_config


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(token_delay=0.05) as up:  # ~10 tokens: half a second a reply
        yield up


@pytest.fixture(scope="module")
def worker_only(slow_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Stack]:
    st = Stack.start(tmp_path_factory.mktemp("acceptance"), slow_upstream,
                     base_config(slow_upstream), gateways=0, workers=1)
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture
async def nc(worker_only: Stack) -> AsyncIterator[Client]:
    client = await nats.connect(worker_only.nats.url)
    try:
        yield client
    finally:
        await client.close()


async def submit(nc: Client, events_subject: str, message: str, *,
                 ephemeral: bool = False) -> tuple[str, str]:
    """Publish a run as a gateway would; its run id and session token."""
    run_id = f"chatcmpl_{uuid.uuid4()}"
    session_key = f"agent:main:test:{uuid.uuid4().hex[:8]}"
    token = subjects.session_token(session_key)
    run = RunRequest(run_id=run_id, session_key=session_key, agent_id="main", message=message,
                     events_subject=events_subject, created=time.time(), ephemeral=ephemeral,
                     stream=True)
    await nc.jetstream().publish(subjects.run(token), run.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": run_id})
    return run_id, token


async def wait_gone_from_runs(nc: Client, token: str) -> None:
    """Until the run's message left RUNS (acked or terminated by the worker)."""
    js = nc.jetstream()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            await js.get_msg(subjects.RUNS_STREAM, seq=1, subject=subjects.run(token), next=True)
        except NotFoundError:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"run of {token} still in RUNS after 10 s")


async def stored_turns(nc: Client, token: str) -> int:
    js = nc.jetstream()
    try:
        await js.get_msg(subjects.TX_STREAM, seq=1, subject=subjects.transcript(token), next=True)
    except NotFoundError:
        return 0
    return 1


async def calls_ended(upstream: FakeOpenAI, marker: str) -> None:
    await asyncio.to_thread(upstream.wait_for, lambda reqs: all(
        r.ended is not None for r in reqs if marker in orjson.dumps(r.body).decode()))


def calls_with(upstream: FakeOpenAI, marker: str) -> list[bool]:
    """For each upstream call carrying ``marker``: whether it ran to completion."""
    return [r.completed for r in upstream.requests
            if marker in orjson.dumps(r.body).decode()]


@pytest.mark.parametrize("ephemeral", [False, True])
async def test_run_of_a_dead_gateway_is_stopped_and_not_stored(
        nc: Client, slow_upstream: FakeOpenAI, ephemeral: bool) -> None:
    marker = f"nobody-listens-{uuid.uuid4().hex[:8]}"
    # Nobody subscribes to this events subject: NATS answers "no responders".
    _, token = await submit(nc, subjects.events("gwdead", "x" + uuid.uuid4().hex), marker,
                            ephemeral=ephemeral)
    await wait_gone_from_runs(nc, token)
    assert await stored_turns(nc, token) == 0
    # If the provider call had started, it was cut: never run to completion.
    await calls_ended(slow_upstream, marker)
    assert True not in calls_with(slow_upstream, marker)


async def answer(nc: Client, subject: str, reply: bytes) -> tuple[list[dict[str, object]],
                                                                  asyncio.Event]:
    """Play the gateway on ``subject``: answer every probe with ``reply``; record
    the events; the Event is set once the run ended (done/error)."""
    seen: list[dict[str, object]] = []
    ended = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        if msg.reply:
            await nc.publish(msg.reply, reply)
        event = orjson.loads(msg.data)
        seen.append(event)
        if event["type"] in ("done", "error"):
            ended.set()

    await nc.subscribe(subject, cb=on_event)
    return seen, ended


async def test_run_its_gateway_let_go_is_stopped_and_not_stored(
        nc: Client, slow_upstream: FakeOpenAI) -> None:
    marker = f"client-gone-{uuid.uuid4().hex[:8]}"
    subject = subjects.events("gwgone", "r" + uuid.uuid4().hex)
    seen, ended = await answer(nc, subject, REPLY_GONE)
    _, token = await submit(nc, subject, marker)
    await wait_gone_from_runs(nc, token)
    assert await stored_turns(nc, token) == 0
    assert not ended.is_set()
    assert seen and seen[0]["type"] == "accepted"
    await calls_ended(slow_upstream, marker)
    assert True not in calls_with(slow_upstream, marker)


async def test_wanted_run_completes_with_accepted_first(
        nc: Client, slow_upstream: FakeOpenAI) -> None:
    marker = f"wanted-{uuid.uuid4().hex[:8]}"
    subject = subjects.events("gwok", "r" + uuid.uuid4().hex)
    seen, ended = await answer(nc, subject, REPLY_OK)
    _, token = await submit(nc, subject, marker)
    await asyncio.wait_for(ended.wait(), 20)
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "accepted" and kinds[-1] == "done", kinds
    assert set(kinds[1:-1]) <= {"delta", "heartbeat"}
    numbered = [e["seq"] for e in seen if e["type"] != "heartbeat"]
    assert numbered == list(range(1, len(numbered) + 1))
    await wait_gone_from_runs(nc, token)
    assert await stored_turns(nc, token) == 1
    assert calls_with(slow_upstream, marker) == [True]


async def test_probe_answers_are_demultiplexed_and_time_out(nc: Client) -> None:
    """workers.probes on its own: each probe gets its own answer; none in time → None;
    nobody listening → NO_RESPONDERS; nothing is left waiting."""
    from bus.nats_adapter import Requester
    from workers.probes import NO_RESPONDERS, send_probe

    requests = Requester(nc)
    await requests.start()
    try:
        async def echo(msg: Msg) -> None:
            if msg.data != b"silent":
                await nc.publish(msg.reply, b"re:" + msg.data)

        await nc.subscribe("probe.test", cb=echo)
        sent = [await send_probe(requests, "probe.test", f"p{i}".encode(), 5.0)
                for i in range(20)]
        answers = [await p.reply() for p in sent]
        assert answers == [f"re:p{i}".encode() for i in range(20)]
        assert await (await send_probe(requests, "probe.test", b"silent", 0.2)).reply() is None
        assert await (await send_probe(requests, "probe.nobody", b"x", 5.0)).reply() \
            == NO_RESPONDERS
        assert requests.waiting == 0
    finally:
        await requests.close()
