"""Fault injection against real worker and gateway processes (issue #4).

Every test here runs real ``python -m cli gateway/worker`` processes on their own
``nats-server`` with short bus timers (``ackWaitSeconds: 3``, ``heartbeatSeconds:
0.5``) and kills, stops or starves them mid-run. The figures each test measures
are printed (``-s`` shows them) and recorded in ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from tests.conftest import Stack, base_config
from tests.faultkit import (
    AUTH,
    URL,
    EventTap,
    FaultyOpenAI,
    SseRun,
    StreamResult,
    body_text,
    last_user,
    lease_owner,
    session_turns,
    stream_once,
)
from tests.procs import wait_until

FAST_BUS = {"ackWaitSeconds": 3, "heartbeatSeconds": 0.5}


def tag() -> str:
    return uuid.uuid4().hex[:10]


def expected_reply(content: str) -> str:
    return f"echo: {content}"


@pytest.fixture
def upstream() -> Iterator[FaultyOpenAI]:
    with FaultyOpenAI() as up:
        yield up


# --------------------------------------------------------------------------- SIGKILL


@dataclass
class Kill:
    worker_id: str
    t: float
    busy: int  # runs the tap saw it holding when it was killed


def _killer(stack: Stack, tap: EventTap, kills: list[Kill], n_kills: int, interval: float,
            stop: threading.Event, errors: list[str], seed: int) -> None:
    """SIGKILL a busy worker every ~interval s and start a replacement in the background."""
    rng = random.Random(seed)
    spawners: list[threading.Thread] = []

    def spawn() -> None:
        try:
            stack.add_worker()
        except Exception as exc:  # reported by the test
            errors.append(f"replacement worker failed to start: {exc!r}")

    try:
        while len(kills) < n_kills:
            if stop.wait(interval * rng.uniform(0.6, 1.4)):
                return
            alive = [w for w in list(stack.workers) if w.popen.poll() is None]
            if len(alive) < 2:
                continue  # always leave one worker serving
            busy = tap.busy_workers()
            candidates = [w for w in alive if busy.get(w.worker_id)] or alive
            victim = rng.choice(candidates)
            victim.kill()
            kills.append(Kill(victim.worker_id, time.monotonic(), busy.get(victim.worker_id, 0)))
            thread = threading.Thread(target=spawn, name="spawn-worker", daemon=True)
            thread.start()
            spawners.append(thread)
    finally:
        for thread in spawners:
            thread.join(60)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_workers_mid_run(upstream: FaultyOpenAI, tmp_path: Path) -> None:
    """≥ 20 SIGKILLs of busy workers while 12 sessions pipeline runs through two
    gateways. Every run ends for its client complete or with a clean error frame;
    no client sees duplicated text; runs killed before streaming are retried
    transparently; transcripts hold each turn whole and once, in session order."""
    n_kills, interval, sessions = 20, 2.0, 12
    prefix = tag()
    # Half the runs wait 0.8 s before the upstream answers: kills land in that
    # window (nothing streamed → transparent retry) as well as mid-stream.
    upstream.token_delay = 0.04
    upstream.head_delay = lambda body: 0.8 if "slowstart" in orjson.dumps(body).decode() else 0.0
    config = base_config(upstream, queueTimeoutSeconds=20, **FAST_BUS)
    stack = Stack.start(tmp_path, upstream, config, gateways=2, workers=3)
    kills: list[Kill] = []
    spawn_errors: list[str] = []
    stop = threading.Event()
    results: dict[int, list[StreamResult]] = {s: [] for s in range(sessions)}

    async def one_session(s: int, http: httpx.AsyncClient, done: threading.Event) -> None:
        key = f"kill:{prefix}:{s}"
        for r in itertools.count(0, 2):
            if done.is_set():
                return
            pair = []
            for i in (r, r + 1):  # two pipelined runs of the session in flight
                slow = " slowstart" if (s + i) % 2 else ""
                content = f"{prefix} s{s} r{i}{slow} a b c d e f g h i j"
                run = SseRun(http, stack.gateways[(s + i) % 2].url, content,
                             {"x-openclaw-session-key": key})
                await run.open()
                pair.append(run)
            for run in pair:
                results[s].append(await run.finish())

    async def main(tap: EventTap) -> float:
        killer = threading.Thread(
            target=_killer, name="killer", daemon=True,
            args=(stack, tap, kills, n_kills, interval, stop, spawn_errors, 4))
        started = time.monotonic()
        finished = threading.Event()
        killer.start()
        async with httpx.AsyncClient(timeout=90) as http:
            clients = [asyncio.create_task(one_session(s, http, finished))
                       for s in range(sessions)]
            await asyncio.to_thread(killer.join, 200)
            finished.set()
            await asyncio.gather(*clients)
        return time.monotonic() - started

    async def run_all() -> tuple[float, EventTap]:
        tap = await EventTap().start(stack.nats.url)
        try:
            elapsed = await main(tap)
            await asyncio.sleep(0.5)  # late events, if any
        finally:
            await tap.close()
        return elapsed, tap

    try:
        elapsed, tap = asyncio.run(run_all())
        turns = {s: asyncio.run(session_turns(stack.nats.url, f"kill:{prefix}:{s}"))
                 for s in range(sessions)}
    finally:
        stop.set()
        stack.stop()
    assert not spawn_errors, spawn_errors
    assert len(kills) >= n_kills, kills
    _check_kill_run(prefix, results, turns, tap, upstream, kills, elapsed)


def _index(content: str) -> int:
    return int(content.split()[2][1:])


def _check_kill_run(prefix: str, results: dict[int, list[StreamResult]],
                    turns: dict[int, Any], tap: EventTap, upstream: FaultyOpenAI,
                    kills: list[Kill], elapsed: float) -> None:
    all_runs = [r for rs in results.values() for r in rs]
    complete = [r for r in all_runs if r.complete]
    errored = [r for r in all_runs if not r.complete]
    # 1. Every run ended for its client: complete, or a clean error; none hung.
    for r in errored:
        assert r.clean_error, (r.content, r.status, r.frames, r.transport_error)
    # 2. No duplicated text: complete runs carry exactly the reply, failed ones a prefix.
    for r in all_runs:
        want = expected_reply(r.content)
        if r.complete:
            assert r.text == want, (r.text, want)
        else:
            assert want.startswith(r.text), (r.text, want)
    # 3. Transcripts: every turn whole and stored once, in session order; every run
    #    its client saw complete is stored.
    stored_after_error = 0
    for s, session_turns_ in turns.items():
        ids = [t.run_id for t in session_turns_]
        assert len(ids) == len(set(ids)), f"duplicate turn in session {s}"
        for t in session_turns_:
            assert t.assistant == expected_reply(t.user), "half or mangled turn"
        order = [_index(t.user) for t in session_turns_]
        assert order == sorted(order), order
        by_id = {r.run_id: r for r in results[s]}
        for r in results[s]:
            if r.complete:
                assert r.run_id in ids, f"completed run {r.run_id} missing from transcript"
        stored_after_error += sum(1 for i in ids if i in by_id and not by_id[i].complete)
    # 4. Session order upstream: no two attempts of a session overlap, run indexes never
    #    go backwards, and each attempt saw exactly the turns stored before it.
    for s, session_turns_ in turns.items():
        stored = [t.user for t in session_turns_]
        recs = sorted((r for r in upstream.requests if f"{prefix} s{s} " in body_text(r)),
                      key=lambda r: r.started)
        idx = [_index(last_user(r)) for r in recs]
        assert idx == sorted(idx), idx
        for earlier, later in itertools.pairwise(recs):
            assert earlier.ended is not None and earlier.ended <= later.started
        for rec in recs:
            history = [m["content"] for m in rec.body["messages"][1:-1] if m["role"] == "user"]
            k = _index(last_user(rec))
            assert history == [u for u in stored if _index(u) < k], (history, k)
    # 5. Transparent restarts: runs accepted by two workers that completed for the client.
    events = tap.snapshot()
    accepted_by: dict[str, set[str]] = {}
    accept_times: dict[str, list[float]] = {}
    for e in events:
        if e.type == "accepted" and e.worker_id:
            accepted_by.setdefault(e.run_id, set()).add(e.worker_id)
            accept_times.setdefault(e.run_id, []).append(e.t)
    killed = {k.worker_id: k.t for k in kills}
    retried = [r for r in complete if len(accepted_by.get(r.run_id or "", ())) > 1]
    recovery = []
    for r in retried:
        first_worker_kill = min(killed.get(w, float("inf"))
                                for w in accepted_by[r.run_id or ""])
        later = [t for t in accept_times[r.run_id or ""] if t > first_worker_kill]
        if later:
            recovery.append(min(later) - first_worker_kill)
    hit = [r for r in all_runs if any(w in killed for w in accepted_by.get(r.run_id or "", ()))]
    reasons: dict[str, int] = {}
    for r in errored:
        code = (r.error or {}).get("code") or (r.error or {}).get("message")
        reasons[str(code)] = reasons.get(str(code), 0) + 1
    print(f"\nSIGKILL: {len(kills)} kills ({sum(k.busy > 0 for k in kills)} of busy workers) "
          f"in {elapsed:.1f} s; {len(all_runs)} runs, {len(hit)} hit by a kill; "
          f"{len(complete)} complete, {len(errored)} clean errors {reasons}; "
          f"{len(retried)} transparently retried (recovery "
          f"median {statistics.median(recovery) if recovery else 0:.2f} s, "
          f"max {max(recovery, default=0):.2f} s); 0 lost, 0 duplicated; "
          f"{stored_after_error} errors whose turn was nevertheless stored")
    assert retried, "no run was transparently retried after its worker was killed"
