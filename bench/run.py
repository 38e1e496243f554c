"""One command for the benchmark (docs/BENCHMARKS.md)::

    python -m bench.run [--quick] [--peer litellm] [--repeat N] [--scaling 1x1,2x2]
                        [--only rounds|scaling] [--out docs/BENCHMARKS.md]

It starts the fake upstream (:mod:`bench.upstream`) on the harness CPU (1), then
for ``--repeat`` rounds starts every system — the upstream alone (baseline),
``clawbus up`` with one worker on CPU 0 and, with ``--peer litellm``, LiteLLM's
proxy on CPU 0 — and runs each scenario against each system in turn (A, B, C, A,
B, C, …), so slow drifts of a shared machine hit every system alike. Load
generators (``wrk``, :mod:`bench.streamclient`) run on the harness CPU. Then a
scaling run: ``clawbus up --gateways G --workers N`` on both CPUs for each
(G, N) of the plan (default 1×1, 1×2, 1×4, 2×2, 2×4).

The report (Markdown: medians over rounds, added latency = system − upstream
alone, ratios, the issue's targets) is printed, written with the raw results to
``bench/results/`` and, with ``--out FILE``, put between the markers
``<!-- bench:begin -->`` / ``<!-- bench:end -->`` of FILE. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from . import report
from . import sessions as sessions_
from .procs import CLK_TCK, cpu_by_role, cpu_seconds, pss_bytes, rss_bytes, settle
from .streamclient import DEFAULT_SLACK_MS, raise_nofile_limit
from .systems import (
    ROOT,
    Clawbus,
    LiteLLM,
    System,
    UpstreamAlone,
    UpstreamProcess,
    ensure_litellm,
    litellm_version,
)
from .wrk import ensure_wrk, run_wrk, wrk_version

RESULTS = ROOT / "bench" / "results"
NONSTREAM = (32, 0.0)  # tokens, delay ms
TTFT_SHAPE = (32, 20.0)
HELD_SHAPE = (20, 500.0)


@dataclass
class Plan:
    mode: str
    repeat: int
    duration: float  # seconds of each throughput / TTFT run
    concurrency: list[int]
    ttft_concurrency: list[int]
    held: list[int]
    held_rate: float
    cpu_requests: int
    scaling: list[tuple[int, int]]  # (gateways, workers) of each scaling run
    slack_ms: float = DEFAULT_SLACK_MS
    peer: str | None = None
    warmup: float = 1.0
    # Closed-loop TTFT runs: seconds of streams before the measured ones (see
    # bench/streamclient.py: the lanes start as a herd; its first wave is reported
    # on its own).
    ttft_warmup: float = 5.0
    # Stateful load (clawbus only): non-streaming c=16 over this many session keys
    # (0: skip). Each run takes its session's lease, reads its history window
    # and stores its turn.
    sessions: int = 64
    only: str | None = None  # "rounds" or "scaling": the other part is skipped
    # Issue 20's session scenarios (clawbus only; 0 skips each):
    # TTFT at c=1 of streamed turns going round robin over `history_sessions`
    # sessions, each filled with `session_turns` turns first;
    session_turns: int = 20
    history_sessions: int = 16
    # one hot session: this many clients sending turns to one session key;
    hot_clients: int = 8
    # an agent's tool loop: latency at c=1 with this many tool rounds vs none.
    tool_rounds: int = 4


DEFAULT_SCALING: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 4), (2, 2), (2, 4))


def parse_scaling(text: str) -> list[tuple[int, int]]:
    """``--scaling``: comma-separated ``GxN`` (gateways x workers) or plain ``N``
    (1 gateway); ``''`` is no scaling run."""
    out: list[tuple[int, int]] = []
    for raw in text.split(","):
        item = raw.strip().lower().replace("×", "x")
        if not item:
            continue
        gateways, _, workers = item.rpartition("x")
        try:
            pair = (int(gateways) if gateways else 1, int(workers))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is neither GxN (gateways x workers) nor N (workers)") from None
        if min(pair) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: counts must be at least 1")
        out.append(pair)
    return out


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    plan = Plan(
        mode="quick" if quick else "full",
        repeat=1 if quick else 3,
        duration=3.0 if quick else 10.0,
        concurrency=[1, 16, 64],
        ttft_concurrency=[1, 64],
        held=[50, 250] if quick else [50, 250, 2000],
        held_rate=250.0,
        cpu_requests=1000 if quick else 3000,
        scaling=list(DEFAULT_SCALING),
        peer=args.peer,
    )
    if args.repeat is not None:
        plan.repeat = args.repeat
    if args.duration is not None:
        plan.duration = args.duration
    if args.held is not None:
        plan.held = [int(n) for n in args.held.split(",") if n.strip()]
    if args.scaling is not None:
        plan.scaling = args.scaling
    if args.only == "rounds":
        plan.scaling = []
    plan.only = args.only
    if args.slack_ms is not None:
        plan.slack_ms = args.slack_ms
    if args.sessions is not None:
        plan.sessions = args.sessions
    for name in ("session_turns", "history_sessions", "hot_clients", "tool_rounds"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    plan.ttft_warmup = (args.ttft_warmup if args.ttft_warmup is not None
                        else 2.0 if quick else plan.ttft_warmup)
    return plan


@dataclass
class Cpus:
    system: str | None  # the system under test
    harness: str | None  # upstream + load generators (+ this process)
    both: str | None
    note: str = ""


def choose_cpus() -> Cpus:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return Cpus(None, None, None, f"only {len(available)} CPU available: nothing pinned")
    first, second = available[0], available[1]
    return Cpus(str(first), str(second), f"{first},{second}")


@dataclass
class Results:
    plan: Plan
    cpus: Cpus
    machine: dict[str, Any]
    started: str
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, round_: int, system: str, scenario: str, **values: Any) -> None:
        self.records.append({"round": round_, "system": system, "scenario": scenario, **values})


# -- machine -----------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    info["loadavg_start"] = os.getloadavg()[0]
    info["commit"] = _git("rev-parse", "--short", "HEAD")
    info["dirty"] = bool(_git("status", "--porcelain"))
    try:
        from clawbus.natsserver import find_nats_server

        out = subprocess.run([str(find_nats_server()), "--version"], capture_output=True,
                             text=True, check=False)
        info["nats_server"] = out.stdout.strip()
    except Exception as exc:
        info["nats_server"] = f"unknown ({exc})"
    return info


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def cpu_busy() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            numbers = [int(v) for v in values]
            idle = numbers[3] + numbers[4]
            out[name[3:]] = (sum(numbers[:8]) - idle, sum(numbers[:8]))
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _no_pids() -> list[int]:
    return []


class Meter:
    """CPU accounting of one run: the system, the harness (load generator + upstream),
    and everything else on the machine (other users' load, which makes results noisy)."""

    def __init__(self, system: System, upstream_pids: Callable[[], list[int]],
                 cpus: Cpus) -> None:
        self.system = system
        # Against the upstream alone, the upstream is the system, not harness.
        self.upstream_pids = upstream_pids if system.key != "upstream" else _no_pids
        self.cpus = cpus
        self.t0 = time.monotonic()
        self.sys0 = cpu_seconds(system.pids())
        self.roles0 = cpu_by_role(system.pids())
        self.up0 = cpu_seconds(self.upstream_pids())
        self.kids0 = _children_cpu()  # finished load generators (wrk, streamclient)
        self.busy0 = cpu_busy()

    def done(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self.t0)
        system = cpu_seconds(self.system.pids()) - self.sys0
        roles = {role: seconds - self.roles0.get(role, 0.0)
                 for role, seconds in cpu_by_role(self.system.pids()).items()}
        harness = (cpu_seconds(self.upstream_pids()) - self.up0
                   + _children_cpu() - self.kids0)
        busy1 = cpu_busy()
        total_busy = sum(busy1[c][0] - self.busy0[c][0] for c in busy1 if c in self.busy0)
        machine = total_busy / CLK_TCK
        return {
            "elapsed_s": elapsed,
            "system_cpu_s": system,
            "system_cpu_share": system / elapsed,
            "system_cpu_s_by_role": roles,
            "harness_cpu_share": harness / elapsed,
            "other_cpu_share": max(0.0, machine - system - harness) / elapsed,
            "cpu_busy": {c: (busy1[c][0] - self.busy0[c][0])
                         / max(1, busy1[c][1] - self.busy0[c][1])
                         for c in busy1 if c in self.busy0},
        }


# -- the scenarios -----------------------------------------------------------

class Runner:
    def __init__(self, plan: Plan, cpus: Cpus, results: Results, wrk: str,
                 upstream: UpstreamProcess) -> None:
        self.plan = plan
        self.cpus = cpus
        self.results = results
        self.wrk = wrk
        self.upstream = upstream
        self.upstream_pids = upstream.pids

    def body(self, system: System, shape: tuple[int, float], *, stream: bool) -> bytes:
        return orjson.dumps({"model": system.model(*shape), "stream": stream,
                             "messages": [{"role": "user", "content": "hi"}]})

    def quiet(self, system: System, neighbours: Sequence[System] = ()) -> None:
        """Wait for the system, and the others sharing its core, to go idle after the
        previous run (a peer still draining a load it could not keep up with would
        otherwise take CPU from the next measurement); check the upstream."""
        sharing = [system, *(s for s in neighbours if s is not system)]

        def pids() -> list[int]:
            return [pid for s in sharing for pid in s.pids()]
        share = settle(pids, below=0.05, timeout=15.0)
        if share >= 0.05:
            log(f"WARNING the system core was still {share:.0%} busy before "
                f"measuring {system.label}")
        restarted = self.upstream.ensure_alive()
        if restarted:
            log(f"WARNING {restarted}")
            self.results.failures.append(restarted)

    def wrk_run(self, system: System, *, connections: int, duration: float,
                stream: bool = False, max_requests: int | None = None,
                sessions: int | None = None, body: bytes | None = None) -> dict[str, Any]:
        meter = Meter(system, self.upstream_pids, self.cpus)
        if body is None:
            body = self.body(system, NONSTREAM, stream=stream)
        result = run_wrk(self.wrk, system.chat_url, body,
                         auth=system.auth, connections=connections, duration=duration,
                         cpus=self.cpus.harness, max_requests=max_requests, sessions=sessions)
        return {**result, **meter.done()}

    def stateful(self, round_: int, system: System) -> None:
        """Non-streaming c=16 over ``plan.sessions`` session keys (clawbus only: the
        others have no sessions, the header means nothing to them)."""
        if system.key != "clawbus":
            return
        result = self.wrk_run(system, connections=16, duration=self.plan.duration,
                              sessions=self.plan.sessions)
        done = max(1, int(result["requests"]))
        result["cpu_ms_per_request"] = result["system_cpu_s"] * 1000.0 / done
        self.results.add(round_, system.key, "sessions_c16", **result)

    def ttft_history(self, round_: int, system: System) -> None:
        """TTFT at c=1 of turns in sessions that already hold ``plan.session_turns``
        turns: fill ``plan.history_sessions`` sessions (non-streaming), then stream
        turns round robin over them. Against the upstream alone (the baseline of
        the added figure) the same streams, with no filling (it has no sessions)."""
        if system.key not in ("clawbus", "upstream"):
            return
        n = self.plan.history_sessions
        prefix = f"hist-r{round_}-"
        filled = 0.0
        if system.key == "clawbus":
            filled = sessions_.prefill(system.chat_url, system.auth, system.model(*NONSTREAM),
                                       sessions=n, turns=self.plan.session_turns,
                                       prefix=prefix)
            self.quiet(system)
        result = self.streamclient(system, TTFT_SHAPE, "--concurrency", "1",
                                   "--duration", f"{self.plan.duration:g}",
                                   "--warmup", f"{self.plan.ttft_warmup:g}",
                                   "--sessions", str(n), "--session-prefix", prefix)
        self.results.add(round_, system.key, "ttft_history_c1", prefill_s=filled,
                         sessions=n, session_turns=self.plan.session_turns, **result)

    def hot_session(self, round_: int, system: System) -> None:
        """``plan.hot_clients`` connections sending non-streaming turns to one session
        key; the upstream's log says whether the turns were served one at a time, in
        order, each with every earlier turn, and how long the session idled between
        one turn's upstream response and the next turn's upstream request."""
        if system.key != "clawbus":
            return
        sessions_.upstream_log(self.upstream.url)  # empty it
        meter = Meter(system, self.upstream_pids, self.cpus)
        result = run_wrk(self.wrk, system.chat_url, sessions_.HOT_BODY, auth=system.auth,
                         connections=self.plan.hot_clients, duration=self.plan.duration,
                         cpus=self.cpus.harness, sessions=1,
                         session_prefix=f"hot-r{round_}-", timeout_s=30.0)
        until = time.monotonic()
        result.update(meter.done())
        self.quiet(system)  # turns queued when the clients stopped drain first
        order = sessions_.session_order(sessions_.upstream_log(self.upstream.url), until)
        done = max(1, int(result["requests"]))
        result["cpu_ms_per_request"] = result["system_cpu_s"] * 1000.0 / done
        self.results.add(round_, system.key, "hot_session", clients=self.plan.hot_clients,
                         order=order, **result)

    def tool_round(self, round_: int, system: Clawbus) -> None:
        """Non-streaming c=1 with an agent whose model asks for ``plan.tool_rounds``
        rounds of one call of an MCP tool that answers at once, and with none;
        plus the tool alone (an MCP client's call round trip to the same server)."""
        k = self.plan.tool_rounds
        cmd = [sys.executable, "-m", "bench.mcp_tool", "--time", "300"]
        if self.cpus.system:
            cmd += ["--cpus", self.cpus.system]
        if self.cpus.harness:
            cmd = ["taskset", "-c", self.cpus.harness, *cmd]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                             timeout=120)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"bench.mcp_tool --time failed: {out.stderr[-2000:]}")
        alone: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
        runs: dict[str, Any] = {}
        for rounds in (0, k):
            self.quiet(system)
            sessions_.upstream_log(self.upstream.url)
            result = self.wrk_run(system, connections=1, duration=self.plan.duration,
                                  body=sessions_.tools_body(rounds))
            entries = sessions_.upstream_log(self.upstream.url)
            done = max(1, int(result["requests"]))
            result["cpu_ms_per_request"] = result["system_cpu_s"] * 1000.0 / done
            result["upstream_calls_per_request"] = len(entries) / done
            result.update(sessions_.tool_round_gaps(entries))
            runs[str(rounds)] = result
        self.results.add(round_, system.key, "tool_rounds_c1", rounds=k, tool_alone=alone,
                         runs=runs)

    def throughput(self, round_: int, system: System, connections: int) -> None:
        result = self.wrk_run(system, connections=connections, duration=self.plan.duration)
        self.results.add(round_, system.key, f"rps_c{connections}", **result)

    def stream_ceiling(self, round_: int, system: System) -> None:
        result = self.wrk_run(system, connections=64, duration=self.plan.duration, stream=True)
        self.results.add(round_, system.key, "stream_rps_c64", **result)

    def cpu_per_request(self, round_: int, system: System) -> None:
        # The upstream alone needs ~0.01 ms a request: more requests, so that the
        # 10 ms clock ticks of /proc/<pid>/stat still resolve it.
        n = self.plan.cpu_requests * (20 if system.key == "upstream" else 1)
        result = self.wrk_run(system, connections=16, duration=max(60.0, n / 20.0),
                              max_requests=n)
        done = max(1, int(result["requests"]))
        result["cpu_ms_per_request"] = result["system_cpu_s"] * 1000.0 / done
        by_role: dict[str, float] = result["system_cpu_s_by_role"]
        result["cpu_ms_per_request_by_role"] = {
            role: seconds * 1000.0 / done for role, seconds in by_role.items()}
        self.results.add(round_, system.key, "cpu_per_request", **result)

    def streamclient(self, system: System, shape: tuple[int, float],
                     *extra: str) -> dict[str, Any]:
        tokens, delay = shape
        cmd = [sys.executable, "-m", "bench.streamclient", "--url", system.chat_url,
               "--model", system.model(*shape), "--tokens", str(tokens),
               "--delay-ms", f"{delay:g}", "--slack-ms", f"{self.plan.slack_ms:g}", *extra]
        if system.auth:
            cmd += ["--auth", system.auth]
        if self.cpus.harness:
            cmd = ["taskset", "-c", self.cpus.harness, *cmd]
        meter = Meter(system, self.upstream_pids, self.cpus)
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                             timeout=600)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"streamclient failed ({out.returncode}): {out.stderr[-2000:]}")
        result: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
        return {**result, **meter.done()}

    def ttft(self, round_: int, system: System, concurrency: int) -> None:
        result = self.streamclient(system, TTFT_SHAPE, "--concurrency", str(concurrency),
                                   "--duration", f"{self.plan.duration:g}",
                                   "--warmup", f"{self.plan.ttft_warmup:g}")
        self.results.add(round_, system.key, f"ttft_c{concurrency}", **result)

    def held(self, round_: int, system: System, streams: int) -> None:
        tokens, delay = HELD_SHAPE
        timeout = tokens * delay / 1000.0 + 30.0
        result = self.streamclient(system, HELD_SHAPE, "--streams", str(streams),
                                   "--rate", f"{self.plan.held_rate:g}",
                                   "--timeout", f"{timeout:g}")
        self.results.add(round_, system.key, f"held_{streams}", **result)

    def memory(self, round_: int, system: System, scenario: str) -> None:
        pids = system.pids()
        self.results.add(round_, system.key, scenario, rss_bytes=rss_bytes(pids),
                         pss_bytes=pss_bytes(pids), processes=len(pids))


def scenarios(plan: Plan, runner: Runner) -> list[tuple[str, Callable[[int, System], None]]]:
    """(name, run) in the order every round runs them."""
    out: list[tuple[str, Callable[[int, System], None]]] = []
    for c in plan.concurrency:
        out.append((f"rps_c{c}", functools.partial(_call, runner.throughput, c)))
    for c in plan.ttft_concurrency:
        out.append((f"ttft_c{c}", functools.partial(_call, runner.ttft, c)))
    for n in plan.held:
        out.append((f"held_{n}", functools.partial(_call, runner.held, n)))
    if plan.sessions:
        out.append(("sessions_c16", runner.stateful))
    out.append(("cpu_per_request", runner.cpu_per_request))
    # Issue 20's session scenarios last: they leave sessions with history behind.
    if plan.session_turns and plan.history_sessions:
        out.append(("ttft_history_c1", runner.ttft_history))
    if plan.hot_clients:
        out.append(("hot_session", runner.hot_session))
    return out


def _call(method: Callable[[int, System, int], None], arg: int, round_: int,
          system: System) -> None:
    method(round_, system, arg)


# -- the run -----------------------------------------------------------------

@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: every started process is still stopped."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def log(message: str) -> None:
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def attempt(results: Results, what: str, fn: Callable[..., None], *args: Any) -> bool:
    """Run ``fn(*args)``; a failure is logged and recorded, and the run goes on."""
    try:
        fn(*args)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        message = f"{what}: {type(exc).__name__}: {exc}"
        log(f"FAILED {message[:2000]}")
        results.failures.append(message[:4000])
        return False
    return True


def start_system(runner: Runner, round_: int, system: System) -> None:
    """Start, record start-up time and idle memory, warm up."""
    t0 = time.monotonic()
    system.start()
    runner.results.add(round_, system.key, "startup_s", seconds=time.monotonic() - t0)
    settle(system.pids, below=0.02, timeout=10.0)
    time.sleep(0.5)
    runner.memory(round_, system, "idle_rss")
    system.warm()
    run_wrk(runner.wrk, system.chat_url, runner.body(system, NONSTREAM, stream=False),
            auth=system.auth, connections=16, duration=runner.plan.warmup,
            cpus=runner.cpus.harness)


def run_rounds(plan: Plan, runner: Runner, upstream: UpstreamProcess, work: Path,
               logs: Path) -> None:
    results = runner.results
    cpus = runner.cpus
    for round_ in range(1, plan.repeat + 1):
        log(f"round {round_}/{plan.repeat}")
        systems: list[System] = [UpstreamAlone(upstream),
                                 Clawbus(upstream.url, work, logs, workers=1, cpus=cpus.system)]
        if plan.peer == "litellm":
            systems.append(LiteLLM(upstream.url, work, logs, cpus=cpus.system))
        live: list[System] = []
        try:
            for system in systems:
                live.append(system)  # stopped in `finally` even if it failed to start
                if attempt(results, f"round {round_}: start {system.label}", start_system,
                           runner, round_, system):
                    log(f"  {system.label} ready at {system.base_url}")
                else:
                    system.stop()
                    live.remove(system)
            for name, run in scenarios(plan, runner):
                for system in live:
                    runner.quiet(system, live)
                    log(f"  {name} · {system.label}")
                    attempt(results, f"round {round_}: {name} on {system.label}", run,
                            round_, system)
            if plan.tool_rounds:
                run_tool_rounds(runner, round_, work, logs, live)
            baseline = next((s for s in live if s.key == "upstream"), None)
            if baseline is not None:
                runner.quiet(baseline)
                log("  stream_rps_c64 · upstream alone (its streaming ceiling)")
                attempt(results, f"round {round_}: stream ceiling", runner.stream_ceiling,
                        round_, baseline)
            for system in live:
                runner.memory(round_, system, "rss_after")
        finally:
            for system in reversed(live):
                problems = system.log_problems()
                if problems:
                    results.problems.setdefault(system.label, []).extend(problems[:50])
                system.stop()


def run_tool_rounds(runner: Runner, round_: int, work: Path, logs: Path,
                    live: Sequence[System]) -> None:
    """The tool-round scenario on a clawbus of its own (its agents have an MCP tool,
    whose server every worker runs: the main clawbus stays without one)."""
    system = Clawbus(runner.upstream.url, work, logs, workers=1, cpus=runner.cpus.system,
                     tool_rounds=(0, runner.plan.tool_rounds), label="clawbus+tools")
    try:
        if not attempt(runner.results, f"round {round_}: start {system.label}", system.start):
            return
        system.warm()
        runner.quiet(system, live)
        log(f"  tool_rounds_c1 · {system.label} ({runner.plan.tool_rounds} rounds vs 0)")
        attempt(runner.results, f"round {round_}: tool rounds on {system.label}",
                runner.tool_round, round_, system)
    finally:
        problems = system.log_problems()
        if problems:
            runner.results.problems.setdefault(system.label, []).extend(problems[:20])
        system.stop()


def scaling_scenario(gateways: int, workers: int) -> str:
    return f"scaling_g{gateways}_w{workers}"


def measure_scaling(runner: Runner, round_: int, system: Clawbus) -> None:
    try:
        system.start()
        system.warm()
        run_wrk(runner.wrk, system.chat_url, runner.body(system, NONSTREAM, stream=False),
                auth=system.auth, connections=64, duration=runner.plan.warmup,
                cpus=runner.cpus.harness)
        runner.quiet(system)
        result = runner.wrk_run(system, connections=64, duration=runner.plan.duration)
        runner.results.add(round_, "clawbus", scaling_scenario(system.gateways, system.workers),
                           gateways=system.gateways, workers=system.workers,
                           gateway_pids=sorted(system.gateway_pids), **result)
    finally:
        problems = system.log_problems()
        if problems:
            runner.results.problems.setdefault(system.label, []).extend(problems[:20])
        system.stop()


def run_scaling(plan: Plan, runner: Runner, upstream: UpstreamProcess, work: Path,
                logs: Path) -> None:
    for round_ in range(1, plan.repeat + 1):
        for gateways, workers in plan.scaling:
            system = Clawbus(upstream.url, work, logs, workers=workers, gateways=gateways,
                             cpus=runner.cpus.both, label=f"clawbus {gateways}g{workers}w")
            log(f"scaling round {round_}: clawbus with {gateways} gateway(s) and "
                f"{workers} worker(s), both CPUs")
            attempt(runner.results,
                    f"scaling round {round_}: {gateways} gateways, {workers} workers",
                    measure_scaling, runner, round_, system)


BEGIN_MARK = "<!-- bench:begin -->"
END_MARK = "<!-- bench:end -->"


def update_doc(path: Path, markdown: str) -> None:
    """Put ``markdown`` between the marker lines of ``path`` (each alone on its line),
    or append a "Latest results" section with the markers when there are none."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN_MARK}\n{markdown.rstrip()}\n{END_MARK}"
    pattern = re.compile(rf"^{re.escape(BEGIN_MARK)}[ \t]*$.*?^{re.escape(END_MARK)}[ \t]*$",
                         re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + "## Latest results\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run",
                                     description="clawbus benchmark")
    parser.add_argument("--quick", action="store_true",
                        help="short runs, 1 round, held streams 50 and 250 (a few minutes)")
    parser.add_argument("--peer", choices=["litellm"], default=None,
                        help="also run LiteLLM's proxy (installed into bench/.venvs/litellm)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per throughput/TTFT run (default 10; quick 3)")
    parser.add_argument("--held", default=None,
                        help="held-stream counts, comma-separated (default 50,250,2000)")
    parser.add_argument("--scaling", type=parse_scaling, default=None,
                        help="gateways x workers of the scaling runs, e.g. 1x1,1x2,2x2 "
                             "(a plain N means 1xN; default 1x1,1x2,1x4,2x2,2x4; '' to skip)")
    parser.add_argument("--only", choices=["rounds", "scaling"], default=None,
                        help="run only the rounds (systems side by side) or only the "
                             "scaling run")
    parser.add_argument("--sessions", type=int, default=None,
                        help="session keys of the stateful run, clawbus only (default 64; "
                             "0 to skip)")
    parser.add_argument("--session-turns", type=int, default=None,
                        help="turns each session holds before the TTFT-in-a-session run, "
                             "clawbus only (default 20; 0 to skip)")
    parser.add_argument("--history-sessions", type=int, default=None,
                        help="sessions of the TTFT-in-a-session run, streamed round robin "
                             "(default 16)")
    parser.add_argument("--hot-clients", type=int, default=None,
                        help="clients of the hot-session run, all on one session key, "
                             "clawbus only (default 8; 0 to skip)")
    parser.add_argument("--tool-rounds", type=int, default=None,
                        help="tool rounds of the tool-round run (vs 0), clawbus only "
                             "(default 4; 0 to skip)")
    parser.add_argument("--ttft-warmup", type=float, default=None,
                        help="seconds of closed-loop streams before the measured TTFT "
                             "streams (default 5; quick 2)")
    parser.add_argument("--slack-ms", type=float, default=None,
                        help=f"on-time slack per token (default {DEFAULT_SLACK_MS:g} ms)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file whose bench:begin/end section gets the report")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the systems' state directories (NATS data) after the run")
    args = parser.parse_args(argv)
    plan = make_plan(args)
    cpus = choose_cpus()
    if cpus.harness is not None:
        os.sched_setaffinity(0, {int(cpus.harness)})  # children inherit the harness CPU
    raise_nofile_limit()
    wrk = ensure_wrk()
    machine = machine_info()
    machine["wrk"] = wrk_version(wrk)
    if plan.peer == "litellm":
        ensure_litellm()
        machine["litellm"] = litellm_version()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = RESULTS / f"{stamp}-{plan.mode}"
    logs, work = run_dir / "logs", run_dir / "work"
    logs.mkdir(parents=True, exist_ok=True)
    results = Results(plan, cpus, machine, started=dt.datetime.now(dt.UTC).isoformat())
    log(f"bench {plan.mode}: {plan.repeat} round(s); system CPU {cpus.system}, "
        f"harness CPU {cpus.harness}; results in {run_dir}")
    t0 = time.monotonic()
    interrupted = False
    with terminate_as_interrupt():
        upstream = UpstreamProcess(logs, cpus.harness)
        runner = Runner(plan, cpus, results, wrk, upstream)
        try:
            log(f"fake upstream at {upstream.url}")
            if args.only != "scaling":
                run_rounds(plan, runner, upstream, work, logs)
            if plan.scaling:
                run_scaling(plan, runner, upstream, work, logs)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: stopping everything and reporting what was measured")
        finally:
            upstream.stop()
            if not args.keep_work:
                shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()[0]
    machine["elapsed_s"] = time.monotonic() - t0
    raw = {"plan": asdict(plan), "cpus": asdict(cpus), "machine": machine,
           "started": results.started, "records": results.records,
           "problems": results.problems, "failures": results.failures,
           "interrupted": interrupted}
    json_path = RESULTS / f"{stamp}-{plan.mode}.json"
    json_path.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    markdown = report.render(raw, json_path.relative_to(ROOT).as_posix(), argv_text(argv))
    (run_dir / "report.md").write_text(markdown)
    print(markdown, flush=True)
    if args.out is not None:
        update_doc(args.out, markdown)
        log(f"report written to {args.out}")
    log(f"raw results: {json_path}")
    return 130 if interrupted else 0


def argv_text(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", "bench.run", *words])


if __name__ == "__main__":
    sys.exit(main())
