"""An in-process gateway + worker for hostile-input tests, driven synchronously.

:class:`InProcess` runs the real ASGI app (its lifespan connects to a real
``nats-server``) and a real :class:`workers.worker.Worker` with the offline
``echo`` provider, both on one event loop in a background thread, so that
Hypothesis (synchronous) can send thousands of requests quickly. Requests go
straight through the ASGI interface (no sockets, any header bytes at all), and
every log record at WARNING or above is kept, to assert that nothing logged a
traceback or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from nats.aio.client import Client

from bus.connection import connect
from clawbus.config import parse_settings
from gateway.app import create_app
from tests.schemas import validate
from workers.worker import Worker

T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]


class RecordKeeper(logging.Handler):
    """Keeps every record at WARNING or above, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    def problems(self) -> list[str]:
        """Records that are errors or carry a traceback."""
        with self._lock2:
            return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records
                    if r.levelno >= logging.ERROR or r.exc_info is not None]


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class WsResult:
    frames: list[dict[str, Any]] = field(default_factory=list)  # JSON text frames sent to us
    close_code: int | None = None
    accepted: bool = False


class InProcess:
    """The gateway app and one worker on a private event loop (see module docstring)."""

    def __init__(self, config: dict[str, Any], bus_url: str, *,
                 client: tuple[str, int] = ("203.0.113.7", 40000), worker: bool = True) -> None:
        self.settings = parse_settings(config, env={})
        self.bus_url = bus_url
        self.client = client
        self.with_worker = worker
        self.app = create_app(self.settings, bus_url)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process",
                                       daemon=True)
        self.logs = RecordKeeper()
        self.requests = 0
        self._lifespan: Any = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self.nc: Client | None = None

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> InProcess:
        logging.getLogger().addHandler(self.logs)
        self.thread.start()
        try:
            self.call(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.call(self._stop(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        logging.getLogger().removeHandler(self.logs)

    async def _start(self) -> None:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.nc = await connect(self.bus_url, "hostile-tests")
        if self.with_worker:
            self._worker = Worker(self.settings, self.nc, env={}, grace_seconds=2)
            self._worker_task = asyncio.create_task(self._worker.run())
            await asyncio.wait_for(self._worker.ready.wait(), 20)

    async def _stop(self) -> None:
        if self._worker is not None and self._worker_task is not None:
            self._worker.stop()
            await asyncio.wait_for(self._worker_task, 20)
        if self.nc is not None:
            await self.nc.close()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- HTTP ------------------------------------------------------------------

    def http(self, method: str, path: str, headers: Headers, body: bytes = b"",
             client: tuple[str, int] | None = None) -> HttpResult:
        self.requests += 1
        return self.call(self._http(method, path, headers, body, client or self.client))

    async def _http(self, method: str, path: str, headers: Headers, body: bytes,
                    client: tuple[str, int]) -> HttpResult:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": client, "server": ("gw", 80)}
        done = asyncio.Event()
        sent_body = False
        status = 0
        out_headers: dict[str, str] = {}
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for k, v in message.get("headers", []):
                    out_headers[k.decode("latin-1").lower()] = v.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    done.set()

        try:
            await asyncio.wait_for(self.app(scope, receive, send), 60)
        finally:
            done.set()
        return HttpResult(status, out_headers, b"".join(chunks))

    # -- WebSocket -------------------------------------------------------------

    def websocket(self, frames: Sequence[str | bytes], headers: Headers | None = None,
                  client: tuple[str, int] | None = None, settle: float = 10.0) -> WsResult:
        """Open a socket, send ``frames``, read until every request was answered (or
        the server closed), then disconnect; raises if the app crashed."""
        self.requests += len(frames)
        return self.call(self._websocket(frames, headers or [], client or self.client, settle),
                         timeout=settle + 30)

    async def _websocket(self, frames: Sequence[str | bytes], headers: Headers,
                         client: tuple[str, int], settle: float) -> WsResult:
        scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "scheme": "ws", "path": "/", "raw_path": b"/", "query_string": b"",
                 "root_path": "", "headers": headers, "client": client,
                 "server": ("gw", 80), "subprotocols": []}
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await inbox.put({"type": "websocket.connect"})
        async def send_ws(message: MutableMapping[str, Any]) -> None:
            await outbox.put(dict(message))

        app = asyncio.create_task(self.app(scope, inbox.get, send_ws))
        result = WsResult()

        async def next_message(wait: float) -> dict[str, Any] | None:
            getter = asyncio.ensure_future(outbox.get())
            done, _ = await asyncio.wait({getter, app}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            getter.cancel()
            return None

        def take(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.accept":
                result.accepted = True
            elif message["type"] == "websocket.send":
                assert "text" in message and message.get("text") is not None, message
                result.frames.append(orjson.loads(message["text"]))
            elif message["type"] == "websocket.close":
                result.close_code = message.get("code", 1000)

        try:
            for frame in frames:
                key = "bytes" if isinstance(frame, bytes) else "text"
                await inbox.put({"type": "websocket.receive", key: frame})
            deadline = self.loop.time() + settle
            while result.close_code is None and self.loop.time() < deadline:
                if _answered(result, frames):
                    break
                message = await next_message(deadline - self.loop.time())
                if message is None:
                    break
                take(message)
            # Whatever else is queued right now.
            while not outbox.empty():
                take(outbox.get_nowait())
        finally:
            # (What the app sends after the client left is not the client's to see.)
            await inbox.put({"type": "websocket.disconnect", "code": 1000})
            await asyncio.wait_for(app, 20)  # re-raises if the app crashed
        return result


def _answered(result: WsResult, frames: Sequence[str | bytes]) -> bool:
    """Every frame after the handshake answered, and every accepted run finished."""
    res = [f for f in result.frames if f.get("type") == "res"]
    if not res:
        return False
    accepted = sum(1 for f in res if f.get("ok") and isinstance(f.get("payload"), dict)
                   and f["payload"].get("status") == "accepted")
    return len(res) >= len(frames) + accepted


# --------------------------------------------------------------------------- checks


def check_http(resp: HttpResult) -> str:
    """Assert a response is a documented one; return its kind (for statistics)."""
    assert resp.status < 500, (resp.status, resp.body[:500])
    assert resp.headers.get("x-content-type-options") == "nosniff", resp.headers
    assert resp.headers.get("referrer-policy") == "no-referrer", resp.headers
    if resp.status == 200:
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            frames = [line[6:] for line in resp.body.decode().split("\n")
                      if line.startswith("data: ")]
            assert frames and frames[-1] == "[DONE]", resp.body[-300:]
            for data in frames[:-1]:
                chunk = orjson.loads(data)
                assert "error" not in chunk, chunk  # an error frame is a 5xx in disguise
                validate("chat_completion_chunk", chunk)
            return "200 stream"
        validate("chat_completion", resp.json())
        return "200 json"
    body = resp.json()
    validate("error_response", body)
    kinds = {400: "invalid_request_error", 401: "unauthorized", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limited"}
    assert resp.status in kinds, (resp.status, body)
    assert body["error"]["type"] == kinds[resp.status], body
    if resp.status == 429:
        assert int(resp.headers["retry-after"]) >= 1
    return str(resp.status)
