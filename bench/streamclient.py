"""A cheap streaming (SSE) load client: raw asyncio sockets on uvloop, no HTTP library.

Two modes, both against ``POST /v1/chat/completions`` with ``stream: true``:

* **closed loop** (``--concurrency C --duration S [--warmup W]``): C keep-alive
  connections, each sending the next request as soon as the previous stream ends.
  Measures time to first content token (TTFT) and inter-token gaps of the streams
  opened during the S seconds that follow a W-second warm-up, and separately the
  TTFT of the *first wave*: the C streams opened at the same instant, on new
  connections, when the lanes start.

  Why the warm-up: the lanes start together, so the first waves are a thundering
  herd whose TTFT spreads over the time the system needs for C stream opens; a
  closed loop of equal streams then keeps them bunched for a while. A figure that
  mixes those waves with the steady state depends on how long the run lasts (at
  C=64 against clawbus: 17 ms p50 over 5 s, ~8 ms over 20 s). The first wave's
  TTFT is reported on its own, so the herd stays visible.
* **open rate** (``--streams N --rate R``): N streams, each on its own new
  connection, opened at R per second regardless of how the earlier ones are doing
  (held streams). Measures how many streams were delivered *on time*.

A token is one whitespace-separated word of ``delta.content`` (the fake upstream
sends one word per token, ``"w<k> "``), so tokens are counted correctly even when a
gateway coalesces several into one delta. A token's arrival time is the time of the
``data_received`` call that completed its SSE event.

**On time.** The upstream sends token ``k`` at ``k × delay`` after it received the
request (token 0 at once). A stream opened (connection attempt started) at ``t0`` is
*on time* when it ends with HTTP 200 and ``[DONE]``, has all the expected tokens,
and every token ``k`` arrived by ``t0 + k × delay + slack`` (``--slack-ms``, default
100 ms). So a stream is late if its first token is more than the slack late, or if
it falls behind the upstream's pacing by more than the slack at any point.

Output: one JSON object (see :func:`summarize`) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from .stats import percentile, summary

__all__ = [
    "StreamRecord",
    "build_request",
    "closed_loop",
    "open_rate",
    "raise_nofile_limit",
    "summarize",
]

DEFAULT_SLACK_MS = 100.0
LATE_SAMPLE = 200  # late streams described one by one in a summary


@dataclass(slots=True)
class StreamRecord:
    """What one stream did; times are ``time.perf_counter()`` seconds."""

    intended: float  # when it should have been opened (open-rate mode); else = started
    started: float  # connection attempt (open rate) or request write (closed loop)
    status: int = 0
    token_times: list[float] = field(default_factory=list)
    done: bool = False  # saw ``data: [DONE]``
    complete: bool = False  # the HTTP response ended properly
    error: str | None = None
    ended: float = 0.0
    first: bool = False  # closed loop: the lane's first stream (the first wave)


def build_request(host: str, port: int, path: str, body: bytes, auth: str | None,
                  *, keep_alive: bool = True, headers: Sequence[str] = ()) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
            "Content-Type: application/json", "Accept: text/event-stream",
            f"Content-Length: {len(body)}", *headers]
    if auth:
        head.append(f"Authorization: Bearer {auth}")
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Response:
    """Incremental parser of one HTTP/1.1 response carrying an SSE body."""

    __slots__ = ("body_left", "buf", "chunk_left", "chunked", "close_delimited", "error_body",
                 "in_body", "keep_alive", "rec", "sse", "trailer")

    def __init__(self, rec: StreamRecord) -> None:
        self.rec = rec
        self.buf = bytearray()
        self.in_body = False
        self.chunked = False
        self.close_delimited = False
        self.keep_alive = True
        self.body_left = 0
        self.chunk_left = -1  # -1: expecting a chunk-size line; >=0: data bytes left
        self.trailer = False
        self.sse = bytearray()
        self.error_body = bytearray()

    def feed(self, data: bytes, now: float) -> bool:
        """Consume bytes; True when the response is complete."""
        self.buf += data
        if not self.in_body:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(self.buf[:end]).split(b"\r\n")
            del self.buf[:end + 4]
            try:
                self.rec.status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self.rec.error = "bad status line"
                return True
            length = None
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
                elif name == b"content-length":
                    length = int(value)
                elif name == b"connection" and b"close" in value.lower():
                    self.keep_alive = False
            self.in_body = True
            if not self.chunked:
                if length is None:
                    self.close_delimited = True
                    self.keep_alive = False
                else:
                    self.body_left = length
        return self._body(now)

    def _body(self, now: float) -> bool:
        buf = self.buf
        if not self.chunked:
            if self.close_delimited:
                self._content(bytes(buf), now)
                buf.clear()
                return False
            take = bytes(buf[:self.body_left])
            del buf[:self.body_left]
            self.body_left -= len(take)
            self._content(take, now)
            return self.body_left == 0
        while True:
            if self.trailer:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                del buf[:end + 2]
                if end == 0:
                    return True
                continue
            if self.chunk_left < 0:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.rec.error = "bad chunk size"
                    return True
                del buf[:end + 2]
                if size == 0:
                    self.trailer = True
                    continue
                self.chunk_left = size
            if self.chunk_left > 0:
                if not buf:
                    return False
                take = bytes(buf[:self.chunk_left])
                del buf[:len(take)]
                self.chunk_left -= len(take)
                self._content(take, now)
                if self.chunk_left > 0:
                    return False
            if len(buf) < 2:
                return False
            del buf[:2]  # CRLF after the chunk data
            self.chunk_left = -1

    def eof(self, now: float) -> None:
        if self.close_delimited and self.in_body:
            self.rec.complete = True

    def _content(self, data: bytes, now: float) -> None:
        if self.rec.status != 200:
            if len(self.error_body) < 300:
                self.error_body += data[:300]
            return
        self.sse += data
        sse = self.sse
        while True:
            end = sse.find(b"\n")
            if end < 0:
                return
            line = bytes(sse[:end]).rstrip(b"\r")
            del sse[:end + 1]
            if line.startswith(b"data:"):
                self._event(line[5:].strip(), now)

    def _event(self, payload: bytes, now: float) -> None:
        rec = self.rec
        if payload == b"[DONE]":
            rec.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            rec.error = rec.error or f"non-JSON event: {payload[:80]!r}"
            return
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            rec.error = rec.error or f"error event: {payload[:200].decode(errors='replace')}"
            return
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                words = len(content.split())
                if words:
                    rec.token_times.extend([now] * words)


class _Connection(asyncio.Protocol):
    """One client connection that carries requests one after another."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: _Response | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            return
        now = time.perf_counter()
        if response.feed(data, now):
            self._finish(complete=response.rec.error is None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        response = self.response
        if response is not None:
            response.eof(time.perf_counter())
            if not response.rec.complete and response.rec.error is None:
                response.rec.error = f"connection closed: {exc}" if exc else "connection closed"
            self._finish(complete=response.rec.complete)

    def _finish(self, *, complete: bool) -> None:
        response = self.response
        assert response is not None
        rec = response.rec
        rec.complete = complete
        rec.ended = time.perf_counter()
        if rec.status != 200 and rec.error is None:
            detail = bytes(response.error_body[:200]).decode(errors="replace")
            rec.error = f"HTTP {rec.status}: {detail}"

        if not response.keep_alive and self.transport is not None:
            self.transport.close()
            self.lost = True
        self.response = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def send(self, request: bytes, rec: StreamRecord) -> None:
        assert self.transport is not None and self.response is None
        self.response = _Response(rec)
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Connection, host, port)
    return protocol


async def closed_loop(host: str, port: int, request: bytes | Sequence[bytes], *,
                      concurrency: int, duration: float, stream_timeout: float,
                      warmup: float = 0.0) -> tuple[list[StreamRecord], list[StreamRecord]]:
    """``concurrency`` keep-alive connections streaming back to back for
    ``warmup + duration`` s: (the streams opened after the warm-up, every stream).
    Several requests are sent round robin (stream k sends request k mod n)."""
    records: list[StreamRecord] = []
    cycle = itertools.cycle([request] if isinstance(request, bytes) else list(request))
    measured_from = time.perf_counter() + warmup
    deadline = measured_from + duration

    async def one_lane() -> None:
        conn: _Connection | None = None
        first = True
        while time.perf_counter() < deadline:
            if conn is None or conn.lost:
                try:
                    conn = await asyncio.wait_for(_connect(host, port), stream_timeout)
                except (OSError, TimeoutError) as exc:
                    now = time.perf_counter()
                    records.append(StreamRecord(now, now, error=f"connect: {exc!r}", ended=now))
                    conn = None
                    await asyncio.sleep(0.05)
                    continue
            now = time.perf_counter()
            rec = StreamRecord(now, now, first=first)
            first = False
            records.append(rec)
            try:
                await asyncio.wait_for(conn.send(next(cycle), rec), stream_timeout)
            except TimeoutError:
                rec.error = "timeout"
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    await asyncio.gather(*(one_lane() for _ in range(concurrency)))
    return [r for r in records if r.started >= measured_from], records


async def open_rate(host: str, port: int, request: bytes, *, streams: int, rate: float,
                    stream_timeout: float) -> list[StreamRecord]:
    """``streams`` streams, each on a new connection, opened at ``rate`` per second."""
    records: list[StreamRecord] = []
    t0 = time.perf_counter() + 0.05

    async def one(intended: float) -> None:
        rec = StreamRecord(intended, time.perf_counter())
        records.append(rec)
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(stream_timeout):
                conn = await _connect(host, port)
                await conn.send(request, rec)
        except TimeoutError:
            rec.error = "timeout"
        except OSError as exc:
            rec.error = f"connect: {exc!r}"
        finally:
            rec.ended = rec.ended or time.perf_counter()
            if conn is not None:
                conn.close()

    tasks: list[asyncio.Task[None]] = []
    for i in range(streams):
        intended = t0 + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(intended)))
    await asyncio.gather(*tasks)
    return records


def summarize(records: Sequence[StreamRecord], *, tokens: int, delay_ms: float,
              slack_ms: float = DEFAULT_SLACK_MS, elapsed: float | None = None) -> dict[str, Any]:
    """Aggregate stream records: counts, TTFT, gaps, lateness and the on-time share."""
    delay = delay_ms / 1000.0
    slack = slack_ms / 1000.0
    ttft: list[float] = []
    gaps: list[float] = []
    lateness: list[float] = []
    ok = on_time = 0
    errors: Counter[str] = Counter()
    first_open = min((r.intended for r in records), default=0.0)
    # Streams that missed the deadline, by the second (since the first open) they
    # were meant to open in, and a sample of them: a stall shows as late streams
    # bunched in a second or two, too little CPU as late streams spread out.
    late_by_second: Counter[int] = Counter()
    late_sample: list[dict[str, float | int]] = []
    for rec in records:
        times = rec.token_times
        good = (rec.status == 200 and rec.done and rec.complete and rec.error is None
                and len(times) == tokens)
        if good:
            ok += 1
        elif rec.error is not None:
            errors[rec.error[:160]] += 1
        elif rec.status != 200:
            errors[f"HTTP {rec.status}"] += 1
        else:
            errors[f"incomplete: {len(times)}/{tokens} tokens, done={rec.done}"] += 1
        if times:
            ttft.append((times[0] - rec.started) * 1000.0)
            gaps.extend((b - a) * 1000.0 for a, b in itertools.pairwise(times))
            late_by_token = [t - rec.started - k * delay for k, t in enumerate(times)]
            late = max(late_by_token)
            lateness.append(late * 1000.0)
            if good and late <= slack:
                on_time += 1
        if not (good and times and late <= slack):
            second = int(rec.intended - first_open)
            late_by_second[second] += 1
            if len(late_sample) < LATE_SAMPLE and times:
                late_sample.append({
                    "open_s": round(rec.intended - first_open, 4),
                    "ttft_ms": round((times[0] - rec.started) * 1000.0, 2),
                    "late_ms": round(late * 1000.0, 2),
                    "worst_token": late_by_token.index(late)})
    n = len(records)
    lag = [(r.started - r.intended) * 1000.0 for r in records]
    return {
        "streams": n,
        "ok": ok,
        "on_time": on_time,
        "on_time_fraction": on_time / n if n else None,
        "ok_fraction": ok / n if n else None,
        "errors": dict(errors.most_common(5)),
        "error_count": n - ok,
        "ttft_ms": summary(ttft),
        "gap_ms": summary(gaps),
        "lateness_ms": summary(lateness),
        "late_by_second": {str(k): v for k, v in sorted(late_by_second.items())},
        # When the first stream was meant to open, on the wall clock: lines up the
        # seconds above with other logs (a process's GC pauses, say).
        "first_open_epoch": round(time.time() - time.perf_counter() + first_open, 3)
        if records else None,
        "late_sample": late_sample,
        "client_lag_ms_max": max(lag) if lag else None,
        "client_lag_ms_p99": percentile(lag, 99),
        "elapsed_s": elapsed,
        "streams_per_s": (n / elapsed) if elapsed else None,
        "tokens": tokens,
        "delay_ms": delay_ms,
        "slack_ms": slack_ms,
    }


def raise_nofile_limit() -> None:
    """Allow as many sockets as the hard limit permits (held-stream runs open thousands)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = orjson.dumps({"model": args.model, "stream": True,
                         "messages": [{"role": "user", "content": args.message}]})
    start = time.perf_counter()
    if args.streams is not None:
        request = build_request(host, port, url.path, body, args.auth, keep_alive=False)
        timeout = args.timeout or (args.tokens * args.delay_ms / 1000.0 + 60.0)
        records = await open_rate(host, port, request, streams=args.streams, rate=args.rate,
                                  stream_timeout=timeout)
    else:
        requests = [build_request(host, port, url.path, body, args.auth,
                                  headers=[f"x-openclaw-session-key: {args.session_prefix}{k}"])
                    for k in range(args.sessions)] if args.sessions else [
            build_request(host, port, url.path, body, args.auth)]
        timeout = args.timeout or (args.tokens * args.delay_ms / 1000.0 + 30.0)
        records, every = await closed_loop(
            host, port, requests, concurrency=args.concurrency, duration=args.duration,
            stream_timeout=timeout, warmup=args.warmup)
        elapsed = time.perf_counter() - start - args.warmup
        result = summarize(records, tokens=args.tokens, delay_ms=args.delay_ms,
                           slack_ms=args.slack_ms, elapsed=elapsed)
        wave = [(r.token_times[0] - r.started) * 1000.0 for r in every
                if r.first and r.token_times]
        result["warmup_s"] = args.warmup
        result["first_wave_ttft_ms"] = summary(wave)
        return result
    elapsed = time.perf_counter() - start
    return summarize(records, tokens=args.tokens, delay_ms=args.delay_ms,
                     slack_ms=args.slack_ms, elapsed=elapsed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streamclient",
                                     description="SSE load client (see module docstring)")
    parser.add_argument("--url", required=True, help="…/v1/chat/completions")
    parser.add_argument("--model", required=True)
    parser.add_argument("--auth", default=None, help="bearer token")
    parser.add_argument("--message", default="hi")
    parser.add_argument("--tokens", type=int, required=True, help="tokens the upstream sends")
    parser.add_argument("--delay-ms", type=float, required=True, help="upstream token pacing")
    parser.add_argument("--slack-ms", type=float, default=DEFAULT_SLACK_MS,
                        help="how late a token may be and still count as on time")
    parser.add_argument("--concurrency", type=int, default=1, help="closed loop: connections")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="closed loop: seconds measured (after the warm-up)")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="closed loop: seconds of streams before the measured ones")
    parser.add_argument("--sessions", type=int, default=0,
                        help="closed loop: send stream k to session <prefix><k mod N> "
                             "(x-openclaw-session-key); 0: no session header")
    parser.add_argument("--session-prefix", default="bench-",
                        help="closed loop: session key prefix (with --sessions)")
    parser.add_argument("--streams", type=int, default=None,
                        help="open rate: number of streams (each on a new connection)")
    parser.add_argument("--rate", type=float, default=250.0, help="open rate: streams/s")
    parser.add_argument("--timeout", type=float, default=None, help="per-stream timeout (s)")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
