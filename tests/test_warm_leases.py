"""Warm session leases (workers/warm_leases.py): a worker alone keeps a session's
lease between its runs, and lets it go whenever anyone else could need it.

Real processes: a nats-server, a gateway, one worker (then a second, or a
replacement), the fake model; the official SDK as the client; the lease read
from the ``LEASES`` bucket itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import nats
import orjson
import pytest
from nats.js.errors import NotFoundError

from bus import subjects
from bus.leases import SessionLease
from gateway.sessions import Sessions
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import Stack, base_config, sdk_client, seen_by_upstream
from workers.liveness import Liveness
from workers.warm_leases import WarmLeases

HEARTBEAT = 1.0
LEASE_STREAM = f"KV_{subjects.LEASES_BUCKET}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as up:
        yield up


def config(upstream: FakeOpenAI) -> dict[str, object]:
    # A lease lives the ack wait (30 s): kept warm up to ~15 s, never expiring
    # within a test by itself.
    return base_config(upstream, heartbeatSeconds=HEARTBEAT, ackWaitSeconds=30,
                       queueTimeoutSeconds=30)


@pytest.fixture(scope="module")
def stack(upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack.start(tmp_path_factory.mktemp("warm"), upstream, config(upstream))
    try:
        yield st
    finally:
        st.stop()


def turn(url: str, key: str, text: str) -> str:
    with sdk_client(url) as client:
        reply = client.chat.completions.create(
            model="openclaw", messages=[{"role": "user", "content": text}],
            extra_headers={"x-openclaw-session-key": key})
    return reply.choices[0].message.content or ""


async def lease(url: str, key: str) -> tuple[bytes, int] | None:
    """The session's lease as stored: its value and revision (None: absent)."""
    nc = await nats.connect(url)
    try:
        msg = await nc.jetstream().get_msg(LEASE_STREAM, direct=False,
                                           subject=subjects.lease_key(subjects.session_token(key)))
    except NotFoundError:
        return None
    finally:
        await nc.close()
    return (msg.data or b""), int(msg.seq or 0)


async def lease_writes(url: str) -> int:
    """Every lease write so far (the bucket stream's last sequence)."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(LEASE_STREAM)
    finally:
        await nc.close()
    return int(info.state.last_seq)


def held_by(value: bytes) -> str | None:
    return None if value in (b"", b"free") else str(orjson.loads(value)["worker"])


def test_a_lone_worker_keeps_the_lease_for_the_sessions_next_run(stack: Stack,
                                                                  upstream: FakeOpenAI) -> None:
    key, tag = f"warm:{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    (worker,) = stack.workers
    assert turn(stack.url, key, f"{tag} one") == f"echo: {tag} one"
    kept = asyncio.run(lease(stack.nats.url, key))
    assert kept is not None and held_by(kept[0]) == worker.worker_id  # not let go
    before = asyncio.run(lease_writes(stack.nats.url))
    assert turn(stack.url, key, f"{tag} two") == f"echo: {tag} two"
    # The next run took the kept lease: its one write is the fenced refresh
    # before its append (taken cold: acquire, refresh, release).
    assert asyncio.run(lease_writes(stack.nats.url)) == before + 1
    after = asyncio.run(lease(stack.nats.url, key))
    assert after is not None and held_by(after[0]) == worker.worker_id
    # ... and the history it saw was the session's (the worker's cached window).
    assert seen_by_upstream(upstream, f"{tag} two") == [
        {"role": "user", "content": f"{tag} one"},
        {"role": "assistant", "content": f"echo: {tag} one"},
        {"role": "user", "content": f"{tag} two"}]


def test_a_reset_session_starts_afresh_on_a_kept_lease(stack: Stack,
                                                        upstream: FakeOpenAI) -> None:
    """Without the reset's notice the worker would serve the history it kept, and
    the append would then find the transcript changed: an error."""
    key, tag = f"warm-reset:{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    assert turn(stack.url, key, f"{tag} before") == f"echo: {tag} before"
    kept = asyncio.run(lease(stack.nats.url, key))
    assert kept is not None and held_by(kept[0]) is not None

    async def reset() -> None:  # what the gateway's sessions.reset does
        nc = await nats.connect(stack.nats.url)
        try:
            await Sessions(nc.jetstream(), nc).reset(key)
        finally:
            await nc.close()

    asyncio.run(reset())
    assert turn(stack.url, key, f"{tag} after") == f"echo: {tag} after"
    assert seen_by_upstream(upstream, f"{tag} after") == [
        {"role": "user", "content": f"{tag} after"}]


def test_kept_leases_are_let_go_when_another_worker_appears(stack: Stack) -> None:
    key, tag = f"warm-2nd:{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    assert turn(stack.url, key, f"{tag} one") == f"echo: {tag} one"
    kept = asyncio.run(lease(stack.nats.url, key))
    assert kept is not None and held_by(kept[0]) is not None
    second = stack.add_worker()
    try:
        async def let_go() -> None:
            found: list[tuple[bytes, int] | None] = [kept]

            async def check() -> None:
                while found[0] is not None and held_by(found[0][0]) is not None:
                    await asyncio.sleep(0.05)
                    found[0] = await lease(stack.nats.url, key)

            await asyncio.wait_for(check(), 10)  # (the first heartbeat is at once)

        asyncio.run(let_go())
        # Two workers now: the session's runs take and let go as before.
        assert turn(stack.url, key, f"{tag} two") == f"echo: {tag} two"
        final = asyncio.run(lease(stack.nats.url, key))
        assert final is not None and final[0] == b"free"
    finally:
        second.stop()
        stack.workers.remove(second)


def test_a_clean_stop_lets_kept_leases_go(upstream: FakeOpenAI, tmp_path: Path) -> None:
    st = Stack.start(tmp_path, upstream, config(upstream))
    try:
        key = f"warm-stop:{uuid.uuid4().hex[:8]}"
        assert turn(st.url, key, "hello") == "echo: hello"
        kept = asyncio.run(lease(st.nats.url, key))
        assert kept is not None and held_by(kept[0]) is not None
        (worker,) = st.workers
        worker.stop()
        st.workers.clear()
        stopped = asyncio.run(lease(st.nats.url, key))
        assert stopped is not None and stopped[0] == b"free"
    finally:
        st.stop()


def test_a_killed_workers_kept_lease_is_freed_for_the_next_run(upstream: FakeOpenAI,
                                                              tmp_path: Path) -> None:
    """The lone worker dies holding a session's lease between runs; its
    replacement, holding the session's next run, frees it once its registry view
    takes the dead worker for dead (within 3 heartbeats), not when the lease
    would expire (the 30 s ack wait)."""
    st = Stack.start(tmp_path, upstream, config(upstream))
    try:
        key = f"warm-kill:{uuid.uuid4().hex[:8]}"
        assert turn(st.url, key, "before the kill") == "echo: before the kill"
        (dead,) = st.workers
        kept = asyncio.run(lease(st.nats.url, key))
        assert kept is not None and held_by(kept[0]) == dead.worker_id
        dead.kill()
        st.workers.clear()
        st.add_worker()
        started = time.monotonic()
        assert turn(st.url, key, "after the kill") == "echo: after the kill"
        took = time.monotonic() - started
        print(f"\nkept lease of a killed worker: the next turn answered {took:.2f} s after "
              "its replacement started")
        # Behaviour, not speed: the lease alone would have lived 30 s.
        assert took < 3 * HEARTBEAT + 5
        assert seen_by_upstream(upstream, "after the kill")[0] == {
            "role": "user", "content": "before the kill"}
    finally:
        st.stop()


# --------------------------------------------------------------------------- WarmLeases alone


class _Lease:
    """What WarmLeases reads of a SessionLease."""

    def __init__(self, seconds_left: float) -> None:
        self.deadline = time.monotonic() + seconds_left
        self.held = True


def _warm(ttl: float) -> tuple[WarmLeases, list[tuple[str, int]]]:
    cold: list[tuple[str, int]] = []
    return WarmLeases(ttl, lambda token, lease, gone: cold.append((token, gone))), cold


async def test_a_lease_is_kept_only_while_half_its_ttl_is_left() -> None:
    warm, cold = _warm(ttl=10.0)
    assert not warm.keep("a", cast(SessionLease, _Lease(4.9)), 7)  # under half left
    young = cast(SessionLease, _Lease(9.9))
    assert warm.keep("b", young, 8)
    assert warm.take("b") == (young, 8) and "b" not in warm
    assert warm.take("b") is None and cold == []


async def test_a_kept_lease_goes_cold_when_half_its_ttl_is_left() -> None:
    warm, cold = _warm(ttl=1.0)
    assert warm.keep("s", cast(SessionLease, _Lease(0.55)), 3)  # cold in ~50 ms
    async with asyncio.timeout(5):
        while not cold:  # noqa: ASYNC110 - the timer's callback, no event to await
            await asyncio.sleep(0.01)
    assert cold == [("s", 3)] and "s" not in warm and warm.take("s") is None


async def test_a_kept_lease_is_not_taken_after_a_liveness_lapse() -> None:
    warm, cold = _warm(ttl=10.0)
    liveness = Liveness(heartbeat_seconds=1.0)
    liveness.wrote(time.monotonic())
    warm.liveness = liveness
    assert warm.keep("s", cast(SessionLease, _Lease(9.9)), 5)
    liveness.until = time.monotonic() - 1  # its heartbeats stalled: maybe taken for dead
    liveness.wrote(time.monotonic())  # ... and it came back: a new epoch
    assert warm.take("s") is None and cold == [("s", 5)]
