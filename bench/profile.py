"""Profile clawbus under one benchmark load, every Python process at once::

    python -m bench.profile nonstream [--concurrency 16] [--duration 6]
    python -m bench.profile ttft      [--concurrency 1]
    python -m bench.profile held      [--streams 2000]

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
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

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


def _load_command(args: argparse.Namespace, system: Clawbus) -> list[str]:
    shape = TTFT_SHAPE if args.load == "ttft" else HELD_SHAPE
    cmd = [sys.executable, "-m", "bench.streamclient", "--url", system.chat_url,
           "--model", system.model(*shape), "--tokens", str(shape[0]),
           "--delay-ms", f"{shape[1]:g}", "--auth", system.auth or ""]
    if args.load == "ttft":
        cmd += ["--concurrency", str(args.concurrency), "--duration", f"{args.duration:g}"]
    else:
        cmd += ["--streams", str(args.streams), "--rate", f"{args.rate:g}"]
    return cmd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=["nonstream", "ttft", "held"])
    parser.add_argument("--concurrency", type=int, default=None,
                        help="connections (nonstream: 16, ttft: 1)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of load")
    parser.add_argument("--streams", type=int, default=2000, help="held: streams")
    parser.add_argument("--rate", type=float, default=250.0, help="held: opened per second")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--top", type=int, default=25, help="frames listed per process")
    parser.add_argument("--rate-hz", type=int, default=200, help="py-spy sampling rate")
    parser.add_argument("--no-spy", action="store_true",
                        help="no profiler: just the load and the CPU it cost (quick A/B runs)")
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = 16 if args.load == "nonstream" else 1
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("bench.profile: py-spy is missing: pip install -e '.[bench]'")
    cpus = choose_cpus()
    out_dir = RESULTS / f"profile-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{args.load}"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clawbus-profile-"))
    upstream = UpstreamProcess(out_dir, cpus.harness)
    system = Clawbus(upstream.url, work, out_dir, workers=args.workers, cpus=cpus.system)
    try:
        system.start()
        system.warm()
        targets = {pid: process_role(pid) for pid in system.pids()}
        targets = {pid: role for pid, role in targets.items()
                   if role in ("gateway", "worker") and not args.no_spy}
        # Held streams last tokens x delay after the last one opened.
        seconds = (args.duration if args.load != "held"
                   else args.streams / args.rate + HELD_SHAPE[0] * HELD_SHAPE[1] / 1000)
        spies = {pid: subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
             "--rate", str(args.rate_hz), "--duration", str(max(1, round(seconds))),
             "--output", str(out_dir / f"{role}-{pid}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for pid, role in targets.items()}
        meter = Meter(system, upstream.pids, cpus)
        if args.load == "nonstream":
            body = orjson.dumps({"model": system.model(*NONSTREAM), "stream": False,
                                 "messages": [{"role": "user", "content": "hi"}]})
            load: dict[str, Any] = run_wrk(ensure_wrk(), system.chat_url, body,
                                           auth=system.auth, connections=args.concurrency,
                                           duration=args.duration, cpus=cpus.harness)
        else:
            cmd = _load_command(args, system)
            if cpus.harness:
                cmd = ["taskset", "-c", cpus.harness, *cmd]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            load = orjson.loads(done.stdout.strip().splitlines()[-1])
        usage = meter.done()
        for pid, spy in spies.items():
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0:
                print(f"py-spy on {pid} failed: {err[-500:]}", file=sys.stderr)
        for pid, role in targets.items():
            path = out_dir / f"{role}-{pid}.txt"
            if not path.exists():
                continue
            total, own, inclusive = top_frames(path.read_text(), args.top)
            print(f"\n== {role} (pid {pid}): {total} samples ==")
            print("-- self --")
            for frame, count in own:
                print(f"{100 * count / max(1, total):5.1f}%  {frame}")
            print("-- inclusive --")
            for frame, count in inclusive:
                print(f"{100 * count / max(1, total):5.1f}%  {frame}")
        keys = ("rps", "requests", "latency", "streams", "on_time_fraction", "ttft_ms",
                "gap_ms", "errors", "error_count")
        print("\nload:", {k: v for k, v in load.items() if k in keys})
        roles = usage["system_cpu_s_by_role"]
        print("cpu during load (s):", {k: round(v, 2) for k, v in roles.items()},
              f"total {usage['system_cpu_s']:.2f}")
        if args.load == "nonstream" and load.get("requests"):
            n = int(load["requests"])
            print("cpu per request (ms):", {k: round(1000 * v / n, 3) for k, v in roles.items()},
                  f"total {1000 * usage['system_cpu_s'] / n:.3f}")
        print(f"raw stacks: {out_dir}")
    finally:
        system.stop()
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
