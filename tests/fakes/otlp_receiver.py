"""A small OTLP/HTTP trace receiver for tests: ``POST /v1/traces`` with protobuf
bodies (what ``opentelemetry-exporter-otlp-proto-http`` sends), decoded with
``opentelemetry-proto`` into :class:`Span` records, on a free loopback port.

It serves from a thread of its own (``http.server``), so it receives from child
processes and from the test's own process alike. Spans are kept under a
condition variable: :meth:`OtlpReceiver.wait_for` blocks until a predicate over
everything received holds, or a deadline passes (no sleeps).
"""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanPb
from opentelemetry.proto.trace.v1.trace_pb2 import Status

KINDS = {SpanPb.SPAN_KIND_INTERNAL: "internal", SpanPb.SPAN_KIND_SERVER: "server",
         SpanPb.SPAN_KIND_CLIENT: "client", SpanPb.SPAN_KIND_PRODUCER: "producer",
         SpanPb.SPAN_KIND_CONSUMER: "consumer"}


@dataclass(frozen=True)
class Event:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    """One received span: ids in lower-case hex (``parent_id`` "" for a root)."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: tuple[Event, ...] = field(default=())
    error: bool = False
    status_message: str = ""

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    def text(self) -> str:
        """Everything the span says, as one string (for 'no prompt text anywhere')."""
        parts = [self.name, self.status_message, *map(str, self.attributes.values())]
        for event in self.events:
            parts += [event.name, *map(str, event.attributes.values())]
        return "\n".join(parts)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def decode(body: bytes) -> list[Span]:
    """The spans of one ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(Span(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_id=span.parent_span_id.hex(), name=span.name,
                    kind=KINDS.get(span.kind, "unspecified"),
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes), resource=resource,
                    events=tuple(Event(e.name, e.time_unix_nano, _attributes(e.attributes))
                                 for e in span.events),
                    error=span.status.code == Status.STATUS_CODE_ERROR,
                    status_message=span.status.message))
    return out


class LoopbackServer:
    """An ``http.server`` on a free loopback port (bound at once), serving from a
    thread of its own between :meth:`start` and :meth:`close`."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], name: str) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=name,
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class OtlpReceiver:
    """``with OtlpReceiver() as receiver:`` — export to :attr:`endpoint` (the base
    URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it)."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._changed = threading.Condition()
        self.requests = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                try:
                    spans = decode(body)
                except Exception:
                    self.send_error(400)
                    return
                receiver._add(spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self._server = LoopbackServer(Handler, "otlp-receiver")
        self.endpoint = self._server.url

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()

    def _add(self, spans: list[Span]) -> None:
        with self._changed:
            self.requests += 1
            self._spans.extend(spans)
            self._changed.notify_all()

    @property
    def spans(self) -> list[Span]:
        with self._changed:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate: Callable[[list[Span]], bool], timeout: float = 20.0,
                 ) -> list[Span]:
        """All spans received, once ``predicate`` holds for them; TimeoutError
        (listing what did arrive) if it does not within ``timeout`` seconds."""
        with self._changed:
            if self._changed.wait_for(lambda: predicate(self._spans), timeout):
                return list(self._spans)
            got = "\n  ".join(f"{s.kind} {s.name} {s.attributes}" for s in self._spans)
        raise TimeoutError(f"the spans wanted did not arrive within {timeout} s; got:\n  {got}")


def named(spans: list[Span], name: str) -> Iterator[Span]:
    return (s for s in spans if s.name == name)
