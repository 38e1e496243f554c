"""A fake OpenAI-compatible upstream: a real HTTP/1.1 server on a free loopback port.

It runs its own asyncio loop in a background thread, so sync and async tests can
both use it::

    with FakeOpenAI() as up:
        up.token_delay = 0.05
        ...  # point a client at up.base_url ("http://127.0.0.1:PORT/v1")
        up.wait_for(lambda reqs: reqs and reqs[-1].disconnected, timeout=1.0)

Routes: ``POST /v1/chat/completions`` (SSE when ``stream: true``, else JSON) and
``GET /v1/models``. Behaviour is set through plain attributes (read per request):

* ``token_delay`` - seconds between streamed tokens (one token per word);
* ``reply`` - request body -> reply text (default: ``"echo: " + last user message``);
* ``fail_status`` - answer chat completions with this status and an OpenAI error
  envelope (``Retry-After: 1`` on 429);
* ``garbage_after`` - after N content chunks send a non-JSON ``data:`` line and end;
* ``stall`` - send the response headers, then nothing until the client goes away;
* ``raw_sse`` - send these strings verbatim as the SSE body (for parser edge cases);
* ``api_key`` - when set, requests without ``Authorization: Bearer <api_key>`` get 401.

``max_tokens`` (or ``max_completion_tokens``) cuts the reply with finish reason
``length``; ``stop`` strings cut it with ``stop``. Usage counts whitespace words.

Every request is recorded (:attr:`FakeOpenAI.requests`); records change under a
condition variable, so :meth:`FakeOpenAI.wait_for` wakes on each change instead of
polling with sleeps. Client disconnects are noticed by watching the connection for
EOF while a response is in flight. HTTP keep-alive is supported (no pipelining).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
import time
import types
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import orjson

T = TypeVar("T")
ReplyFn = Callable[[dict[str, Any]], str]

_TOKENS = re.compile(r"\s*\S+\s*")


@dataclass
class RequestRecord:
    """One request as the fake saw it; the fake mutates it (under its lock) as it goes."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (None when empty or not JSON)
    started: float  # time.monotonic() when the request had been read
    connection: int  # which TCP connection carried it (1, 2, ...)
    status: int | None = None
    ended: float | None = None
    disconnected: bool = False  # the client went away before the response finished
    completed: bool = False  # the whole response was written
    error: str | None = None  # a bug in the fake while answering, if any


def default_reply(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return "echo: " + _text(message.get("content"))
    return "echo: "


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _words(text: str) -> int:
    return len(text.split())


class _Disconnected(Exception):
    pass


class FakeOpenAI:
    def __init__(self, *, token_delay: float = 0.0, reply: ReplyFn = default_reply,
                 fail_status: int | None = None, garbage_after: int | None = None,
                 stall: bool = False, raw_sse: Sequence[str] | None = None,
                 api_key: str | None = None, models: Sequence[str] = ("fake-model",)) -> None:
        self.token_delay = token_delay
        self.reply = reply
        self.fail_status = fail_status
        self.garbage_after = garbage_after
        self.stall = stall
        self.raw_sse = raw_sse
        self.api_key = api_key
        self.models = tuple(models)
        self.port = 0
        self._cond = threading.Condition()
        self._records: list[RequestRecord] = []
        self._conn_ids = itertools.count(1)
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._startup_error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fake-openai",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI upstream did not start")
        if self._startup_error is not None:
            self._thread.join()
            raise RuntimeError("fake OpenAI upstream failed to start") from self._startup_error

    def close(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        self._thread = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- records ---------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        with self._cond:
            return list(self._records)

    def wait_for(self, predicate: Callable[[list[RequestRecord]], T],
                 timeout: float = 5.0) -> T:
        """Block until ``predicate(records)`` is truthy (re-checked on every record change).

        Returns the predicate's value; raises ``TimeoutError`` after ``timeout`` seconds.
        From async tests call it via ``await asyncio.to_thread(up.wait_for, ...)`` so the
        test's own loop keeps running (e.g. to finish closing a socket).
        """
        with self._cond:
            result = self._cond.wait_for(lambda: predicate(self._records), timeout)
            if not result:
                raise TimeoutError(f"condition not met within {timeout}s; "
                                   f"requests: {self._records!r}")
            return result

    def _add(self, record: RequestRecord) -> None:
        with self._cond:
            self._records.append(record)
            self._cond.notify_all()

    def _set_status(self, record: RequestRecord, status: int) -> None:
        with self._cond:
            record.status = status
            self._cond.notify_all()

    def _end(self, record: RequestRecord, *, completed: bool, disconnected: bool,
             error: str | None = None) -> None:
        with self._cond:
            if record.ended is None:
                record.ended = time.monotonic()
                record.completed = completed
                record.disconnected = disconnected
                record.error = error
                self._cond.notify_all()

    # -- server ----------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:
            self._startup_error = exc
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            tasks = list(self._conn_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        conn_id = next(self._conn_ids)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers: dict[str, str] = {}
                for line in header_lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                raw = await reader.readexactly(length) if length else b""
                try:
                    body = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    body = None
                record = RequestRecord(method=method, path=target.split("?", 1)[0],
                                       headers=headers, body=body, started=time.monotonic(),
                                       connection=conn_id)
                self._add(record)
                keep_alive = await self._respond(record, reader, writer)
                if not keep_alive or headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, OSError):
            return
        finally:
            self._conn_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, record: RequestRecord, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request while watching for the client going away; True = keep-alive."""
        answer = asyncio.create_task(self._answer(record, writer))
        watch = asyncio.create_task(reader.read(1))
        try:
            await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                if watch.exception() is None and watch.result():
                    await asyncio.wait({answer})  # pipelined bytes: finish, then hang up
                else:
                    self._end(record, completed=False, disconnected=True)
                    return False
            exc = answer.exception()
            if exc is None:
                self._end(record, completed=True, disconnected=False)
                return not watch.done()
            if isinstance(exc, (OSError, _Disconnected)):
                self._end(record, completed=False, disconnected=True)
            else:
                self._end(record, completed=False, disconnected=False, error=repr(exc))
            return False
        finally:
            for task in (answer, watch):
                task.cancel()
            await asyncio.gather(answer, watch, return_exceptions=True)
            self._end(record, completed=False, disconnected=False)  # no-op unless shut down

    # -- responses -------------------------------------------------------------

    async def _answer(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        if self.api_key is not None and (
            record.headers.get("authorization") != f"Bearer {self.api_key}"
        ):
            await self._send_error(record, writer, 401)
        elif record.path == "/v1/models" and record.method == "GET":
            await self._send_json(record, writer, 200, {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                         for m in self.models],
            })
        elif record.path == "/v1/chat/completions" and record.method == "POST":
            await self._chat(record, writer)
        else:
            await self._send_error(record, writer, 404)

    async def _chat(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        body = record.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await self._send_error(record, writer, 400)
            return
        if self.fail_status is not None:
            await self._send_error(record, writer, self.fail_status)
            return
        if body.get("stream"):
            await self._stream(record, writer, body)
            return
        model, tokens, reason, usage = self._completion(body)
        if self.stall:
            await self._head(record, writer, 200, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
            await _forever()
        for _ in tokens[1:]:
            await asyncio.sleep(self.token_delay)
        await self._send_json(record, writer, 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                "logprobs": None,
                "finish_reason": reason,
            }],
            "usage": usage,
        })

    def _completion(self, body: dict[str, Any]
                    ) -> tuple[str, list[str], str, dict[str, int]]:
        """(model, reply tokens, finish reason, usage) for a chat completion request."""
        model = str(body.get("model") or self.models[0])
        text = self.reply(body)
        reason = "stop"
        stop = body.get("stop")
        for s in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
            if isinstance(s, str) and s and s in text:
                text = text[:text.index(s)]
        tokens = _TOKENS.findall(text)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and len(tokens) > limit:
            tokens, reason = tokens[:limit], "length"
        prompt_tokens = sum(_words(_text(m.get("content")))
                            for m in body["messages"] if isinstance(m, dict))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        return model, tokens, reason, usage

    async def _stream(self, record: RequestRecord, writer: asyncio.StreamWriter,
                      body: dict[str, Any]) -> None:
        model, tokens, reason, usage = self._completion(body)
        await self._head(record, writer, 200, {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "transfer-encoding": "chunked",
        })
        if self.stall:
            await _forever()
        if self.raw_sse is not None:
            for i, raw in enumerate(self.raw_sse):
                if i and self.token_delay:
                    await asyncio.sleep(self.token_delay)
                await _chunk(writer, raw.encode())
            await _chunk(writer, b"")
            return
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        base: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
        }

        async def event(delta: dict[str, Any], finish: str | None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]}
            if include_usage:
                chunk["usage"] = None
            await _chunk(writer, b"data: " + orjson.dumps(chunk) + b"\n\n")

        await event({"role": "assistant", "content": "", "refusal": None}, None)
        for i, token in enumerate(tokens):
            if i == self.garbage_after:
                break
            if i and self.token_delay:
                await asyncio.sleep(self.token_delay)
            await event({"content": token}, None)
        if self.garbage_after is not None and self.garbage_after <= len(tokens):
            await _chunk(writer, b"data: {this is not json\n\n")
            await _chunk(writer, b"")
            return
        await event({}, reason)
        if include_usage:
            await _chunk(writer, b"data: " + orjson.dumps({**base, "choices": [], "usage": usage})
                         + b"\n\n")
        await _chunk(writer, b"data: [DONE]\n\n")
        await _chunk(writer, b"")

    async def _head(self, record: RequestRecord, writer: asyncio.StreamWriter, status: int,
                    headers: dict[str, str]) -> None:
        self._set_status(record, status)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        lines = [f"HTTP/1.1 {status} {phrase}", "server: fake-openai",
                 *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()

    async def _send_json(self, record: RequestRecord, writer: asyncio.StreamWriter, status: int,
                         payload: Any, headers: dict[str, str] | None = None) -> None:
        data = orjson.dumps(payload)
        await self._head(record, writer, status, {"content-type": "application/json",
                                                  "content-length": str(len(data)),
                                                  **(headers or {})})
        writer.write(data)
        await writer.drain()

    async def _send_error(self, record: RequestRecord, writer: asyncio.StreamWriter,
                          status: int) -> None:
        kind, code, message = {
            400: ("invalid_request_error", None, "The request body is not valid."),
            401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
            403: ("invalid_request_error", "unsupported_country_region_territory",
                  "Access denied."),
            404: ("invalid_request_error", "unknown_url", f"Unknown request URL: {record.path}"),
            429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
        }.get(status, ("server_error", None, "The server had an error processing your request."))
        await self._send_json(
            record, writer, status,
            {"error": {"message": message, "type": kind, "param": None, "code": code}},
            {"retry-after": "1"} if status == 429 else None,
        )


async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write one HTTP/1.1 chunk (an empty one ends the body)."""
    if writer.is_closing():
        raise _Disconnected
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()
