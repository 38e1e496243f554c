"""Profile clawbus under one benchmark load, every Python process at once::

    python -m bench.profile nonstream [--concurrency 16] [--duration 6] [--sessions 64]
    python -m bench.profile ttft      [--concurrency 1]
    python -m bench.profile held      [--streams 2000]
    python -m bench.profile ttft      --session-turns 20 [--history-sessions 16]
    python -m bench.profile hot       [--concurrency 8] [--paced]  # one hot session
    python -m bench.profile tools     [--tool-rounds 4]      # an agent's tool rounds

Starts the fake upstream on the harness CPU and ``clawbus up`` (embedded
nats-server, one gateway, ``--workers`` workers) on the system CPU, exactly as
:mod:`bench.run` does, then runs the load while ``py-spy record`` samples each
gateway and worker process (``--nonblocking``: the processes are never paused).
Prints, per process, the functions holding the most samples (self and
inclusive), the load's own summary and the CPU each role used, and keeps the raw
collapsed stacks under ``bench/results/profile-<stamp>/`` (feed them to
``flamegraph.pl`` or speedscope). Needs ``py-spy`` (``pip install -e '.[bench]'``)
and ptrace rights over the system's processes (root, or
``kernel.yama.ptrace_scope=0``).

A/B mode judges a change against a baseline checkout in the same run, on the
same noisy machine: ``--ab ../baseline --rounds 5`` (make the baseline with
``git worktree add ../baseline <commit>``) alternates the two (A B, B A, …), each
a fresh system, no profiler, and prints each round and the medians: CPU per
request by process and the load's figures. ``--trace-b`` turns tracing on for
the current checkout (B) only, exporting to a local sink that drops the spans:
with ``--ab`` on a second worktree of the same commit, the cost of tracing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from . import sessions as sessions_
from .otlp_sink import OtlpSink
from .procs import process_role
from .run import HELD_SHAPE, NONSTREAM, TTFT_SHAPE, Meter, choose_cpus
from .systems import ROOT, Clawbus, UpstreamProcess
from .wrk import ensure_wrk, run_wrk

RESULTS = ROOT / "bench" / "results"


def top_frames(raw: str, n: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Total samples, and the ``n`` frames with the most self / inclusive samples,
    from py-spy's raw (collapsed) output: ``frame;frame;frame count`` per line."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, own.most_common(n), inclusive.most_common(n)


def _held_shape(args: argparse.Namespace) -> tuple[int, float]:
    return (args.tokens, args.delay_ms)


def _load_command(args: argparse.Namespace, system: Clawbus) -> list[str]:
    shape = TTFT_SHAPE if args.load == "ttft" else _held_shape(args)
    cmd = [sys.executable, "-m", "bench.streamclient", "--url", system.chat_url,
           "--model", system.model(*shape), "--tokens", str(shape[0]),
           "--delay-ms", f"{shape[1]:g}", "--auth", system.auth or ""]
    if args.load == "ttft":
        cmd += ["--concurrency", str(args.concurrency), "--duration", f"{args.duration:g}",
                "--warmup", f"{args.warmup:g}"]
        if args.session_turns:
            cmd += ["--sessions", str(args.history_sessions), "--session-prefix", "hist-"]
    else:
        cmd += ["--streams", str(args.streams), "--rate", f"{args.rate:g}"]
    return cmd


def _measure(args: argparse.Namespace, system: Clawbus, upstream: UpstreamProcess,
             cpus: Any, out_dir: Path, *, py_spy: str | None, tag: str = "") -> dict[str, Any]:
    """Start ``system``, run the load (profiling it when ``py_spy``), stop it; the
    figures, and each profiled process's raw-stack file."""
    try:
        system.start()
        system.warm()
        targets = {pid: process_role(pid) for pid in system.pids()} if py_spy else {}
        targets = {pid: role for pid, role in targets.items() if role in ("gateway", "worker")}
        if args.load == "ttft" and args.session_turns:
            sessions_.prefill(system.chat_url, system.auth, system.model(*NONSTREAM),
                              sessions=args.history_sessions, turns=args.session_turns,
                              prefix="hist-")
        # Held streams last tokens x delay after the last one opened.
        seconds = (args.duration + args.warmup if args.load == "ttft"
                   else args.streams / args.rate + args.tokens * args.delay_ms / 1000
                   if args.load == "held" else args.duration)
        spies = {pid: subprocess.Popen(
            [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
             "--rate", str(args.rate_hz), "--duration", str(max(1, round(seconds))),
             "--output", str(out_dir / f"{role}-{pid}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for pid, role in targets.items()}
        meter = Meter(system, upstream.pids, cpus)
        load: dict[str, Any]
        if args.load == "hot":
            sessions_.upstream_log(upstream.url)  # empty it
            body = sessions_.HOT_PACED_BODY if args.paced else sessions_.HOT_BODY
            load = run_wrk(ensure_wrk(), system.chat_url, body, auth=system.auth,
                           connections=args.concurrency, duration=args.duration,
                           cpus=cpus.harness, sessions=1, session_prefix="hot-",
                           timeout_s=30.0)
            load["order"] = sessions_.session_order(sessions_.upstream_log(upstream.url),
                                                    time.monotonic())
        elif args.load == "tools":
            sessions_.upstream_log(upstream.url)
            load = run_wrk(ensure_wrk(), system.chat_url, sessions_.tools_body(args.tool_rounds),
                           auth=system.auth, connections=args.concurrency,
                           duration=args.duration, cpus=cpus.harness)
            load.update(sessions_.tool_round_gaps(sessions_.upstream_log(upstream.url)))
        elif args.load == "nonstream":
            body = orjson.dumps({"model": system.model(*NONSTREAM), "stream": False,
                                 "messages": [{"role": "user", "content": "hi"}]})
            load = run_wrk(ensure_wrk(), system.chat_url, body, auth=system.auth,
                           connections=args.concurrency, duration=args.duration,
                           cpus=cpus.harness, sessions=args.sessions)
        else:
            cmd = _load_command(args, system)
            if cpus.harness:
                cmd = ["taskset", "-c", cpus.harness, *cmd]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            load = orjson.loads(done.stdout.strip().splitlines()[-1])
            raw = orjson.dumps(load, option=orjson.OPT_INDENT_2)
            (out_dir / f"load{tag}.json").write_bytes(raw)
        usage = meter.done()
        for pid, spy in spies.items():
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0:
                print(f"py-spy on {pid} failed: {err[-500:]}", file=sys.stderr)
    finally:
        system.stop()
    figures = _figures(args, load, usage)
    figures["stacks"] = {f"{role} (pid {pid})": out_dir / f"{role}-{pid}.txt"
                         for pid, role in targets.items()}
    return figures


def _figures(args: argparse.Namespace, load: dict[str, Any],
             usage: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth comparing: flat name → value."""
    out: dict[str, Any] = {"cpu_s": usage["system_cpu_s"]}
    roles: dict[str, float] = usage["system_cpu_s_by_role"]
    if args.load == "hot":
        order = load["order"]
        out["turns/s"] = load.get("rps")
        out["gap_p50_ms"] = order["gap_ms"]["p50"]
        out["gap_p99_ms"] = order["gap_ms"]["p99"]
        out["out_of_order"] = (order["overlaps"] + order["history_mismatches"]
                               + order["duplicates"])
    elif args.load == "tools":
        out["round_gap_p50_ms"] = load["round_gap_ms"]["p50"]
    if args.load in ("nonstream", "hot", "tools"):
        n = max(1, int(load.get("requests") or 0))
        out["rps"] = load.get("rps")
        out["p50_ms"] = (load.get("latency_us") or {}).get("p50", 0) / 1000
        out["errors"] = load.get("error_count")
        out["cpu_ms/req"] = 1000 * usage["system_cpu_s"] / n
        for role, seconds in roles.items():
            out[f"{role} ms/req"] = 1000 * seconds / n
    else:
        ttft = load.get("ttft_ms") or {}
        out["ttft_p50_ms"] = ttft.get("p50")
        out["ttft_p99_ms"] = ttft.get("p99")
        if args.load == "ttft":
            out["first_wave_ttft_p50_ms"] = (load.get("first_wave_ttft_ms") or {}).get("p50")
        out["gap_p99_ms"] = (load.get("gap_ms") or {}).get("p99")
        # The latest any stream fell behind its schedule: a stall shows here first.
        out["late_max_ms"] = (load.get("lateness_ms") or {}).get("max")
        out["on_time"] = load.get("on_time_fraction")
        out["errors"] = load.get("error_count")
        for role, seconds in roles.items():
            out[f"{role} cpu_s"] = seconds
    return out


def _print_stacks(stacks: dict[str, Path], top: int) -> None:
    for name, path in stacks.items():
        if not path.exists():
            continue
        total, own, inclusive = top_frames(path.read_text(), top)
        print(f"\n== {name}: {total} samples ==")
        print("-- self --")
        for frame, count in own:
            print(f"{100 * count / max(1, total):5.1f}%  {frame}")
        print("-- inclusive --")
        for frame, count in inclusive:
            print(f"{100 * count / max(1, total):5.1f}%  {frame}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=["nonstream", "ttft", "held", "hot", "tools"])
    parser.add_argument("--concurrency", type=int, default=None,
                        help="connections (nonstream: 16, ttft: 1, hot: 8, tools: 1)")
    parser.add_argument("--duration", type=float, default=6.0,
                        help="seconds of load (ttft: measured, after the warm-up)")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="ttft: seconds of streams before the measured ones")
    parser.add_argument("--streams", type=int, default=2000, help="held: streams")
    parser.add_argument("--rate", type=float, default=250.0, help="held: opened per second")
    parser.add_argument("--tokens", type=int, default=HELD_SHAPE[0],
                        help="held: tokens per stream (with --streams and --rate: what a "
                             "stream's open costs against what a token costs)")
    parser.add_argument("--delay-ms", type=float, default=HELD_SHAPE[1],
                        help="held: upstream delay between tokens")
    parser.add_argument("--sessions", type=int, default=None,
                        help="nonstream: spread requests round robin over N sessions "
                             "(stateful runs: lease, history window, stored turn) instead "
                             "of a fresh stateless session each")
    parser.add_argument("--session-turns", "--sessions-turns", type=int, default=0,
                        help="ttft: fill --history-sessions sessions with this many "
                             "turns first, then stream round robin over them")
    parser.add_argument("--history-sessions", type=int, default=16,
                        help="ttft with --session-turns: sessions (default 16)")
    parser.add_argument("--paced", action="store_true",
                        help="hot: a model taking ~1 ms per token (32 ms a turn) instead of "
                             "an instant one")
    parser.add_argument("--tool-rounds", type=int, default=4,
                        help="tools: tool rounds the model asks for (0: none)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bus-sync", default=None, metavar="SYNC",
                        help="bus.sync for clawbus's embedded nats-server (default, always, "
                             "or an interval like 10s; both sides of an A/B run)")
    parser.add_argument("--top", type=int, default=25, help="frames listed per process")
    parser.add_argument("--rate-hz", type=int, default=200, help="py-spy sampling rate")
    parser.add_argument("--no-spy", action="store_true",
                        help="no profiler: just the load and the CPU it cost")
    parser.add_argument("--ab", type=Path, default=None, metavar="BASELINE_DIR",
                        help="A/B: alternate this checkout of clawbus (A) with the current one")
    parser.add_argument("--rounds", type=int, default=4, help="A/B rounds")
    parser.add_argument("--trace-b", action="store_true",
                        help="trace the current checkout (B; the only one without --ab): its "
                             "processes export OTLP/HTTP to a local sink that drops the spans")
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = {"nonstream": 16, "hot": 8}.get(args.load, 1)
    tool_rounds = (args.tool_rounds,) if args.load == "tools" else ()
    py_spy: str | None = None
    if not args.no_spy and args.ab is None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            sys.exit("bench.profile: py-spy is missing: pip install -e '.[bench]'")
    cpus = choose_cpus()
    out_dir = RESULTS / f"profile-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{args.load}"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clawbus-profile-"))
    upstream = UpstreamProcess(out_dir, cpus.harness)
    sink = OtlpSink().__enter__() if args.trace_b else None
    traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint} if sink is not None else {}
    try:
        if args.ab is None:
            system = Clawbus(upstream.url, work, out_dir, workers=args.workers, cpus=cpus.system,
                             shapes=[_held_shape(args)], bus_sync=args.bus_sync,
                             tool_rounds=tool_rounds, env=traced)
            figures = _measure(args, system, upstream, cpus, out_dir, py_spy=py_spy)
            _print_stacks(figures.pop("stacks"), args.top)
            print("\n" + "  ".join(f"{k} {_fmt(v)}" for k, v in figures.items()))
            print(f"raw stacks and logs: {out_dir}")
            return
        sources = {"A": args.ab.resolve(), "B": ROOT}
        results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        for round_ in range(args.rounds):
            for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                system = Clawbus(upstream.url, work, out_dir, workers=args.workers,
                                 cpus=cpus.system, source=sources[name], label=f"clawbus-{name}",
                                 shapes=[_held_shape(args)], bus_sync=args.bus_sync,
                                 tool_rounds=tool_rounds,
                                 env=traced if name == "B" else None)
                figures = _measure(args, system, upstream, cpus, out_dir, py_spy=None,
                                   tag=f"-{name}-{round_ + 1}")
                figures.pop("stacks")
                results[name].append(figures)
                print(f"round {round_ + 1} {name}: "
                      + "  ".join(f"{k} {_fmt(v)}" for k, v in figures.items()), flush=True)
        print(f"\nmedians over {args.rounds} rounds (A = {sources['A']}, B = {sources['B']}):")
        for key in results["B"][0]:
            values = {name: [r.get(key) for r in rows] for name, rows in results.items()}
            numbers = {name: [float(v) for v in vs if isinstance(v, int | float)]
                       for name, vs in values.items()}
            if all(len(numbers[n]) == len(values[n]) > 0 for n in numbers):
                a, b = (statistics.median(numbers[n]) for n in ("A", "B"))
                ratio = f"  B/A {b / a:.3f}" if a else ""
                print(f"  {key:>22}: A {_fmt(a)}  B {_fmt(b)}{ratio}")
        if sink is not None:
            print(f"traces: {sink.exports} OTLP exports, {sink.bytes:,} bytes")
    finally:
        if sink is not None:
            sink.__exit__(None, None, None)
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
