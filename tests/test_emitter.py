"""workers.events.Emitter against a real nats-server: coalescing, order, fencing.

Text goes out at once while the pacing has credit (one event per window on
average), otherwise once it has, joined; every event is numbered in order; the
final event comes after all text; text is held while the session lease may have
lapsed.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass

import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from bus.messages import Usage
from bus.nats_adapter import Requester
from workers.events import Emitter


@dataclass
class StubLease:
    deadline: float
    still_ours: bool = True

    async def confirm(self) -> bool:
        return self.still_ours


WINDOW = 0.2  # long enough that a loaded CI machine still sends a burst inside it


async def emitter_and_events(nc: Client, *, coalesce: float = WINDOW,
                             streaming: bool = True) -> tuple[Emitter, Subscription]:
    """An emitter for a fresh events subject, and a subscription reading it."""
    subject = f"evt.test.{uuid.uuid4().hex}"
    sub = await nc.subscribe(subject)
    await nc.flush()
    requests = Requester(nc)
    await requests.start()
    return Emitter(nc, requests, subject, attempt=1, coalesce_seconds=coalesce,
                   streaming=streaming), sub


async def next_event(sub: Subscription, wait: float = 5.0) -> dict[str, object]:
    msg = await sub.next_msg(timeout=wait)
    event: dict[str, object] = orjson.loads(msg.data)
    return event


async def test_first_text_goes_at_once_then_a_burst_is_one_event(nc: Client) -> None:
    emitter, sub = await emitter_and_events(nc)
    started = time.monotonic()
    await emitter.delta("Hello")
    first = await next_event(sub)
    assert first == {"v": 1, "seq": 1, "attempt": 1, "type": "delta", "text": "Hello"}
    # A behaviour check, not a speed check: held text would wait out the window.
    assert time.monotonic() - started < WINDOW  # not held for a window
    for word in (" big", " wide", " world"):  # right after "Hello" spent the credit
        await emitter.delta(word)
    burst = await next_event(sub)
    assert burst["text"] == " big wide world" and burst["seq"] == 2
    # waited for the credit: half a window (the bucket's slack is half a credit);
    # lower bounds check the pacing, and a slow machine can only add to them
    assert time.monotonic() - started >= WINDOW * 0.45
    for word in (" again", " and", " again"):
        await emitter.delta(word)
    burst = await next_event(sub)
    assert burst["text"] == " again and again" and burst["seq"] == 3
    assert time.monotonic() - started >= WINDOW * 1.4  # from then on, a window each
    await emitter.aclose()


async def test_sparse_text_is_never_delayed(nc: Client) -> None:
    emitter, sub = await emitter_and_events(nc, coalesce=0.01)
    for i in range(3):
        await emitter.delta(f"t{i}")
        event = await next_event(sub)
        assert event["text"] == f"t{i}" and event["seq"] == i + 1
        await asyncio.sleep(0.02)  # the pacing under test: each token after its window
    await emitter.aclose()


async def test_text_at_the_window_rate_is_never_held(nc: Client) -> None:
    """A provider streaming one token per window, arriving a little early or late,
    gets every token sent at once (a fixed window from the last send made such a
    stream fall further behind with every token)."""
    emitter, sub = await emitter_and_events(nc)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(8):
        jitter = (0.2 if i % 2 else -0.2) * WINDOW  # early, late, early, …
        await asyncio.sleep(max(0.0, start + (i + 1) * WINDOW + jitter - loop.time()))
        await emitter.delta(f"t{i}")
        assert emitter._timer is None, f"token {i} was held for the pacing"
        event = await next_event(sub)
        assert event["text"] == f"t{i}"
    await emitter.aclose()


async def test_done_comes_after_all_buffered_text(nc: Client) -> None:
    emitter, sub = await emitter_and_events(nc)
    await emitter.delta("a")
    await emitter.delta("b")  # waits for the window…
    await emitter.done("ab", Usage(prompt_tokens=1, completion_tokens=2), "stop")  # …or not
    events = [await next_event(sub) for _ in range(3)]
    assert [(e["type"], e.get("text")) for e in events] == [
        ("delta", "a"), ("delta", "b"), ("done", "ab")]
    assert [e["seq"] for e in events] == [1, 2, 3]
    await emitter.aclose()


async def test_text_is_held_while_the_lease_may_have_lapsed(nc: Client) -> None:
    emitter, sub = await emitter_and_events(nc)
    lease = StubLease(time.monotonic() - 1.0)  # e.g. thawed after a long stall
    emitter.lease = lease
    await emitter.delta("late")
    with pytest.raises(nats.errors.TimeoutError):
        await next_event(sub, wait=WINDOW)
    lease.deadline = math.inf  # a refresh proved the lease is still ours
    emitter.lease_renewed()
    event = await next_event(sub)
    assert event["text"] == "late" and event["seq"] == 1
    await emitter.aclose()


async def test_non_streaming_runs_send_text_only_in_the_final_event(nc: Client) -> None:
    emitter, sub = await emitter_and_events(nc, streaming=False)
    await emitter.delta("x")
    await emitter.done("x", Usage(), "stop")
    event = await next_event(sub)
    assert event["type"] == "done" and event["seq"] == 1
    await emitter.aclose()
