"""What tracing does once it is on (SPEC §13): spans, W3C trace-context
propagation, and the ids for log lines.

Only :func:`clawbus.telemetry.setup` imports this module (OpenTelemetry comes
with it); everything else reaches it through :func:`clawbus.tracing.spans`
after checking :data:`clawbus.tracing.ENABLED`.

The run attributes (``clawbus.run_id``, ``clawbus.attempt``, …) of the run being
handled ride in a context variable (:meth:`Spans.run_attributes`): every span
started under it carries them, so that a worker's spans still tell which run
and attempt they belong to when the attempt's own span never ends (its worker
was killed).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

__all__ = ["Context", "Kind", "Span", "Spans"]

Attributes = Mapping[str, AttributeValue]
Kind = Literal["internal", "server", "client", "producer", "consumer"]
_KINDS: dict[str, SpanKind] = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER,
                               "client": SpanKind.CLIENT, "producer": SpanKind.PRODUCER,
                               "consumer": SpanKind.CONSUMER}
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
_TRACE_HEADERS = (b"traceparent", b"tracestate")
_NONE: Attributes = MappingProxyType({})
_RUN: contextvars.ContextVar[Attributes] = contextvars.ContextVar("clawbus_run_attrs",
                                                                  default=_NONE)


class Spans:
    """The process's tracer and how clawbus uses it; ``capture_content``: prompt
    and reply text may go into spans (``telemetry.captureContent``)."""

    def __init__(self, tracer: Tracer, *, capture_content: bool = False) -> None:
        self.tracer = tracer
        self.capture_content = capture_content
        self._propagator = TraceContextTextMapPropagator()

    # -- spans ---------------------------------------------------------------

    def start(self, name: str, *, kind: Kind = "internal", context: Context | None = None,
              attributes: Attributes | None = None) -> Span:
        """A span (child of ``context``, else of the current span) with the run's
        attributes and ``attributes``; the caller ends it."""
        run = _RUN.get()
        attrs = {**run, **attributes} if attributes else run
        return self.tracer.start_span(name, context=context, kind=_KINDS[kind],
                                      attributes=attrs)

    @contextlib.contextmanager
    def active(self, name: str, *, kind: Kind = "internal",
               context: Context | None = None,
               attributes: Attributes | None = None) -> Iterator[Span]:
        """A span current for the block, ended after it; an exception escaping
        the block is recorded on it (status ERROR and an exception event)."""
        span = self.start(name, kind=kind, context=context, attributes=attributes)
        with trace.use_span(span, end_on_exit=True):
            yield span

    @contextlib.contextmanager
    def run_attributes(self, attributes: Attributes) -> Iterator[None]:
        """Every span started in the block carries ``attributes`` too."""
        token = _RUN.set({**_RUN.get(), **attributes})
        try:
            yield
        finally:
            _RUN.reset(token)

    @staticmethod
    def current() -> Span:
        return trace.get_current_span()

    @staticmethod
    def failed(span: Span, exc: BaseException | None = None, description: str = "") -> None:
        """Mark ``span`` as failed (status ERROR), recording ``exc`` as an event."""
        if exc is not None:
            span.record_exception(exc)
            description = description or f"{type(exc).__name__}: {exc}"
        span.set_status(Status(StatusCode.ERROR, description or None))

    @staticmethod
    def attach(span: Span) -> object:
        """Make ``span`` current until :meth:`detach` with the returned token."""
        return otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def detach(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    async def http_server(self, app: ASGIApp, scope: Mapping[str, Any], receive: Any,
                          send: Callable[[Any], Awaitable[None]], route: str) -> None:
        """``app`` serving one HTTP request inside its SERVER span, from the request
        to the response's last byte (a streamed one too), continuing the client's
        trace when it sent one."""
        method = scope["method"]
        span = self.start(f"{method} {route}", kind="server", context=self.extract_asgi(scope),
                          attributes={"http.request.method": method, "http.route": route,
                                      "url.path": scope["path"],
                                      "url.scheme": scope.get("scheme", "http")})

        async def traced_send(message: Mapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    self.failed(span, description=f"HTTP {status}")
            await send(message)

        with trace.use_span(span, end_on_exit=True):
            await app(scope, receive, traced_send)

    # -- propagation (W3C trace context) ---------------------------------------

    def extract(self, carrier: Mapping[str, str] | None) -> Context:
        """The context a ``traceparent``/``tracestate`` carrier continues (an empty
        one, starting a new trace, when it has none)."""
        return self._propagator.extract(carrier or {})

    def extract_asgi(self, scope: Mapping[str, Any]) -> Context:
        """The context of an HTTP or WebSocket request's trace headers."""
        carrier = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope.get("headers", ()) if name in _TRACE_HEADERS}
        return self.extract(carrier)

    def inject(self, carrier: dict[str, str]) -> None:
        """Add the current span's ``traceparent`` (and ``tracestate``) to ``carrier``."""
        self._propagator.inject(carrier)

    def header_lines(self) -> bytes:
        """The current span's trace headers as HTTP/1.1 header lines (empty
        without a current span)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return b"".join(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
                        for name, value in carrier.items())

    # -- logs --------------------------------------------------------------------

    @staticmethod
    def log_ids() -> tuple[str, str] | None:
        """(trace id, span id) in hex of the current span, if there is one."""
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
