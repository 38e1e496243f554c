"""What reading a session's history costs as the session grows::

    python -m bench.history [--turns 10,100,1000,3000] [--budget 32000] [--cpu 0]

Starts an embedded nats-server with clawbus's streams and grows one session the
way a worker does (read the window, append the turn with its window headers),
turns of ~600 characters. At each size it times, min of 5:

- the window a run reads (``Transcripts.load_window``: the newest turns that fit
  the history budget — what the agent sees);
- the whole transcript (``Transcripts.load``: what ``chat.history`` returns);
- the whole transcript through an ordered consumer (the way runs read their
  history until the fourth session), deleted after each read.

A run's cost should stay flat as the session grows; the whole transcript grows
with it. Pinned to ``--cpu`` together with the server, as the benchmark pins clawbus.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bus.connection import connect, ensure_bus
from bus.messages import Turn
from bus.transcripts import Transcripts
from clawbus.config import BusConfig, SessionConfig
from clawbus.natsserver import NatsServer

TOKEN = "benchhistory"


async def _best_ms(read: Callable[[], Awaitable[object]], times: int = 5) -> float:
    best = float("inf")
    for _ in range(times):
        started = time.perf_counter()
        await read()
        best = min(best, time.perf_counter() - started)
    return best * 1000.0


async def measure(url: str, sizes: list[int], budget: int) -> list[str]:
    nc = await connect(url, "bench-history")  # as workers connect
    try:
        js = await ensure_bus(nc, BusConfig(), SessionConfig())
        tx = Transcripts(js, nc)
        by_consumer = Transcripts(js)  # no connection: reads with an ordered consumer
        rows = ["| turns | window read (turns in it) | whole transcript "
                "| whole, ordered consumer |", "|---:|---:|---:|---:|"]
        stored = 0
        for size in sizes:
            while stored < size:
                window = await tx.load_window(TOKEN, budget)
                turn = Turn(run_id=f"bench-{stored}", agent_id="main", user="question " * 20,
                            assistant="answer " * 60, ts=time.time())
                await tx.append(TOKEN, turn, window.last_seq, window)
                stored += 1
            window = await tx.load_window(TOKEN, budget)
            ms_window = await _best_ms(lambda: tx.load_window(TOKEN, budget))
            ms_whole = await _best_ms(lambda: tx.load(TOKEN))
            ms_consumer = await _best_ms(lambda: by_consumer.load(TOKEN))
            rows.append(f"| {size:,} | {ms_window:.1f} ms ({len(window.turns)}) | "
                        f"{ms_whole:.1f} ms | {ms_consumer:.1f} ms |")
        return rows
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", default="10,100,1000,3000",
                        help="session sizes to time, comma-separated, increasing")
    parser.add_argument("--budget", type=int, default=SessionConfig().history_budget_chars,
                        help="history budget in characters")
    parser.add_argument("--cpu", type=int, default=0, help="CPU for this process and the server")
    args = parser.parse_args(argv)
    logging.getLogger("clawbus").setLevel(logging.ERROR)  # not "nats disconnected" at exit
    sizes = sorted(int(n) for n in args.turns.split(",") if n.strip())
    if hasattr(os, "sched_setaffinity") and args.cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {args.cpu})  # the server (a child) inherits it
    with tempfile.TemporaryDirectory(prefix="clawbus-history-") as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            rows = asyncio.run(measure(server.url, sizes, args.budget))
        finally:
            server.stop()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
