"""The gateway ASGI application: ``create_app(settings, bus_url)``.

The lifespan owns the process's one NATS connection and its :class:`RunClient`;
both are closed in its ``finally``. Everything a handler needs hangs off one
typed :class:`Gateway` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from nats.aio.client import Client
from nats.js import JetStreamContext
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bus import subjects
from bus.config import Settings
from bus.connection import connect, ensure_bus

from . import errors
from .auth import Authenticator
from .chat import ChatCompletions, error_response
from .runs import RunClient

log = logging.getLogger("clawbus.gateway")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
READY_TIMEOUT = 2.0


class SecurityHeaders:
    """Pure ASGI middleware (it must not buffer streamed bodies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class Gateway:
    settings: Settings
    nc: Client
    js: JetStreamContext
    runs: RunClient
    auth: Authenticator
    chat: ChatCompletions

    async def workers_alive(self) -> int:
        try:
            kv = await self.js.key_value(subjects.WORKERS_BUCKET)
            async with asyncio.timeout(READY_TIMEOUT):
                keys = await kv.keys()
        except Exception:
            return 0
        return len(keys)


def create_app(settings: Settings, bus_url: str, *, name: str = "clawbus-gateway") -> FastAPI:
    """The gateway app; connects to NATS at ``bus_url`` when it starts."""
    holder: dict[str, Gateway] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await connect(bus_url, name)
        try:
            js = await ensure_bus(nc, settings.bus, settings.session)
            runs = RunClient(nc, js, settings.bus)
            await runs.start()
            auth = Authenticator(settings)
            chat = ChatCompletions(settings, auth, runs)
            holder["gw"] = Gateway(settings, nc, js, runs, auth, chat)
            log.info("gateway %s connected to %s", runs.gateway_id, bus_url)
            try:
                yield
            finally:
                await runs.close()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    app = FastAPI(title="clawbus", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def gw() -> Gateway:
        return holder["gw"]

    @app.api_route("/v1/chat/completions",
                   methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                   include_in_schema=False)
    async def chat_completions(request: Request) -> Response:
        return await gw().chat(request)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"ok": True, "status": "live"})

    @app.get("/readyz")
    async def readyz() -> Response:
        g = gw()
        connected = g.nc.is_connected
        workers = await g.workers_alive() if connected else 0
        ready = connected and workers > 0
        body = {"ok": ready, "status": "ready" if ready else "not ready",
                "bus": "connected" if connected else "disconnected", "workers": workers}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(errors.ApiError(500, "internal error", errors.API_ERROR))

    app.add_middleware(SecurityHeaders)
    return app
