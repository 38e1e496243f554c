"""Plumbing shared by the fake LLM upstreams: a real HTTP/1.1 server on a free
loopback port, run on its own asyncio loop in a background thread so that sync and
async tests can both use it.

:class:`FakeUpstream` owns the lifecycle (``with Fake() as up``), the request
records and the connection handling; a subclass implements :meth:`FakeUpstream._answer`
with the helpers :meth:`~FakeUpstream._head`, :meth:`~FakeUpstream._send_json`,
:func:`send_chunk` and :func:`forever`.

What a fake answers comes from its ``reply`` callable (:data:`ReplyFn`): the request
body to a text, or to a :class:`FakeReply` (text, then tool calls).

Every request is recorded (:attr:`FakeUpstream.requests`); records change under a
condition variable, so :meth:`FakeUpstream.wait_for` wakes on each change instead of
polling with sleeps. Client disconnects are noticed by watching the connection for
EOF while a response is in flight. HTTP keep-alive is supported (no pipelining).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar, Self, TypeVar

import orjson

T = TypeVar("T")


@dataclass(frozen=True)
class FakeReply:
    """A fake upstream's reply: ``text``, then the ``tool_calls`` as
    ``(name, arguments JSON text)`` pairs (the fake makes up their ids)."""

    text: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)


ReplyFn = Callable[[dict[str, Any]], "str | FakeReply"]


def as_reply(reply: str | FakeReply) -> FakeReply:
    return FakeReply(reply) if isinstance(reply, str) else reply


def default_reply(body: dict[str, Any]) -> str:
    """``"echo: "`` and the text of the last user message."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return "echo: " + text_of(message.get("content"))
    return "echo: "


def fragments(text: str, count: int = 3) -> list[str]:
    """``text`` cut into ``count`` pieces (fewer when it is shorter), as models
    stream a call's arguments."""
    size = max(1, -(-len(text) // count))
    return [text[i:i + size] for i in range(0, len(text), size)]


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


class Disconnected(Exception):
    """Raised by :func:`send_chunk` when the client has already gone away."""


class FakeUpstream:
    """A recording HTTP server; subclasses answer requests in :meth:`_answer`."""

    name: ClassVar[str] = "fake-upstream"  # thread name and ``server`` header

    def __init__(self) -> None:
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.name,
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.name} upstream did not start")
        if self._startup_error is not None:
            self._thread.join()
            raise RuntimeError(f"{self.name} upstream failed to start") from self._startup_error

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
            if isinstance(exc, (OSError, Disconnected)):
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
        """Write the whole response to one request (subclasses implement this)."""
        raise NotImplementedError

    async def _head(self, record: RequestRecord, writer: asyncio.StreamWriter, status: int,
                    headers: dict[str, str]) -> None:
        self._set_status(record, status)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        lines = [f"HTTP/1.1 {status} {phrase}", f"server: {self.name}",
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

    @staticmethod
    async def _replay_sse(writer: asyncio.StreamWriter, raw_sse: Sequence[str],
                          delay: float) -> None:
        """Send ``raw_sse`` verbatim as the SSE body (``delay`` between pieces), then end it."""
        for i, raw in enumerate(raw_sse):
            if i and delay:
                await asyncio.sleep(delay)
            await send_chunk(writer, raw.encode())
        await send_chunk(writer, b"")

    async def _start_sse(self, record: RequestRecord, writer: asyncio.StreamWriter) -> None:
        """Send a 200 ``text/event-stream`` head; then :func:`send_chunk` the body."""
        await self._head(record, writer, 200, {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "transfer-encoding": "chunked",
        })


def text_of(content: Any) -> str:
    """The text of a message ``content``: a string, or a list of ``{"text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def words(text: str) -> int:
    return len(text.split())


async def send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write one HTTP/1.1 chunk (an empty one ends the body)."""
    if writer.is_closing():
        raise Disconnected
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def forever() -> None:
    await asyncio.get_running_loop().create_future()
