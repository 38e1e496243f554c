"""CPU per upstream request: the workers' HTTP client against aiohttp, same run::

    python -m bench.http_client [--requests 3000] [--rounds 4]

Starts the fake upstream (``bench.upstream``) on CPU 1 and, pinned to CPU 0, sends
streamed chat requests through each client in turn (A B, B A, … rounds, each a new
client and event loop under uvloop, as in a worker) and reads each reply to its end.
Two shapes: 32 tokens sent at once (one network read per reply: the per-request
cost) and 32 tokens 1 ms apart at 16 concurrent streams (one read per token: the
per-read cost). Prints the process CPU per request of each client and the ratio.
aiohttp is not a clawbus dependency: ``pip install -e '.[bench]'`` brings it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import uvloop

from bench.systems import UpstreamProcess, upstream_model
from workers.providers.http_client import HTTPClient

HEADERS = {"accept": "text/event-stream", "content-type": "application/json"}
Send = Callable[[], Awaitable[int]]
Close = Callable[[], Awaitable[None]]


def body(tokens: int, delay_ms: float) -> bytes:
    return orjson.dumps({
        "model": upstream_model(tokens, delay_ms), "stream": True,
        "messages": [{"role": "user", "content": "hello"}],
        "stream_options": {"include_usage": True}})


async def lean_client(url: str, payload: bytes) -> tuple[Send, Close]:
    client = HTTPClient(HEADERS, read_timeout=60, connect_timeout=5)

    async def send() -> int:
        response = await client.post(url, payload)
        size = 0
        while data := await response.readany():
            size += len(data)
        response.release()
        return size

    return send, client.aclose


async def aiohttp_client(url: str, payload: bytes) -> tuple[Send, Close]:
    import aiohttp  # a bench-only extra

    session = aiohttp.ClientSession(
        headers=HEADERS,
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=60))

    async def send() -> int:
        response = await session.post(url, data=payload)
        size = 0
        while data := await response.content.readany():
            size += len(data)
        response.release()
        return size

    return send, session.close


CLIENTS = {"httptools client": lean_client, "aiohttp": aiohttp_client}


async def measure(make: Callable[[str, bytes], Awaitable[tuple[Send, Close]]], url: str,
                  payload: bytes, requests: int, concurrency: int) -> float:
    """Process CPU seconds per request."""
    send, close = await make(url, payload)
    await asyncio.gather(*(send() for _ in range(concurrency)))  # warm the pool
    per_task = requests // concurrency

    async def loop() -> None:
        for _ in range(per_task):
            await send()

    started = time.process_time()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    cpu = time.process_time() - started
    await close()
    return cpu / (per_task * concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    shapes = [("32 tokens at once, c=1", body(32, 0), args.requests, 1),
              ("32 tokens 1 ms apart, c=16", body(32, 1), args.requests // 10, 16)]
    with tempfile.TemporaryDirectory() as logs:
        upstream = UpstreamProcess(Path(logs), "1")
        url = f"{upstream.url}/v1/chat/completions"
        try:
            for label, payload, requests, concurrency in shapes:
                results: dict[str, list[float]] = {name: [] for name in CLIENTS}
                for round_ in range(args.rounds):
                    order = list(CLIENTS) if round_ % 2 == 0 else list(reversed(CLIENTS))
                    for name in order:
                        cpu = uvloop.run(measure(CLIENTS[name], url, payload,
                                                 requests, concurrency))
                        results[name].append(cpu)
                medians = {name: statistics.median(v) for name, v in results.items()}
                base = medians["aiohttp"]
                print(f"{label}: " + ", ".join(
                    f"{name} {value * 1e6:.0f} µs/request ({value / base:.2f}×)"
                    for name, value in medians.items()))
        finally:
            upstream.stop()


if __name__ == "__main__":
    main()
