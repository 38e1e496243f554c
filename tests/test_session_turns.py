"""A worker's cached history windows (workers/session_cache.py, session_turns.py)
against a real nats-server: two workers' SessionTurns share one session. A window
is served from a worker's cache only when its lease proves nobody else held the
session since; otherwise it is read again. Never stale."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus import subjects
from bus.connection import connect, ensure_bus, lease_ttl_seconds
from bus.leases import Leases, SessionLease, lease_owner
from bus.messages import RunRequest, Turn
from bus.nats_adapter import AckedPublisher, LeaderGet
from bus.transcripts import Transcripts, within_budget
from clawbus.config import BusConfig, SessionConfig
from clawbus.natsserver import NatsServer
from gateway.sessions import Sessions
from workers.handover import HeldRuns
from workers.metrics import WorkerMetrics
from workers.session_cache import SessionCache
from workers.session_turns import SessionTurns

BUS = BusConfig(ack_wait_seconds=6)
BUDGET = 60


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    nc = await connect(nats_server.url, "test-session-turns")
    try:
        yield nc, await ensure_bus(nc, BUS, SessionConfig())
    finally:
        await nc.close()


class Side:
    """One worker's session machinery (its own publisher, cache and metrics)."""

    def __init__(self, name: str, nc: Client, js: JetStreamContext) -> None:
        self.owner = lease_owner(name)
        self.publisher = AckedPublisher(nc)
        self.metrics = WorkerMetrics()
        self.leases = Leases(js, lease_ttl_seconds(BUS), self.publisher)
        self.transcripts = Transcripts(js, nc, self.publisher)
        self.turns = SessionTurns(
            nc, self.leases, LeaderGet(self.publisher, wait=5), self.transcripts,
            owner=self.owner, worker_id=name, bus=BUS, budget=BUDGET, max_holds=4,
            metrics=self.metrics, stopping=asyncio.Event(), cancelled=set())

    def served(self) -> tuple[float, float]:
        """Windows served from the cache and read from the stream, so far."""
        return (self.metrics.history_from_cache._value.get(),
                self.metrics.history_from_stream._value.get())

    async def turn(self, token: str, text: str) -> list[Turn]:
        """One run the way the worker does it: lease, window, store, let go; the
        turns the run saw."""
        lease = await SessionLease.acquire(self.leases, token, self.owner,
                                           self.turns.cache.released_at(token))
        assert lease is not None
        window = await self.turns.window(token, lease)
        seen = list(window.turns)
        turn = Turn(run_id=f"r-{uuid.uuid4().hex}", agent_id="main", user=text,
                    assistant=f"echo: {text}", ts=time.time())
        assert await lease.refresh()
        seq = await self.transcripts.append(token, turn, window.last_seq, window)
        self.turns.stored(token, window.after(turn, seq))
        await self.turns.let_go(token, lease)
        return seen


async def test_cached_windows_are_never_stale(bus: tuple[Client, JetStreamContext]) -> None:
    nc, js = bus
    a, b = Side("w-a", nc, js), Side("w-b", nc, js)
    for side in (a, b):
        await side.publisher.start()
    token = subjects.session_token(f"cache-{uuid.uuid4().hex[:8]}")
    said: list[str] = []

    async def turn(side: Side, text: str) -> None:
        seen = await side.turn(token, text)
        whole, _ = await side.transcripts.load(token)
        assert [t.user for t in whole] == [*said, text]
        # The run saw exactly the newest earlier turns that fit the budget.
        assert seen == within_budget(whole[:-1], BUDGET)
        said.append(text)

    try:
        await turn(a, "one")       # read (nothing cached)
        await turn(a, "two")       # cached: A held it last
        await turn(a, "three")     # cached, and the window slides (budget)
        assert a.served() == (2.0, 1.0)
        await turn(b, "four")      # B has nothing cached: reads
        await turn(a, "five")      # A's cache is stale (B held the lease): reads again
        assert a.served() == (2.0, 2.0) and b.served() == (0.0, 1.0)
        await turn(a, "six")
        assert a.served() == (3.0, 2.0)
        # A reset (WS sessions.reset) rewrites the free marker: A reads the empty
        # transcript instead of serving the turns it cached.
        await Sessions(js, nc).reset(subjects.session_key_from_token(token))
        said.clear()
        await turn(a, "seven")
        assert a.served() == (3.0, 3.0)
        await turn(a, "eight")
        assert a.served() == (4.0, 3.0)
    finally:
        for side in (a, b):
            await side.publisher.close()


def test_cache_is_bounded_and_keyed_by_budget() -> None:
    from bus.transcripts import Window

    cache = SessionCache(max_sessions=2, max_chars=100)  # (40 chars a window)
    turn = Turn(run_id="r", agent_id="main", user="x" * 20, assistant="y" * 20, ts=0.0)
    window = Window([turn], [1], turn, 1, BUDGET)
    cache.put("s1", window)
    cache.put("s2", window)
    assert cache.window("s1", BUDGET) is window  # (s1 now the most recent)
    cache.put("s3", window)  # evicts the least recently used: s2
    assert len(cache) == 2 and cache.window("s2", BUDGET) is None
    assert cache.window("s1", BUDGET + 1) is None  # another budget: read again
    cache.released("s1", 42, unbroken=False)  # read under this hold (a window served)
    assert cache.released_at("s1") == 42
    cache.released("s1", 43, unbroken=True)  # a hold taken at our own marker
    assert cache.released_at("s1") == 43
    cache.released("s1", 44, unbroken=False)  # a hold that proved nothing: dropped
    assert cache.released_at("s1") == 0 and cache.window("s1", BUDGET) is None
    cache.put("s1", window)
    cache.released("s1", 45, unbroken=False)
    assert cache.window("s1", BUDGET) is window and cache.released_at("s1") == 0
    big = Turn(run_id="r", agent_id="main", user="x" * 200, assistant="", ts=0.0)
    cache.put("s4", Window([big], [2], big, 2, 1000))  # larger than the cache: not kept
    assert cache.window("s4", 1000) is None


async def test_held_runs_hand_over_only_to_a_waiting_run() -> None:
    held: HeldRuns[str] = HeldRuns()
    assert held.oldest("t") is None
    first = held.hold("t", 7)
    held.hold("t", 9)
    assert held.oldest("t") == 7
    assert not held.hand("t", 8, "lease")  # not held here
    assert held.hand("t", 7, "lease")
    assert not held.hand("t", 7, "again")  # already handed
    assert first.result() == "lease"
    assert held.leave("t", 7) == "lease"  # a run that gave up returns what it got
    assert held.leave("t", 9) is None and held.oldest("t") is None


def test_identity_memo_computes_once_per_object() -> None:
    from workers.memo import IdentityMemo

    calls: list[str] = []

    def shout(text: list[str]) -> str:
        calls.append(text[0])
        return text[0].upper()

    memo: IdentityMemo[list[str], str] = IdentityMemo(shout, size=2)
    a, b, c = ["a"], ["b"], ["c"]
    assert memo(a) == "A" and memo(a) == "A" and calls == ["a"]
    assert memo(["a"]) == "A" and calls == ["a", "a"]  # equal but another object
    memo(b)
    memo(c)  # full: the oldest entries went
    assert len(memo) == 2
    memo(c)
    assert calls == ["a", "a", "b", "c"]


def test_identity_memo_many_matches_one_by_one() -> None:
    """`many` answers what calling the memo per key would, computing only the
    misses, in order, including a key repeated in one call and keys evicted
    while the call fills its misses."""
    from workers.memo import IdentityMemo

    calls: list[str] = []

    def shout(text: list[str]) -> str:
        calls.append(text[0])
        return text[0].upper()

    memo: IdentityMemo[list[str], str] = IdentityMemo(shout, size=3)
    a, b, c, d = ["a"], ["b"], ["c"], ["d"]
    assert memo.many([]) == []
    assert memo.many([a, b, a]) == ["A", "B", "A"] and calls == ["a", "b"]
    assert memo.many([b, c, d, a]) == ["B", "C", "D", "A"]  # d and a push out older ones
    assert calls == ["a", "b", "c", "d"]  # a was still cached when looked up
    assert len(memo) == 3
    calls.clear()
    assert memo.many([a, b]) == ["A", "B"] and calls == ["a"]  # a had been evicted


class _Msg:
    """What SessionTurns.wait uses of a JetStream delivery."""

    reply = "$JS.ACK.fake"

    def __init__(self) -> None:
        self.outcome = ""

    async def term(self) -> None:
        self.outcome = "term"

    async def nak(self, delay: float | None = None) -> None:
        self.outcome = "nak"

    async def in_progress(self) -> None:
        pass


class _Emitter:
    lease: SessionLease | None = None

    async def queued(self, worker_id: str, ack: str) -> None:
        pass


def _run_request(n: int) -> RunRequest:
    """Run ``n`` of a session, as SessionTurns.wait sees it."""
    return RunRequest(run_id=f"r{n}", session_key="k", agent_id="main", message="hi",
                      events_subject="evt.x.y", created=time.time())


async def _two_runs(js: JetStreamContext, prefix: str) -> tuple[str, list[int], list[RunRequest]]:
    """A new session with two runs queued: its token, their sequences, their requests."""
    token = subjects.session_token(f"{prefix}-{uuid.uuid4().hex[:8]}")
    seqs = [(await js.publish(subjects.run(token), b"{}")).seq for _ in range(2)]
    return token, seqs, [_run_request(i) for i in range(2)]



async def test_hand_over_to_the_next_run_held_here(bus: tuple[Client, JetStreamContext]) -> None:
    """A run arriving while this worker runs its session waits; when the running
    one ends, the lease goes straight to it (no release), and the hold is over."""
    nc, js = bus
    a = Side("w-a", nc, js)
    await a.publisher.start()
    token, seqs, runs = await _two_runs(js, "handover")
    try:
        first = await a.turns.wait(cast(Any, _Msg()), runs[0], token, seqs[0],
                                   cast(Any, _Emitter()))
        assert first is not None
        waiting = asyncio.create_task(a.turns.wait(cast(Any, _Msg()), runs[1], token, seqs[1],
                                                   cast(Any, _Emitter())))
        for _ in range(100):  # (until it holds: a few loop turns)
            if a.turns.holds:
                break
            await asyncio.sleep(0.01)
        assert a.turns.holds == 1
        await js.delete_msg("RUNS", seqs[0])  # (its ack)
        await a.turns.pass_on(token, seqs[0], first, "completed")
        second = await asyncio.wait_for(waiting, 5)
        assert second is first and second.held and second.unbroken
        assert a.turns.holds == 0
        assert a.metrics.handovers._value.get() == 1.0
        await a.turns.pass_on(token, seqs[1], second, "completed")  # nobody next: released
        assert not second.held
    finally:
        await a.publisher.close()


async def test_a_held_run_is_woken_by_the_release_itself(
        bus: tuple[Client, JetStreamContext]) -> None:
    """Worker B holds a session's next run while worker A runs the session. A's
    release (the lease's free marker, seen on its KV subject) wakes B at once: B's
    own periodic look is minutes away here, so only the release can be what woke
    it. Once B runs, it watches the session no more."""
    nc, js = bus
    a = Side("w-a", nc, js)
    b = Side("w-b", nc, js)
    slow = BusConfig(ack_wait_seconds=600, heartbeat_seconds=300)
    b.turns = SessionTurns(
        nc, b.leases, LeaderGet(b.publisher, wait=5), b.transcripts, owner=b.owner,
        worker_id="w-b", bus=slow, budget=BUDGET, max_holds=4, metrics=b.metrics,
        stopping=asyncio.Event(), cancelled=set())
    for side in (a, b):
        await side.publisher.start()
    token, seqs, runs = await _two_runs(js, "wake")
    notified = asyncio.Event()

    class Notified(_Emitter):
        async def queued(self, worker_id: str, ack: str) -> None:
            notified.set()

    try:
        first = await a.turns.wait(cast(Any, _Msg()), runs[0], token, seqs[0],
                                   cast(Any, _Emitter()))
        assert first is not None
        waiting = asyncio.create_task(b.turns.wait(cast(Any, _Msg()), runs[1], token, seqs[1],
                                                   cast(Any, Notified())))
        # Held past its queued notice: its next periodic look is 300 s away.
        await asyncio.wait_for(notified.wait(), 10)
        assert b.turns.holds == 1 and token in b.turns._watch
        await js.delete_msg("RUNS", seqs[0])  # (its ack)
        await a.turns.pass_on(token, seqs[0], first, "completed")  # nobody next here
        assert not first.held
        second = await asyncio.wait_for(waiting, 30)
        assert second is not None and second.held and not second.unbroken
        assert b.turns.holds == 0 and token not in b.turns._watch
        await b.turns.let_go(token, second)
    finally:
        for side in (a, b):
            await side.publisher.close()


async def test_a_run_published_as_head_is_started_without_asking_only_when_proven(
        bus: tuple[Client, JetStreamContext]) -> None:
    """A run published as its session's head (bus/heads.py) skips the head check
    only when the lease proves it still stored: taken at this worker's own free
    marker, past the runs it knew were gone. An old delivery of a run already
    served is found out by asking (and dropped); after another worker held the
    lease, this one asks again."""
    from bus import heads

    nc, js = bus
    a, b = Side("w-a", nc, js), Side("w-b", nc, js)
    for side in (a, b):
        await side.publisher.start()
    token = subjects.session_token(f"marked-{uuid.uuid4().hex[:8]}")
    asked: list[int] = []
    real_head = a.turns.head

    async def counted(tok: str, after: int = 0) -> int | None:
        asked.append(after)
        return await real_head(tok, after)

    a.turns.head = counted  # type: ignore[method-assign,assignment]

    async def publish(n: int) -> tuple[RunRequest, int]:
        ack = await js.publish(subjects.run(token), b"{}",
                               headers=heads.as_head({"Nats-Msg-Id": f"{token}-{n}"}))
        return _run_request(n), ack.seq

    async def serve(side: Side, run: RunRequest, seq: int) -> tuple[SessionLease | None, str]:
        msg = _Msg()
        lease = await side.turns.wait(cast(Any, msg), run, token, seq, cast(Any, _Emitter()),
                                      head=True)
        if lease is not None:
            await side.turns.window(token, lease)  # (as every run: the cache keeps it)
            await js.delete_msg("RUNS", seq)  # (its ack)
            await side.turns.pass_on(token, seq, lease, "completed")
        return lease, msg.outcome

    try:
        run1, seq1 = await publish(1)
        assert (await serve(a, run1, seq1))[0] is not None
        assert len(asked) == 1  # nothing known yet: asked
        run2, seq2 = await publish(2)
        assert (await serve(a, run2, seq2))[0] is not None
        assert len(asked) == 1  # proven by the lease: not asked
        # An old delivery of run 1, served long ago: asked, and dropped.
        assert await serve(a, run1, seq1) == (None, "term")
        assert len(asked) == 2
        # Worker B serves the session once: A's marker is gone, so A asks again.
        run3, seq3 = await publish(3)
        assert (await serve(b, run3, seq3))[0] is not None
        run4, seq4 = await publish(4)
        assert (await serve(a, run4, seq4))[0] is not None
        assert len(asked) == 3
        # ... and an old delivery of B's run, after A's own release, is asked about.
        assert await serve(a, run3, seq3) == (None, "term")
        assert len(asked) == 4
    finally:
        for side in (a, b):
            await side.publisher.close()
