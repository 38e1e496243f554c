"""An OTLP/HTTP endpoint that takes trace exports and drops them, counting them:
what ``python -m bench.profile --trace-b`` exports the traced side's spans to, so
that the cost measured is clawbus's own (batching, encoding, sending), not a
collector's."""

from __future__ import annotations

import http.server
import threading
from typing import Any

from tests.fakes.otlp_receiver import LoopbackServer


class OtlpSink:
    """``with OtlpSink() as sink:`` — the base URL to export to is :attr:`endpoint`."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector serves it

            def do_POST(self) -> None:
                size = int(self.headers.get("content-length", "0"))
                self.rfile.read(size)
                with sink._lock:
                    sink.exports += 1
                    sink.bytes += size
                # An empty ExportTraceServiceResponse: zero bytes of protobuf.
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = LoopbackServer(Handler, "otlp-sink")
        self.endpoint = self._server.url

    def __enter__(self) -> OtlpSink:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()
