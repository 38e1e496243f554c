"""Helpers shared by the fault-injection tests (``tests/test_faults_*.py``).

- :class:`FaultyOpenAI`: the fake upstream plus a per-request delay before the
  response head (so a run can be caught *before* it streamed anything), an
  abrupt connection reset after N tokens, and a stall after N tokens.
- :class:`SseRun`: one streaming chat request read frame by frame, opened (up
  to its role chunk) separately from being read to the end, so a test can
  pipeline several runs of one session.
- :class:`EventTap`: a NATS subscriber on ``evt.>`` that records every run
  event any worker sends (who accepted which run, which attempt, what ended
  it); it never answers probes, so the system behaves as if it were absent.
- :func:`session_turns`: a session's transcript, read straight from JetStream.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus import subjects
from bus.messages import Accepted, Turn, decode_event
from bus.transcripts import Transcripts
from tests.fakes.http_upstream import RequestRecord, forever, send_chunk
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN

URL = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORDS = re.compile(r"\s*\S+\s*")


class FaultyOpenAI(FakeOpenAI):
    """:class:`FakeOpenAI` with extra, per-request faults chosen from the request body.

    * ``head_delay(body)`` - seconds to wait before sending the SSE response head;
    * ``reset_after`` - after N content tokens, reset the TCP connection (no end chunk);
    * ``stall_after`` - after N content tokens, send nothing more (until the client leaves).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.head_delay: Callable[[dict[str, Any]], float] = lambda body: 0.0
        self.reset_after: int | None = None
        self.stall_after: int | None = None
        super().__init__(**kwargs)

    async def _stream(self, record: RequestRecord, writer: asyncio.StreamWriter,
                      body: dict[str, Any]) -> None:
        delay = self.head_delay(body)
        if delay > 0:
            await asyncio.sleep(delay)
        cut = self.reset_after if self.reset_after is not None else self.stall_after
        if cut is None:
            await super()._stream(record, writer, body)
            return
        _, tokens, _, _ = self._completion(body)
        await self._start_sse(record, writer)
        base = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 0,
                "model": "fake"}
        for token in tokens[:cut]:
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": token},
                                          "finish_reason": None}]}
            await send_chunk(writer, b"data: " + orjson.dumps(chunk) + b"\n\n")
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
        if self.reset_after is not None:
            writer.transport.abort()  # RST, mid-body: no terminating chunk
            raise ConnectionResetError("fault: reset by the fake upstream")
        await forever()


def reset_faults(up: FaultyOpenAI) -> None:
    up.token_delay = 0.0
    up.fail_status = None
    up.garbage_after = None
    up.stall = False
    up.reset_after = None
    up.stall_after = None
    up.head_delay = lambda body: 0.0


def body_text(record: RequestRecord) -> str:
    return orjson.dumps(record.body).decode()


def last_user(record: RequestRecord) -> str:
    """The current message of an upstream request."""
    return str(record.body["messages"][-1]["content"])


# --------------------------------------------------------------------------- SSE client


@dataclass
class StreamResult:
    """How one streaming request ended, as its client saw it."""

    content: str
    status: int = 0
    run_id: str | None = None
    text: str = ""
    error: dict[str, Any] | None = None
    finish_reason: str | None = None
    done_frame: bool = False
    transport_error: str | None = None
    frames: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def complete(self) -> bool:
        return (self.status == 200 and self.done_frame and self.error is None
                and self.finish_reason is not None)

    @property
    def clean_error(self) -> bool:
        """An error the client was told about properly (an error frame then ``[DONE]``,
        or an error status with the OpenAI envelope)."""
        if self.status == 200:
            return self.done_frame and self.error is not None
        return self.status >= 400 and self.error is not None


class SseRun:
    """One ``stream: true`` chat request; :meth:`open` returns once the run is on
    the bus (the role chunk arrived, or an error status came back)."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, content: str,
                 headers: dict[str, str] | None = None, model: str = "openclaw") -> None:
        self.http = http
        self.url = f"{base_url}{URL}"
        self.body = {"model": model, "stream": True,
                     "messages": [{"role": "user", "content": content}]}
        self.headers = {**AUTH, **(headers or {})}
        self.result = StreamResult(content=content)
        self._resp: httpx.Response | None = None
        self._lines: Any = None

    async def open(self) -> StreamResult:
        r = self.result
        r.started = time.monotonic()
        try:
            self._resp = await self.http.send(self.http.build_request(
                "POST", self.url, json=self.body, headers=self.headers), stream=True)
            r.status = self._resp.status_code
            if r.status != 200:
                raw = await self._resp.aread()
                await self._resp.aclose()
                self._resp = None
                r.error = orjson.loads(raw).get("error")
                r.ended = time.monotonic()
                return r
            self._lines = self._resp.aiter_lines()
            while True:  # up to (and including) the role chunk
                line = await anext(self._lines)
                if line.startswith("data: "):
                    self._frame(line[6:])
                    break
        except (httpx.HTTPError, StopAsyncIteration) as exc:
            r.transport_error = repr(exc)
            await self._close()
        return r

    def _frame(self, data: str) -> None:
        r = self.result
        r.frames.append(data)
        if data == "[DONE]":
            r.done_frame = True
            return
        chunk = orjson.loads(data)
        if "error" in chunk:
            r.error = chunk["error"]
            return
        r.run_id = r.run_id or chunk.get("id")
        for choice in chunk.get("choices") or []:
            r.text += choice.get("delta", {}).get("content") or ""
            r.finish_reason = choice.get("finish_reason") or r.finish_reason

    async def read_until_text(self) -> StreamResult:
        """Read frames until some reply text arrived (or the stream ended)."""
        r = self.result
        if self._resp is None or r.transport_error is not None:
            return r
        try:
            while not r.text and not r.done_frame:
                line = await anext(self._lines)
                if line.startswith("data: "):
                    self._frame(line[6:])
        except StopAsyncIteration:
            pass
        except httpx.HTTPError as exc:
            r.transport_error = repr(exc)
        return r

    async def finish(self) -> StreamResult:
        r = self.result
        if self._resp is not None and r.transport_error is None:
            try:
                async for line in self._lines:
                    if line.startswith("data: "):
                        self._frame(line[6:])
            except httpx.HTTPError as exc:
                r.transport_error = repr(exc)
        await self._close()
        if not r.ended:
            r.ended = time.monotonic()
        return r

    async def _close(self) -> None:
        if self._resp is not None:
            await self._resp.aclose()
            self._resp = None


async def stream_once(http: httpx.AsyncClient, base_url: str, content: str,
                      headers: dict[str, str] | None = None) -> StreamResult:
    run = SseRun(http, base_url, content, headers)
    await run.open()
    return await run.finish()


# --------------------------------------------------------------------------- event tap


@dataclass
class TapRecord:
    t: float  # time.monotonic() when received
    run_id: str
    type: str
    attempt: int
    seq: int
    worker_id: str | None = None


class EventTap:
    """Records every run event (``evt.>``) seen on the bus, thread-safely readable."""

    def __init__(self) -> None:
        self.records: list[TapRecord] = []
        self._lock = threading.Lock()
        self._nc: Client | None = None

    async def start(self, url: str) -> EventTap:
        self._nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        await self._nc.subscribe("evt.>", cb=self._on_msg, pending_msgs_limit=-1,
                                 pending_bytes_limit=-1)
        await self._nc.flush()
        return self

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()

    async def _on_msg(self, msg: Msg) -> None:
        event = decode_event(msg.data)
        rec = TapRecord(time.monotonic(), subjects.last_token(msg.subject), event.type,
                        event.attempt, event.seq,
                        # the worker that started it (a queued notice names a holder)
                        event.worker_id if isinstance(event, Accepted) else None)
        with self._lock:
            self.records.append(rec)

    def snapshot(self) -> list[TapRecord]:
        with self._lock:
            return list(self.records)

    def busy_workers(self) -> dict[str, int]:
        """worker id → how many runs it accepted and has not ended (as far as seen)."""
        owner: dict[tuple[str, int], str] = {}
        ended: set[tuple[str, int]] = set()
        for rec in self.snapshot():
            key = (rec.run_id, rec.attempt)
            if rec.type == "accepted" and rec.worker_id:
                owner[key] = rec.worker_id
            elif rec.type in ("done", "error"):
                ended.add(key)
        busy: dict[str, int] = {}
        for key, worker in owner.items():
            if key not in ended:
                busy[worker] = busy.get(worker, 0) + 1
        return busy

    def accepts(self, run_id: str) -> list[TapRecord]:
        return [r for r in self.snapshot() if r.run_id == run_id and r.type == "accepted"]


# --------------------------------------------------------------------------- transcripts


async def session_turns(nats_url: str, session_key: str) -> list[Turn]:
    nc = await nats.connect(nats_url)
    try:
        turns, _ = await Transcripts(nc.jetstream(timeout=10)).load(
            subjects.session_token(session_key))
    finally:
        await nc.close()
    return turns


async def lease_owner(nc: Client, session_key: str) -> str | None:
    """The worker id holding a session's lease right now (None: free or absent)."""
    js = nc.jetstream(timeout=5)
    try:
        msg = await js.get_msg(f"KV_{subjects.LEASES_BUCKET}", direct=False,
                               subject=f"$KV.{subjects.LEASES_BUCKET}."
                                       f"{subjects.session_token(session_key)}")
    except nats.js.errors.NotFoundError:
        return None
    if not msg.data or msg.data == b"free":
        return None
    return str(orjson.loads(msg.data)["worker"])


def tag() -> str:
    """A fresh marker for one test's requests and session keys."""
    return uuid.uuid4().hex[:10]


def expected_reply(content: str) -> str:
    """What the fake upstream answers to ``content``."""
    return f"echo: {content}"
