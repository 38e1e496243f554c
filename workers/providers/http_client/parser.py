"""httptools' callbacks for the response in flight on a connection: its head, its
decoded body chunks until the reader takes them, and how it ended."""

from __future__ import annotations

import zlib

import httptools

from .errors import HTTPError, ResponseError, cause

# Longest response head (header names and values).
MAX_HEAD = 64 * 1024


class ResponseParser:
    """One response at a time (:meth:`begin` for each); a failure is kept in
    :attr:`error` for the connection to act on (close) and the reader to raise."""

    __slots__ = ("_decoder", "_head_size", "_parser", "_until_close", "buffered", "chunks",
                 "complete", "error", "expecting", "got_bytes", "headers", "headers_done",
                 "keep_alive", "reason", "status")

    def __init__(self) -> None:
        self._parser: httptools.HttpResponseParser | None = None
        self.expecting = False  # between begin() and end()
        self._decoder: zlib._Decompress | None = None
        self._until_close = False  # no framing: the body ends when the connection does
        self._head_size = 0
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}  # lower-case names; repeated fields joined
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: HTTPError | None = None
        self.chunks: list[bytes] = []  # decoded body bytes the reader has not taken
        self.buffered = 0  # their length

    def begin(self) -> None:
        """Expect a new response."""
        self._parser = httptools.HttpResponseParser(self)
        self.expecting = True
        self.status, self.reason, self.headers = 0, "", {}
        self.headers_done = self.complete = self.keep_alive = self.got_bytes = False
        self._until_close = False
        self._head_size = 0
        self.error = self._decoder = None
        self.chunks = []
        self.buffered = 0

    def end(self) -> None:
        """The exchange is over: the httptools parser (which refers back to this
        object) goes."""
        self._parser = None
        self.expecting = False

    def feed(self, data: bytes) -> None:
        assert self._parser is not None
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(ResponseError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(ResponseError(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed: the end of a body framed by the close, else an error."""
        if not self.expecting or self.complete or self.error is not None:
            return
        if self.headers_done and self._until_close:
            self._finish()
        elif self.headers_done:
            self.fail(ResponseError(f"connection closed mid-response{cause(exc)}"))
        else:
            self.fail(ResponseError(f"connection closed before the response{cause(exc)}"))

    def fail(self, error: HTTPError) -> None:
        """Record ``error`` unless the response already ended or failed."""
        if self.error is None and not self.complete:
            self.error = error

    # -- httptools callbacks -----------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            self.fail(ResponseError(f"response head over {MAX_HEAD} bytes"))
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an informational head; the real one follows
            self.headers = {}
            self.reason = ""
            return
        self.status = status
        self.headers_done = True
        headers = self.headers
        self._until_close = (
            status not in (204, 304) and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower())
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("identity", ""):
            self.fail(ResponseError(f"unsupported content-encoding {encoding!r}"))

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self.fail(ResponseError(f"undecodable compressed body: {exc}"))
                return
        if body:
            self.chunks.append(body)
            self.buffered += len(body)

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of an informational message
            return
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()
        self._finish()

    def _finish(self) -> None:
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error as exc:
                self.fail(ResponseError(f"undecodable compressed body: {exc}"))
                return
            if rest:
                self.chunks.append(rest)
        self.complete = True
