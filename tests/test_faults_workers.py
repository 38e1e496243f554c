"""Fault injection against real worker and gateway processes (issue #4).

Every test here runs real ``python -m clawbus gateway/worker`` processes on their own
``nats-server`` with short bus timers (``ackWaitSeconds: 3``, ``heartbeatSeconds:
0.5``) and kills, stops or starves them mid-run. The figures each test measures
are printed (``-s`` shows them) and recorded in ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from tests.faultkit import (
    AUTH,
    URL,
    EventTap,
    FaultyOpenAI,
    SseRun,
    StreamResult,
    body_text,
    expected_reply,
    last_user,
    lease_owner,
    session_turns,
    stream_once,
    tag,
)
from tests.helpers import Stack, base_config

FAST_BUS = {"ackWaitSeconds": 3, "heartbeatSeconds": 0.5}


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


def _killer(stack: Stack, tap: EventTap, kills: list[Kill], *, n_kills: int, interval: float,
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
            target=_killer, name="killer", daemon=True, args=(stack, tap, kills),
            kwargs={"n_kills": n_kills, "interval": interval, "stop": stop,
                    "errors": spawn_errors, "seed": 4})
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
    _check_kill_run(prefix, results, turns=turns, tap=tap, upstream=upstream, kills=kills,
                    elapsed=elapsed)


def _index(content: str) -> int:
    return int(content.split()[2][1:])


def _check_kill_run(prefix: str, results: dict[int, list[StreamResult]], *,
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
    # 5. Transparent restarts: runs an attempt of which was killed that still completed.
    events = tap.snapshot()
    killed = {k.worker_id: k.t for k in kills}
    accepted: dict[tuple[str, int], tuple[str, float]] = {}
    ended_at: dict[tuple[str, int], float] = {}
    for e in events:
        if e.type == "accepted" and e.worker_id:
            accepted[(e.run_id, e.attempt)] = (e.worker_id, e.t)
        elif e.type in ("done", "error"):
            ended_at.setdefault((e.run_id, e.attempt), e.t)
    hit_at: dict[str, float] = {}  # run id → when a kill interrupted one of its attempts
    for (run_id, attempt), (worker, t_accept) in accepted.items():
        t_kill = killed.get(worker)
        if t_kill is not None and t_accept < t_kill < ended_at.get((run_id, attempt), 1e18):
            hit_at[run_id] = min(hit_at.get(run_id, 1e18), t_kill)
    retried = [r for r in complete if r.run_id in hit_at]
    recovery = []
    for r in retried:
        t_kill = hit_at[r.run_id or ""]
        again = [t for (run_id, _), (_, t) in accepted.items() if run_id == r.run_id and t > t_kill]
        if again:
            recovery.append(min(again) - t_kill)
    hit = [r for r in all_runs if r.run_id in hit_at]
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
          f"{stored_after_error} errors whose turn was nevertheless stored; "
          f"{sum(1 for r in errored if not r.text)} errors before any text")
    assert retried, "no run was transparently retried after its worker was killed"


# --------------------------------------------------------------------------- SIGSTOP


def _worker_of(stack: Stack, tap: EventTap, run_id: str) -> Any:
    accepts = tap.accepts(run_id)
    assert accepts, f"no worker accepted {run_id}"
    worker_id = accepts[-1].worker_id
    (proc,) = [w for w in stack.workers if w.worker_id == worker_id]
    return proc


@pytest.mark.slow
def test_sigstop_past_lease_ttl_is_fenced(upstream: FaultyOpenAI, tmp_path: Path) -> None:
    """A worker frozen (SIGSTOP) past its lease TTL loses the session: its client
    gets a clean error, another worker serves the session's next turn, and when the
    frozen worker thaws (SIGCONT) it stops the run and emits nothing more: its fenced
    lease refresh fails, or the cancel its gateway sent on giving up is read first
    (whichever the thawed process gets to first; both must leave nothing behind)."""
    key = f"stop:{tag()}"
    first, second = f"{tag()} first", f"{tag()} second"
    upstream.token_delay = 0.15
    words = " ".join(f"w{i}" for i in range(40))
    config = base_config(upstream, queueTimeoutSeconds=10, **FAST_BUS)
    # A's upstream goes silent after 3 tokens; its 3 s read timeout is overdue when the
    # worker thaws and fires at once, racing the lease refresh: that failure must
    # not be sent either.
    config["models"]["providers"]["fake"]["timeoutSeconds"] = 3
    stack = Stack.start(tmp_path, upstream, config, workers=2)
    headers = {"x-openclaw-session-key": key}

    async def scenario() -> dict[str, Any]:
        tap = await EventTap().start(stack.nats.url)
        nc = await nats.connect(stack.nats.url)
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                upstream.stall_after = 3
                a = SseRun(http, stack.url, f"{first} {words}", headers)
                await a.open()
                await a.read_until_text()
                upstream.stall_after = None  # (read when A's request began)
                frozen = _worker_of(stack, tap, a.result.run_id or "")
                frozen.signal(signal.SIGSTOP)
                t_stop = time.monotonic()
                result_a = await a.finish()  # the gateway gives up on the silent worker
                # Past the lease TTL (and the ack wait): the session is free again.
                await asyncio.sleep(max(0.0, t_stop + 4.0 - time.monotonic()))
                b = SseRun(http, stack.url, f"{second} {words}", headers)
                await b.open()
                await b.read_until_text()
                owner = await lease_owner(nc, key)
                t_cont = time.monotonic()
                frozen.signal(signal.SIGCONT)
                result_b = await b.finish()
                await asyncio.sleep(1.5)  # time for the thawed worker to misbehave
            return {"a": result_a, "b": result_b, "frozen": frozen, "owner": owner,
                    "t_stop": t_stop, "t_cont": t_cont, "events": tap.snapshot()}
        finally:
            await nc.close()
            await tap.close()

    try:
        out = asyncio.run(scenario())
        frozen = out["frozen"]
        frozen.wait_line(re.compile("lost its session lease|cancelled by its client"),
                         timeout=10)
        turns = asyncio.run(session_turns(stack.nats.url, key))
    finally:
        stack.stop()
    a, b = out["a"], out["b"]
    assert a.clean_error and a.error["code"] == "worker_lost", a.frames
    assert b.complete and b.text == expected_reply(b.content)
    # Served = accepted. (The thawed worker may still hold a stale delivery of B's
    # run, buffered while it was frozen, and say so with a `queued` notice until it
    # finds the run served: a sign of life the gateway ignores, not serving.)
    serving = [e.worker_id for e in out["events"]
               if e.run_id == b.run_id and e.worker_id and e.type == "accepted"]
    assert serving and frozen.worker_id not in serving
    assert out["owner"] == serving[-1]
    # After SIGCONT the frozen worker sent nothing for its run (it was fenced).
    late = [e for e in out["events"] if e.run_id == a.run_id and e.t > out["t_cont"]]
    assert late == [], late
    # Its provider call was stopped, the run never re-executed, and only B is stored.
    recs_a = [r for r in upstream.requests if first in body_text(r)]
    assert len(recs_a) == 1 and recs_a[0].disconnected and not recs_a[0].completed
    assert [t.run_id for t in turns] == [b.run_id]
    print(f"\nSIGSTOP: client error after {a.ended - out['t_stop']:.2f} s; next turn served by "
          f"another worker; 0 events from the thawed worker")


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_drains_in_flight_runs_and_takes_no_new_ones(upstream: FaultyOpenAI,
                                                             tmp_path: Path) -> None:
    upstream.token_delay = 0.1
    words = " ".join(f"w{i}" for i in range(15))
    stack = Stack.start(tmp_path, upstream, base_config(upstream, queueTimeoutSeconds=20,
                                                        **FAST_BUS), workers=1)
    prefix = tag()

    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=60) as http:
            inflight = [SseRun(http, stack.url, f"{prefix} inflight{i} {words}")
                        for i in range(3)]
            for run in inflight:
                await run.open()
            for run in inflight:
                await run.read_until_text()
            t_term = time.monotonic()
            stack.workers[0].signal(signal.SIGTERM)
            late = SseRun(http, stack.url, f"{prefix} late {words}")
            await late.open()  # queued while the only worker drains
            results = [await run.finish() for run in inflight]
            code = await asyncio.to_thread(stack.workers[0].popen.wait, 20)
            t_exit = time.monotonic()
            early = [r for r in upstream.requests if f"{prefix} late" in body_text(r)]
            await asyncio.to_thread(stack.add_worker)
            late_result = await late.finish()
        return {"results": results, "code": code, "t_term": t_term, "t_exit": t_exit,
                "early": early, "late": late_result}

    try:
        out = asyncio.run(scenario())
        drain_log = stack.workers[0].wait_line(re.compile(r"draining (\d+) run"), timeout=5)
    finally:
        stack.stop()
    assert out["code"] == 0
    assert drain_log.group(1) == "3"
    for r in out["results"]:
        assert r.complete and r.text == expected_reply(r.content), r.frames
    for rec in upstream.requests:
        if "inflight" in body_text(rec):
            assert rec.completed
    assert out["early"] == [], "the draining worker took a new run"
    late = out["late"]
    assert late.complete and late.text == expected_reply(late.content)
    (rec,) = [r for r in upstream.requests if f"{prefix} late" in body_text(r)]
    assert rec.started > out["t_exit"]
    print(f"\nSIGTERM: 3 in-flight runs completed, drained and exited 0 in "
          f"{out['t_exit'] - out['t_term']:.2f} s; the queued run waited for the next worker")


@pytest.mark.slow
def test_sigterm_idle_workers_exit_promptly(upstream: FaultyOpenAI, tmp_path: Path) -> None:
    """Regression: SIGTERM arriving while the worker's registry heartbeat was awaiting
    its reply had its cancel swallowed (Python 3.11's asyncio.wait_for), and the
    worker never exited. The heartbeat period equals the fetch timeout here (1 s), as
    in the default test config, which made the race likely: 3 of 3 runs hung."""
    stack = Stack.start(tmp_path, upstream, base_config(upstream, heartbeatSeconds=1),
                        workers=0)
    try:
        for _ in range(4):
            stack.add_worker()
        time.sleep(1.0)
        for worker in stack.workers:
            worker.signal(signal.SIGTERM)
        codes = [w.popen.wait(timeout=10) for w in stack.workers]
    finally:
        stack.stop()
    assert codes == [0, 0, 0, 0]


@pytest.mark.slow
def test_sigterm_grace_expiry_fails_streamed_and_requeues_unstarted(
        upstream: FaultyOpenAI, tmp_path: Path) -> None:
    """Runs still going when the grace period ends: one that streamed text ends
    with a clean ``interrupted`` error; one that streamed nothing is handed back
    to the queue and finished by another worker, transparently."""
    upstream.token_delay = 0.1
    prefix = tag()
    slow_heads: dict[str, int] = {}

    def head_delay(body: dict[str, Any]) -> float:
        text = orjson.dumps(body).decode()
        if "unstarted" not in text:
            return 0.0
        slow_heads["n"] = slow_heads.get("n", 0) + 1
        return 6.0 if slow_heads["n"] == 1 else 0.0

    upstream.head_delay = head_delay
    config = base_config(upstream, queueTimeoutSeconds=20, **FAST_BUS)
    stack = Stack.start(tmp_path, upstream, config, workers=0)
    stack.add_worker(grace=1.0)
    words = " ".join(f"w{i}" for i in range(60))

    async def scenario() -> tuple[StreamResult, StreamResult, int]:
        async with httpx.AsyncClient(timeout=60) as http:
            streamed = SseRun(http, stack.url, f"{prefix} streamed {words}")
            unstarted = SseRun(http, stack.url, f"{prefix} unstarted a b c")
            await streamed.open()
            await unstarted.open()
            await streamed.read_until_text()
            await asyncio.to_thread(upstream.wait_for, lambda recs: any(
                "unstarted" in body_text(r) for r in recs), 10)
            stack.workers[0].signal(signal.SIGTERM)
            await asyncio.to_thread(stack.add_worker)
            code = await asyncio.to_thread(stack.workers[0].popen.wait, 20)
            return await streamed.finish(), await unstarted.finish(), code

    try:
        streamed, unstarted, code = asyncio.run(scenario())
    finally:
        stack.stop()
    assert code == 0
    assert streamed.clean_error and streamed.error is not None
    assert streamed.error["message"] == "agent run interrupted: the worker shut down"
    assert expected_reply(streamed.content).startswith(streamed.text)
    assert unstarted.complete and unstarted.text == expected_reply(unstarted.content)
    assert slow_heads["n"] == 2  # cut on the first worker, redone on the second


# --------------------------------------------------------------------------- gateway killed


@pytest.mark.slow
def test_gateway_killed_mid_stream(upstream: FaultyOpenAI, tmp_path: Path) -> None:
    """SIGKILL the gateway a client streams through: the worker notices (its
    liveness probe finds no responder), stops the provider call, stores no half
    turn and frees the session at once; another gateway serves the next turn."""
    key = f"gwkill:{tag()}"
    first, second = f"{tag()} first", f"{tag()} second"
    upstream.token_delay = 0.1
    words = " ".join(f"w{i}" for i in range(300))  # 30 s of reply, if nothing stopped it
    stack = Stack.start(tmp_path, upstream, base_config(upstream, **FAST_BUS),
                        gateways=2, workers=1)
    headers = {"x-openclaw-session-key": key}

    async def scenario() -> tuple[float, float, StreamResult]:
        async with httpx.AsyncClient(timeout=30) as http:
            run = SseRun(http, stack.gateways[0].url, f"{first} {words}", headers)
            await run.open()
            await run.read_until_text()
            t_kill = time.monotonic()
            await asyncio.to_thread(stack.gateways[0].kill)
            await run.finish()  # the connection just drops
            rec = await asyncio.to_thread(upstream.wait_for, lambda recs: next(
                (r for r in recs if first in body_text(r) and r.ended), None), 15)
            assert rec is not None and rec.ended is not None
            stopped = rec.ended - t_kill
            nxt = await stream_once(http, stack.gateways[1].url, second, headers)
            return stopped, nxt.ended - t_kill, nxt

    try:
        stopped, next_turn, nxt = asyncio.run(scenario())
        turns = asyncio.run(session_turns(stack.nats.url, key))
    finally:
        stack.stop()
    (rec_a,) = [r for r in upstream.requests if first in body_text(r)]
    assert rec_a.disconnected and not rec_a.completed
    # A behaviour check, not a speed check: the worker's liveness probe (every
    # heartbeat, 0.5 s here) finds the gateway gone; unnoticed, the call would run
    # on for the rest of its 30 s reply.
    assert stopped < 10.0, f"provider call ran on for {stopped:.1f} s after the gateway died"
    assert nxt.complete and nxt.text == expected_reply(second)
    (rec_b,) = [r for r in upstream.requests if second in body_text(r)]
    assert first not in body_text(rec_b)  # no half turn in the history
    assert [t.user for t in turns] == [second]
    print(f"\ngateway SIGKILL: provider call stopped {stopped:.2f} s after the kill; next turn "
          f"done via the other gateway {next_turn:.2f} s after the kill")


# --------------------------------------------------------------------------- no worker


@pytest.mark.slow
def test_no_worker_503_within_queue_timeout_and_never_runs_later(
        upstream: FaultyOpenAI, tmp_path: Path) -> None:
    queue_timeout = 2.0
    stack = Stack.start(tmp_path, upstream,
                        base_config(upstream, queueTimeoutSeconds=queue_timeout, **FAST_BUS),
                        workers=0)
    marks = [tag(), tag()]
    try:
        with httpx.Client(timeout=30) as http:
            t0 = time.monotonic()
            resp = http.post(f"{stack.url}{URL}", headers=AUTH, json={
                "model": "openclaw", "messages": [{"role": "user", "content": marks[0]}]})
            took = time.monotonic() - t0
            streamed = http.post(f"{stack.url}{URL}", headers=AUTH, json={
                "model": "openclaw", "stream": True, "user": "alice",
                "messages": [{"role": "user", "content": marks[1]}]})
            stack.add_worker()
            # The worker is up and serving; the refused runs never reach the upstream.
            ok = http.post(f"{stack.url}{URL}", headers=AUTH, json={
                "model": "openclaw", "user": "alice",
                "messages": [{"role": "user", "content": "after"}]})
            time.sleep(3.0 + 1.0)  # past the ack wait: any redelivery would have happened
    finally:
        stack.stop()
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["message"] == "No agent worker available."
    # A behaviour check, not a speed check: refused at the queue timeout, not before
    # it, and not left waiting for the 30 s run timeout.
    assert queue_timeout <= took < queue_timeout + 10.0
    frames = [ln[6:] for ln in streamed.text.splitlines() if ln.startswith("data: ")]
    assert orjson.loads(frames[-2])["error"]["message"] == "No agent worker available."
    assert ok.status_code == 200, ok.text
    assert not [r for r in upstream.requests if any(m in body_text(r) for m in marks)]
    (rec,) = [r for r in upstream.requests if "after" in body_text(r)]
    assert marks[1] not in body_text(rec)  # the refused turn is not in alice's session
    print(f"\nno worker: 503 after {took:.2f} s (queue timeout {queue_timeout} s); "
          f"0 refused runs executed later")
