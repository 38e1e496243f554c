"""Session leases (bus.leases) against a real nats-server: CAS acquire, fenced refresh,
release through the ``free`` marker, and expiry by per-message TTL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus import subjects
from bus.connection import connect, ensure_bus, lease_ttl_seconds
from bus.leases import FREE, Leases, SessionLease
from bus.nats_adapter import AckedPublisher
from bus.subjects import session_token
from clawbus.config import BusConfig, SessionConfig
from clawbus.natsserver import NatsServer

BUS = BusConfig(ack_wait_seconds=3)
TTL = lease_ttl_seconds(BUS)
LEASES_STREAM = f"KV_{subjects.LEASES_BUCKET}"
A = b"worker-a"
B = b"worker-b"


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await connect(nats_server.url, "test-leases")
    try:
        yield await ensure_bus(nc, BUS, SessionConfig())
    finally:
        await nc.close()


@pytest.fixture(params=["AckedPublisher", "js.publish"])
async def leases(request: pytest.FixtureRequest,
                 js: JetStreamContext) -> AsyncIterator[Leases]:
    """Both ways of writing: bus.nats_adapter.AckedPublisher (the worker's) and nats-py's
    js.publish: the CAS answers must be the same."""
    if request.param == "js.publish":
        yield Leases(js, TTL)
        return
    publisher = AckedPublisher(js._nc)
    await publisher.start()
    try:
        yield Leases(js, TTL, publisher)
    finally:
        await publisher.close()


async def stored(js: JetStreamContext, token: str) -> bytes | None:
    """The current value of the session's lease key (None if absent/expired)."""
    try:
        msg = await js.get_msg(
            LEASES_STREAM, subject=f"$KV.{subjects.LEASES_BUCKET}.{token}", direct=False)
    except NotFoundError:
        return None
    return msg.data


def test_ttl_is_whole_seconds_just_under_the_ack_wait() -> None:
    assert TTL == 2
    assert lease_ttl_seconds(BusConfig(ack_wait_seconds=3.2)) == 3
    assert lease_ttl_seconds(BusConfig(ack_wait_seconds=30)) == 29


async def test_acquire_fresh_session(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("fresh session.*>")
    rev = await leases.acquire(token, A)
    assert isinstance(rev, int)
    assert rev > 0
    assert await stored(js, token) == A


async def test_second_acquire_fails_while_held(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("held")
    rev = await leases.acquire(token, A)
    assert rev is not None
    assert await leases.acquire(token, B) is None
    # Nor can the holder take it a second time (acquire is not re-entrant).
    assert await leases.acquire(token, A) is None
    assert await stored(js, token) == A
    # The failed attempts changed nothing: the holder's revision still works.
    assert await leases.refresh(token, A, rev) is not None


async def test_leases_are_per_session(leases: Leases) -> None:
    keys = ["s1", "s2", "s1.s2", "*", ">", ""]
    revs = [await leases.acquire(session_token(k), A) for k in keys]
    assert all(r is not None for r in revs)
    assert len(set(revs)) == len(keys)


async def test_refresh_with_current_revision(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("refresh")
    rev = await leases.acquire(token, A)
    assert rev is not None
    rev2 = await leases.refresh(token, A, rev)
    assert rev2 is not None
    assert rev2 > rev
    rev3 = await leases.refresh(token, A, rev2)
    assert rev3 is not None
    assert rev3 > rev2
    assert await stored(js, token) == A


async def test_refresh_with_stale_revision_is_fenced(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("fencing")
    rev = await leases.acquire(token, A)
    assert rev is not None
    rev2 = await leases.refresh(token, A, rev)
    assert rev2 is not None
    assert await leases.refresh(token, A, rev) is None
    assert await leases.refresh(token, B, rev) is None
    # A revision from the future is not accepted either.
    assert await leases.refresh(token, A, rev2 + 100) is None
    # The current holder is unaffected.
    assert await leases.refresh(token, A, rev2) is not None


async def test_release_then_acquire_via_free_marker(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("release")
    rev = await leases.acquire(token, A)
    assert rev is not None
    await leases.release(token, rev)
    # The key now holds the free marker (not yet expired): acquire must CAS over it.
    assert await stored(js, token) == FREE
    rev_b = await leases.acquire(token, B)
    assert rev_b is not None
    assert rev_b > rev
    assert await stored(js, token) == B
    # The old holder is fenced off, the new one is not.
    assert await leases.refresh(token, A, rev) is None
    assert await leases.acquire(token, A) is None
    assert await leases.refresh(token, B, rev_b) is not None


async def test_free_marker_expires(js: JetStreamContext) -> None:
    """Released sessions leave nothing behind (the marker has a TTL: 1 s here)."""
    leases = Leases(js, 5, free_ttl_seconds=1)
    token = session_token("idle")
    rev = await leases.acquire(token, A)
    assert rev is not None
    await leases.release(token, rev)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1 + 3
    while await stored(js, token) is not None:
        assert loop.time() < deadline, "free marker did not expire"
        await asyncio.sleep(0.1)
    # And from empty, acquire works again.
    assert await leases.acquire(token, B) is not None


async def test_stale_release_does_not_clobber(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("stale release")
    rev = await leases.acquire(token, A)
    assert rev is not None
    rev2 = await leases.refresh(token, A, rev)
    assert rev2 is not None
    await leases.release(token, rev)  # stale: must be a no-op
    assert await stored(js, token) == A
    assert await leases.acquire(token, B) is None
    assert await leases.refresh(token, A, rev2) is not None


async def test_stale_release_after_handover(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("handover")
    rev_a = await leases.acquire(token, A)
    assert rev_a is not None
    await leases.release(token, rev_a)
    rev_b = await leases.acquire(token, B)
    assert rev_b is not None
    await leases.release(token, rev_a)  # A releases again (e.g. a retried cleanup)
    assert await stored(js, token) == B
    assert await leases.acquire(token, A) is None
    assert await leases.refresh(token, B, rev_b) is not None


async def test_lease_expires_by_ttl(js: JetStreamContext, leases: Leases) -> None:
    token = session_token("expiring")
    rev_a = await leases.acquire(token, A)
    assert rev_a is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + TTL + 3
    rev_b: int | None = None
    while rev_b is None:
        assert loop.time() < deadline, "lease did not expire within ttl+3 s"
        rev_b = await leases.acquire(token, B)
        if rev_b is None:
            await asyncio.sleep(0.1)
    # It was held for (about) the TTL, not taken early. Both bounds are behaviour
    # (expires by its TTL, not early, not never), not speed: the upper one is 3 s loose.
    assert loop.time() - started >= TTL - 0.5
    assert await stored(js, token) == B
    # The stalled old holder finds out on its next refresh and cannot clobber B.
    assert await leases.refresh(token, A, rev_a) is None
    await leases.release(token, rev_a)
    assert await stored(js, token) == B
    assert await leases.refresh(token, B, rev_b) is not None


# -- SessionLease: one worker's hold on a lease -----------------------------------


async def test_session_lease_acquire_refresh_release(leases: Leases,
                                                     js: JetStreamContext) -> None:
    token = session_token("agent:main:session-lease")
    before = asyncio.get_running_loop().time()
    lease = await SessionLease.acquire(leases, token, A)
    assert lease is not None and lease.held and lease.token == token
    assert lease.deadline >= before + TTL
    assert await SessionLease.acquire(leases, token, B) is None  # held
    first = lease.revision
    deadline = lease.deadline
    assert await lease.refresh()
    assert lease.revision is not None and first is not None and lease.revision > first
    assert lease.deadline >= deadline
    await lease.release()
    assert not lease.held
    assert await stored(js, token) == FREE
    await lease.release()  # idempotent: no second write
    assert await SessionLease.acquire(leases, token, B) is not None


async def test_a_lost_session_lease_stays_lost_and_is_never_released(
        leases: Leases, js: JetStreamContext) -> None:
    token = session_token("agent:main:session-lease-lost")
    lease = await SessionLease.acquire(leases, token, A)
    assert lease is not None and lease.revision is not None
    # Someone else wrote (e.g. our lease expired while we stalled and B took it).
    taken = await leases.refresh(token, B, lease.revision)
    assert taken is not None
    assert not await lease.refresh()
    assert not lease.held
    assert not await lease.confirm()
    await lease.release()  # must not clobber B's lease
    assert await stored(js, token) == B


async def test_concurrent_refreshes_never_fence_each_other(leases: Leases) -> None:
    token = session_token("agent:main:session-lease-concurrent")
    lease = await SessionLease.acquire(leases, token, A)
    assert lease is not None
    # The keep-alive and the refresh before storing a turn may meet: both must
    # succeed (unserialised, the second CAS at the same revision would fail).
    assert await asyncio.gather(*(lease.refresh() for _ in range(5))) == [True] * 5
    assert lease.held
    await lease.release()


async def test_confirm_says_false_when_the_bus_cannot_answer(leases: Leases) -> None:
    class Unreachable(Leases):
        async def refresh(self, token: str, owner: bytes, revision: int) -> int | None:
            raise TimeoutError

    token = session_token("agent:main:session-lease-unreachable")
    held = await SessionLease.acquire(leases, token, A)
    assert held is not None and held.revision is not None
    lease = SessionLease(Unreachable(leases._js, TTL), token, A, held.revision, 0.0)
    with pytest.raises(TimeoutError):
        await lease.refresh()  # the caller decides (retry while the deadline allows)
    assert lease.held  # it may still be ours
    assert not await lease.confirm()
    await held.release()


async def test_acquire_at_own_free_marker_proves_nobody_held_it(leases: Leases) -> None:
    """The history cache's proof (workers/session_cache.py): an acquire at the free
    marker this worker wrote succeeds there only if nobody held the lease since."""
    token = session_token(f"proof-{uuid.uuid4().hex}")
    rev = await leases.acquire(token, A)
    assert rev is not None
    free = await leases.release(token, rev)
    assert free is not None
    taken = await leases.acquire_at(token, A, free)
    assert taken is not None and taken[1] is True
    free = await leases.release(token, taken[0])
    assert free is not None
    # B held it in between: A still gets the lease, but not "there".
    rev_b = await leases.acquire(token, B)
    assert rev_b is not None
    assert await leases.release(token, rev_b) is not None
    taken = await leases.acquire_at(token, A, free)
    assert taken is not None and taken[1] is False
    # Held by A now: B's acquire at the old free marker fails.
    assert await leases.acquire_at(token, B, free) is None


async def test_touch_voids_the_proof_but_never_a_holder(js: JetStreamContext,
                                                        leases: Leases) -> None:
    """A session reset rewrites a free marker (an acquire at the old one is no
    proof any more) and leaves a held lease alone."""
    token = session_token(f"touched-{uuid.uuid4().hex}")
    rev = await leases.acquire(token, A)
    assert rev is not None
    await leases.touch(token)  # held: untouched
    assert await stored(js, token) == A
    rev = await leases.refresh(token, A, rev)
    assert rev is not None
    free = await leases.release(token, rev)
    assert free is not None
    await leases.touch(token)
    taken = await leases.acquire_at(token, A, free)
    assert taken is not None and taken[1] is False
    await leases.touch(session_token("never used"))  # absent: nothing to do
