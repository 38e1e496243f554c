"""The gateway ASGI application: ``create_app(settings, bus_url)``.

The lifespan owns the process's one NATS connection and its :class:`RunClient`;
both are closed in its ``finally``. Everything a handler needs hangs off one
typed :class:`Gateway` object.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from bus.connection import connect, ensure_bus
from bus.response_ids import ResponseIds
from clawbus import telemetry, tracing
from clawbus.config import Settings

from . import errors
from .auth import Authenticator
from .chat import ChatCompletions, error_response
from .embeddings import Embeddings
from .metrics import GatewayMetrics
from .models import model_ids
from .responses import Responses
from .runs import RunClient
from .sessions import Sessions
from .webui import mount_web_ui
from .ws import Connection

log = logging.getLogger("clawbus.gateway")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
READY_TIMEOUT = 2.0


CHAT_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"
EMBEDDINGS_PATH = "/v1/embeddings"
KNOWN_ENDPOINTS = frozenset({CHAT_PATH, RESPONSES_PATH, EMBEDDINGS_PATH, "/v1/models",
                             "/healthz", "/readyz", "/metrics", "/"})

# Probes and scrapes: no spans (they would drown the traces that matter).
UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (no per-id or per-probe cardinality)."""
    if path in KNOWN_ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/static/"):
        return "/static"
    return "other"


class SecuredSend:
    """``send`` that adds the SPEC's security headers to the response and counts it
    by endpoint/status (never buffering a streamed body); ``started`` says whether
    the response has begun."""

    __slots__ = ("_endpoint", "_metrics", "_send", "started")

    def __init__(self, send: Send, endpoint: str, metrics: GatewayMetrics) -> None:
        self._send = send
        self._endpoint = endpoint
        self._metrics = metrics
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            self._metrics.requests_by(self._endpoint, str(message["status"])).inc()
        await self._send(message)


class SecurityHeaders:
    """Pure ASGI middleware: :class:`SecuredSend` for every HTTP response."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive,
                       SecuredSend(send, endpoint_label(scope["path"]), self.metrics))


class GatewayApp(FastAPI):
    """FastAPI, except that ``/v1/chat/completions`` — the hot path — goes straight
    to its handler instead of through the framework's stack of middleware and
    routing (about ten nested ASGI layers and a send wrapper each). It
    keeps what those layers gave it: the security headers and request metrics
    (:class:`SecuredSend`) and a 500 envelope, never a traceback, on a bug."""

    def __init__(self, *, metrics: GatewayMetrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics
        self.chat_handler: Callable[[Request], Awaitable[Response]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if tracing.ENABLED and scope["type"] == "http" and scope["path"] not in UNTRACED:
            await tracing.spans().http_server(self._serve, scope, receive, send,
                                              endpoint_label(scope["path"]))
        else:
            await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and self.chat_handler:
            await self._chat(scope, receive, SecuredSend(send, CHAT_PATH, self.metrics))
            return
        await super().__call__(scope, receive, send)

    async def _chat(self, scope: Scope, receive: Receive, send: SecuredSend) -> None:
        assert self.chat_handler is not None
        try:
            response = await self.chat_handler(Request(scope, receive))
            await response(scope, receive, send)
        except Exception as exc:
            log.error("unhandled error on %s %s", scope["method"], CHAT_PATH, exc_info=exc)
            if send.started:
                raise  # the server closes the connection mid-response
            await error_response(errors.ApiError(500, "internal error", errors.API_ERROR))(
                scope, receive, send)


@dataclass
class Gateway:
    settings: Settings
    nc: Client
    js: JetStreamContext
    runs: RunClient
    auth: Authenticator
    chat: ChatCompletions
    responses: Responses
    sessions: Sessions
    metrics: GatewayMetrics

    @functools.cached_property
    def embeddings(self) -> Embeddings:
        return Embeddings(self.settings, self.auth, self.runs)

    async def workers_alive(self) -> int:
        """Workers that take runs (heard from lately, not draining)."""
        return self.runs.workers_alive()

    async def health(self) -> dict[str, object]:
        """Readiness: the bus is connected and at least one worker is alive."""
        connected = self.nc.is_connected
        workers = await self.workers_alive() if connected else 0
        ready = connected and workers > 0
        return {"ok": ready, "status": "ready" if ready else "not ready",
                "bus": "connected" if connected else "disconnected", "workers": workers,
                "gatewayId": self.runs.gateway_id, "pid": os.getpid(),
                "activeRuns": self.runs.active_runs}


def create_app(settings: Settings, bus_url: str, *, name: str = "clawbus-gateway") -> GatewayApp:
    """The gateway app; connects to NATS at ``bus_url`` when it starts."""
    holder: dict[str, Gateway] = {}
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await connect(bus_url, name)
        try:
            js = await ensure_bus(nc, settings.bus, settings.session)
            runs = RunClient(nc, js, settings.bus, metrics=metrics,
                             longest_run=settings.longest_agent_timeout())
            traces = telemetry.setup(settings, os.environ, "gateway", runs.gateway_id)
            await runs.start()
            metrics.active_runs.set_function(lambda: runs.active_runs)
            auth = Authenticator(settings)
            chat = ChatCompletions(settings, auth, runs, metrics)
            responses = Responses(chat, ResponseIds(js))
            holder["gw"] = Gateway(settings, nc, js, runs, auth, chat, responses,
                                   Sessions(js, nc), metrics)
            log.info("gateway %s connected to %s", runs.gateway_id, bus_url)
            try:
                yield
            finally:
                await runs.close()
                await chat.aclose()
                if traces is not None:
                    traces.shutdown()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    app = GatewayApp(metrics=metrics, title="clawbus", lifespan=lifespan, docs_url=None,
                     redoc_url=None, openapi_url=None)

    def gw() -> Gateway:
        return holder["gw"]

    async def chat_completions(request: Request) -> Response:
        return await gw().chat(request)

    # Served by GatewayApp ahead of the middleware stack; the route stays for
    # anything that dispatches through the router. The handler answers every
    # method itself (405 with the OpenAI envelope).
    app.chat_handler = chat_completions
    app.router.add_route("/v1/chat/completions", chat_completions,
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                         include_in_schema=False)

    async def responses(request: Request) -> Response:
        return await gw().responses(request)

    app.router.add_route(RESPONSES_PATH, responses,
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                         include_in_schema=False)

    async def embeddings(request: Request) -> Response:
        return await gw().embeddings(request)

    app.router.add_route(EMBEDDINGS_PATH, embeddings,
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                         include_in_schema=False)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"ok": True, "status": "live"})

    @app.get("/readyz")
    async def readyz() -> Response:
        body = await gw().health()
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        """Prometheus text format (unauthenticated, like /healthz: scrape it from
        inside your network; it holds counts, never prompts or secrets)."""
        g = gw()
        g.metrics.workers.set(await g.workers_alive())
        return Response(generate_latest(g.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openai_side_door(request: Request) -> Response | None:
        """/v1/models is served when chat completions or responses are, with their auth."""
        endpoints = settings.gateway.http.endpoints
        if not (endpoints.chat_completions.enabled or endpoints.responses.enabled):
            return PlainTextResponse("Not Found", status_code=404)
        try:
            client = request.client.host if request.client else None
            gw().auth.check(request.headers.get("authorization"), client)
        except errors.ApiError as exc:
            return error_response(exc)
        return None

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        refused = openai_side_door(request)
        if refused is not None:
            return refused
        return JSONResponse({"object": "list", "data": [_model(m) for m in model_ids(settings)]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        refused = openai_side_door(request)
        if refused is not None:
            return refused
        if model_id not in model_ids(settings):
            return error_response(errors.model_not_found(model_id))
        return JSONResponse(_model(model_id))

    if settings.control_ui_enabled:
        mount_web_ui(app)  # GET / (the web chat page) and /static/…

    @app.websocket("/")
    async def websocket(ws: WebSocket) -> None:
        g = gw()
        g.metrics.ws_connections.inc()
        try:
            await Connection(ws, settings, auth=g.auth, runs=g.runs, sessions=g.sessions,
                             images=g.chat.images, health=g.health,
                             trace_context=tracing.spans().extract_asgi(ws.scope)
                             if tracing.ENABLED else None).serve()
        finally:
            g.metrics.ws_connections.dec()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(errors.ApiError(500, "internal error", errors.API_ERROR))

    app.add_middleware(SecurityHeaders, metrics=metrics)
    return app


def _model(model_id: str) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "openclaw"}
