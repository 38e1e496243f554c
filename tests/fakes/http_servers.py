"""Two independent real HTTP/1.1 servers, aiohttp.web and uvicorn (h11), serving
the same scripted LLM replies on a free loopback port, plain or TLS, on the test's
own event loop: what tests/test_http_conformance.py runs the providers' client
against.

A reply is chosen by the request's ``model`` (see :func:`answer`); each server
counts the connections it accepted and closed (:class:`ConnectionLog`) and can
close its idle keep-alive connections through its own graceful path
(:meth:`HTTPServer.close_idle`)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from aiohttp import web
from uvicorn.protocols.http.h11_impl import H11Protocol

SERVERS = ("aiohttp", "uvicorn-h11")
TEXT = ["Hel", "lo", " wor", "ld"]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    chunks: list[bytes]
    chunked: bool  # Transfer-Encoding: chunked (each chunk written apart), else Content-Length


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any


def _sse(events: list[tuple[str | None, Any]]) -> list[bytes]:
    out = []
    for name, data in events:
        payload = data if isinstance(data, bytes) else orjson.dumps(data)
        out.append((b"event: %s\n" % name.encode() if name else b"") + b"data: " + payload
                   + b"\n\n")
    return out


def _openai_sse() -> list[bytes]:
    events: list[tuple[str | None, Any]] = [
        (None, {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        for piece in TEXT]
    events.append((None, {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append((None, {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}))
    events.append((None, b"[DONE]"))
    return _sse(events)


def _anthropic_sse() -> list[bytes]:
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start",
                           "message": {"usage": {"input_tokens": 7, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": piece}})
               for piece in TEXT]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                           "usage": {"output_tokens": 4}}),
        ("message_stop", {"type": "message_stop"})]
    return _sse(events)


def answer(path: str, body: Any) -> Reply:
    """The reply to a request: by path (OpenAI's or Anthropic's) and the ``model`` of
    its JSON body: ``…-chunked`` streams each SSE event as its own chunk, ``…-length``
    sends them all with a Content-Length, ``rate-limited`` is a 429 JSON error."""
    model = body.get("model", "") if isinstance(body, dict) else ""
    sse = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
    if model == "rate-limited":
        error = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit_error"}})
        return Reply(429, {"content-type": "application/json", "retry-after": "7"},
                     [error], chunked=False)
    if path.endswith("/chat/completions"):
        return Reply(200, sse, _openai_sse(), chunked=model.endswith("-chunked"))
    if path.endswith("/messages"):
        return Reply(200, sse, _anthropic_sse(), chunked=model.endswith("-chunked"))
    return Reply(404, {"content-type": "text/plain"}, [b"no such path"], chunked=False)


class ConnectionLog:
    """Connections a server accepted and closed; :meth:`wait_closed` to see them go."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def made(self) -> None:
        self.opened += 1

    def lost(self) -> None:
        self.closed += 1
        for count, waiter in self._waiters:
            if self.closed >= count and not waiter.done():
                waiter.set_result(None)

    async def wait_closed(self, count: int) -> None:
        """Until ``count`` connections have closed."""
        if self.closed < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((count, waiter))
            await waiter


class HTTPServer:
    """One server on a free loopback port: ``async with make_server(kind, tls) as s``."""

    kind = ""

    def __init__(self, tls: ssl.SSLContext | None, cert_files: tuple[Path, Path] | None) -> None:
        self.tls = tls
        # (certificate chain, key) of ``tls``, for servers that load them from files
        self.cert_files = cert_files
        self.connections = ConnectionLog()
        self.seen: list[Seen] = []
        self.port = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> HTTPServer:
        try:
            await self.start(self._sock)
        except BaseException:
            self._sock.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._sock.close()

    async def start(self, sock: socket.socket) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def close_idle(self) -> None:
        """Close the idle keep-alive connections, as the server does on its own."""
        raise NotImplementedError

    def record(self, method: str, path: str, headers: MutableMapping[str, str],
               raw: bytes) -> Reply:
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.seen.append(Seen(method, path, {k.lower(): v for k, v in headers.items()}, body))
        return answer(path, body)


class AiohttpServer(HTTPServer):
    kind = "aiohttp"

    async def start(self, sock: socket.socket) -> None:
        log = self.connections

        class Server(web.Server):
            def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
                super().connection_made(handler, transport)
                log.made()

            def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
                super().connection_lost(handler, exc)
                log.lost()

        self._server = Server(self._handle, keepalive_timeout=3600)
        self._runner = web.ServerRunner(self._server, shutdown_timeout=5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.tls).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    def close_idle(self) -> None:
        for handler in self._server.connections:
            handler.force_close()  # what its keep-alive timeout does to an idle one

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        reply = self.record(request.method, request.path, dict(request.headers),
                            await request.read())
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        if reply.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = sum(map(len, reply.chunks))
        await response.prepare(request)
        for chunk in reply.chunks:
            await response.write(chunk)
        await response.write_eof()
        return response


ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class UvicornServer(HTTPServer):
    kind = "uvicorn-h11"

    async def start(self, sock: socket.socket) -> None:
        log = self.connections

        class Protocol(H11Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)  # type: ignore[arg-type]
                log.made()

            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                log.lost()

        certfile, keyfile = self.cert_files if self.tls and self.cert_files else (None, None)
        config = uvicorn.Config(self._app, interface="asgi3", http=Protocol, ws="none",
                                lifespan="off",
                                log_config=None, log_level="warning", access_log=False,
                                timeout_keep_alive=3600, ssl_certfile=certfile,
                                ssl_keyfile=keyfile)
        started = asyncio.Event()

        class Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                started.set()

        self._server = Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        done, _ = await asyncio.wait({self._task, asyncio.ensure_future(started.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            self._task.result()
            raise RuntimeError("uvicorn exited at start-up")

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task

    def close_idle(self) -> None:
        for protocol in list(self._server.server_state.connections):
            protocol.shutdown()  # closes an idle connection at once

    async def _app(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        reply = self.record(scope["method"], scope["path"], headers, raw)
        fields = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        if not reply.chunked:  # without it h11 frames the body with chunks
            fields.append((b"content-length", str(sum(map(len, reply.chunks))).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": fields})
        for chunk in reply.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def make_server(kind: str, tls: ssl.SSLContext | None,
                cert_files: tuple[Path, Path] | None) -> HTTPServer:
    servers: dict[str, type[HTTPServer]] = {"aiohttp": AiohttpServer,
                                            "uvicorn-h11": UvicornServer}
    return servers[kind](tls, cert_files)
