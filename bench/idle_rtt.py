"""What a bus hop costs after the machine was idle::

    python -m bench.idle_rtt [--cpu 0] [--samples 12]

Starts an embedded nats-server and, on one CPU (this process and the server
pinned together, as the benchmark pins clawbus), times a core NATS
request/reply and a JetStream publish back to back and after idle gaps of
50–600 ms. On the benchmark's VM a round trip costs ~0.18 ms back to back and
~0.6–0.7 ms after any gap: the cost behind TTFT at c=1, where the system idles
between streams and a first token crosses several such hops
(docs/BENCHMARKS.md, "Where the remaining time goes").

It then times plain Python work (JSON round trips, no I/O) back to back and
after the same gaps: the work itself gets slower after an idle spell (caches
and TLBs cold once the vCPU halted), so the penalty is not NATS's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import nats
import orjson
from nats.aio.msg import Msg

from clawbus.natsserver import NatsServer

GAPS = (0.0, 0.05, 0.3, 0.6)


async def measure(url: str, samples: int) -> list[str]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="IDLE", subjects=["idle.>"])

    async def echo(msg: Msg) -> None:
        await nc.publish(msg.reply, msg.data)

    await nc.subscribe("rtt.echo", cb=echo)
    lines = []
    for gap in GAPS:
        for kind in ("request/reply", "js publish"):
            times = []
            for _ in range(samples):
                if gap:
                    await asyncio.sleep(gap)
                start = time.perf_counter()
                if kind == "js publish":
                    await js.publish("idle.x", b"x" * 300)
                else:
                    await nc.request("rtt.echo", b"x" * 300, timeout=2)
                times.append((time.perf_counter() - start) * 1000)
            median = statistics.median(times)
            lines.append(f"gap {gap * 1000:4.0f} ms  {kind:13}  median {median:.3f} ms"
                         f"  max {max(times):.3f} ms")
    await nc.close()
    return lines


def cold_work(samples: int) -> list[str]:
    """Fixed CPU-only work timed back to back and after each gap."""
    data = {"tokens": list(range(50)), "text": "y" * 100}

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(20):
            orjson.loads(orjson.dumps(data))
            json.loads(json.dumps(data))
        return (time.perf_counter() - start) * 1e6

    lines = []
    for gap in GAPS:
        times = []
        for _ in range(samples * 4):
            if gap:
                time.sleep(gap)
            times.append(timed())
        median = statistics.median(times)
        lines.append(f"gap {gap * 1000:4.0f} ms  CPU-only work  median {median:.0f} µs")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_rtt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", type=int, default=0, help="the one CPU for both processes")
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})  # nats-server, started next, inherits it
    server = NatsServer(Path(tempfile.mkdtemp(prefix="clawbus-idle-rtt-")))
    server.start()
    try:
        for line in asyncio.run(measure(server.url, args.samples)):
            print(line)
    finally:
        server.stop()
    for line in cold_work(args.samples):
        print(line)


if __name__ == "__main__":
    main()
