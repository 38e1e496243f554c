"""A lean HTTP/1.1 client for the providers' upstream calls: keep-alive pooling,
TLS, HTTP(S) proxies (``CONNECT`` for https), an idle read timeout and flow control,
over a plain :class:`asyncio.Protocol` and httptools' C parser (llhttp, already
installed with ``uvicorn[standard]``).

Why not aiohttp (what the providers used before, issue #5): a streamed 32-token
reply cost a worker ~190 µs of CPU in aiohttp against ~50 µs here
(``python -m bench.http_client`` measures both in one run). The difference is
aiohttp's per-request machinery (request/response objects, tracing hooks, cookie
jar, timer contexts) and its per-read path (a ``StreamReader`` wake-up plus a
rescheduled timeout handle for every network read). Here a read is one parser
call and, at most, one future; the read timeout is one timer per request that is
re-armed only when it fires.

What it does not do (no provider needs it): redirects, cookies, request bodies
other than bytes, HTTP/2, ``Expect: 100-continue``.

A pooled connection that the server closed while idle is noticed by the event
loop (the connection is always read) and dropped. A request sent on a reused
connection that closes before a single response byte arrives is sent once more on
a new connection; any other failure is raised as an :class:`HTTPError`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
import time
import urllib.parse
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import httptools

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "HTTPClient",
    "HTTPError",
    "ReadTimeout",
    "Response",
    "ResponseError",
]

# A reader that falls behind makes the connection stop reading above this many
# buffered body bytes, and start again once it has caught up.
HIGH_WATER = 1 << 20
# Longest body read(), e.g. an upstream error page.
MAX_READ = 1 << 20
# Longest response head (header names and values) and proxy CONNECT reply head.
MAX_HEAD = 64 * 1024
MAX_TUNNEL_HEAD = MAX_HEAD


class HTTPError(Exception):
    """A failure below HTTP status codes: no connection, a timeout, a broken or
    malformed response."""


class ConnectError(HTTPError):
    """No connection to the upstream (or its proxy) could be made."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Connecting (TCP, proxy tunnel and TLS) took longer than the connect timeout."""


class ReadTimeout(HTTPError, TimeoutError):
    """The upstream sent nothing for longer than the read timeout."""


class ResponseError(HTTPError):
    """The connection broke before the response ended, or the response is not HTTP."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Everything about one URL that does not change between requests."""

    key: tuple[str, str, int]  # the pool: scheme, host, port
    host: str  # for TLS (SNI and the certificate check)
    tls: bool
    head: bytes  # the request head up to the content-length value
    connect_host: str  # the proxy's, when there is one
    connect_port: int
    tunnel: bytes | None  # the CONNECT request, for https through a proxy


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the state of the exchange in flight on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float,
                 key: tuple[str, str, int]) -> None:
        self._loop = loop
        self.key = key  # the pool it belongs to
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        # the exchange in flight
        self._parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: HTTPError | None = None
        self._until_close = False
        self._head_size = 0
        self._decoder: zlib._Decompress | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._wait_started = 0.0
        self._tunnel: bytearray | None = None  # the CONNECT reply, while tunnelling

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self._tunnel is not None:
            self._tunnel_data(data)
            return
        parser = self._parser
        if parser is None or self.complete:  # bytes nobody asked for: not reusable
            self.close()
            return
        self.got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ResponseError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ResponseError(f"malformed HTTP response: {exc}"))
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._tunnel is not None:
            self._fail(ConnectError(f"the proxy closed the connection{_cause(exc)}"))
        elif self._parser is not None and not self.complete and self.error is None:
            if self.headers_done and self._until_close:
                self._finish()
            elif self.headers_done:
                self._fail(ResponseError(f"connection closed mid-response{_cause(exc)}"))
            else:
                self._fail(ResponseError(
                    f"connection closed before the response{_cause(exc)}"))
        self._wake()
        self._cancel_timer()

    # -- httptools callbacks -----------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            self._fail(ResponseError(f"response head over {MAX_HEAD} bytes"))
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
            self._fail(ResponseError(f"unsupported content-encoding {encoding!r}"))

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(ResponseError(f"undecodable compressed body: {exc}"))
                return
        if body:
            self._chunks.append(body)
            self._buffered += len(body)
            if self._buffered > HIGH_WATER and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of an informational message
            return
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()
        self._finish()

    # -- the exchange ------------------------------------------------------------

    def start(self, request: bytes) -> None:
        """Send ``request`` and get ready for its response."""
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self.status, self.reason, self.headers = 0, "", {}
        self.headers_done = self.complete = self.keep_alive = self.got_bytes = False
        self._until_close = False
        self._head_size = 0
        self.error = self._decoder = None
        self._chunks = []
        self._buffered = 0
        self._last_read = self._loop.time()
        self.transport.write(request)

    def take(self) -> bytes | None:
        """The body bytes buffered so far; b"" at the end; None if none yet.
        Raises the exchange's error."""
        chunks = self._chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()  # the same list: no new one per read kept while we wait
            self._buffered = 0
            if self._paused and self.transport is not None and not self.closed:
                self._paused = False
                self.transport.resume_reading()
            return data
        if self.error is not None:
            raise self.error
        if self.complete:
            return b""
        return None

    async def wait(self) -> None:
        """Until something happens on the exchange, or the read timeout."""
        loop = self._loop
        self._wait_started = loop.time()
        waiter = self._waiter = loop.create_future()
        if self._timer is None:
            self._timer = loop.call_at(self._wait_started + self._read_timeout,
                                       self._on_timer)
        try:
            await waiter
        finally:
            self._waiter = None

    def done_exchange(self) -> None:
        """The exchange is over (read or abandoned)."""
        self._parser = None
        self._cancel_timer()

    def close(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    # -- helpers -----------------------------------------------------------------

    def _finish(self) -> None:
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error as exc:
                self._fail(ResponseError(f"undecodable compressed body: {exc}"))
                return
            if rest:
                self._chunks.append(rest)
        self.complete = True

    def _fail(self, error: HTTPError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waiting: the next wait re-arms it
        since = max(self._last_read, self._wait_started)
        now = self._loop.time()
        if now - since >= self._read_timeout:
            self._fail(ReadTimeout(
                f"no data from upstream for {self._read_timeout:g} s"))
            self._wake()
        else:
            self._timer = self._loop.call_at(since + self._read_timeout, self._on_timer)

    # -- CONNECT tunnel ------------------------------------------------------------

    async def tunnel(self, request: bytes) -> None:
        """Ask the proxy for a tunnel with ``request`` (a CONNECT) and wait for its
        2xx reply."""
        assert self.transport is not None
        self._tunnel = bytearray()
        self.transport.write(request)
        while self._tunnel is not None and self.error is None:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self.error is not None:
            raise self.error

    def _tunnel_data(self, data: bytes) -> None:
        buffer = self._tunnel
        assert buffer is not None
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_TUNNEL_HEAD:
                self._fail(ConnectError("the proxy's CONNECT reply is too long"))
                self._wake()
            return
        status_line = bytes(buffer[:buffer.find(b"\r\n")]).decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            self._fail(ConnectError(f"not an HTTP reply from the proxy: {status_line[:100]!r}"))
        elif not 200 <= int(parts[1]) < 300 or end + 4 != len(buffer):
            self._fail(ConnectError(f"the proxy refused the tunnel: {status_line[:200]}"))
        else:
            self._tunnel = None
        self._wake()


def _cause(exc: BaseException | None) -> str:
    return f" ({exc})" if exc is not None and str(exc) else ""


class Response:
    """The head of a response; its body is read with :meth:`readany` or :meth:`read`.
    Must be ended with :meth:`release` (the connection goes back to the pool if the
    body was read to its end) or :meth:`close`."""

    __slots__ = ("_client", "_conn", "headers", "reason", "status")

    def __init__(self, client: HTTPClient, conn: _Connection) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers  # lower-case names; repeated fields joined by ", "

    @property
    def charset(self) -> str | None:
        for param in self.headers.get("content-type", "").split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                return value.strip().strip('"') or None
        return None

    async def readany(self) -> bytes:
        """The next body bytes (whatever has arrived); b"" at the end of the body."""
        conn = self._conn
        if conn is None:
            return b""
        while (data := conn.take()) is None:
            await conn.wait()
        return data

    async def read(self, limit: int = MAX_READ) -> bytes:
        """The rest of the body, up to ``limit`` bytes (the rest is discarded)."""
        parts: list[bytes] = []
        size = 0
        while data := await self.readany():
            if size < limit:
                parts.append(data[:limit - size])
            size += len(data)
        return b"".join(parts)

    def at_eof(self) -> bool:
        conn = self._conn
        return conn is None or (conn.complete and not conn._chunks)

    def release(self) -> None:
        """Back to the pool if the body was read to its end and the server keeps the
        connection alive; otherwise the connection is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.done_exchange()
        if conn.complete and conn.keep_alive and conn.error is None and not conn.closed:
            self._client._put(conn)
        else:
            self._client._drop(conn)

    def close(self) -> None:
        """Close the connection at once (the upstream sees the disconnect)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done_exchange()
            self._client._drop(conn)


class HTTPClient:
    """A pool of keep-alive connections to any number of origins. ``headers`` go on
    every request; ``read_timeout`` is the longest silence allowed between bytes of a
    response (its head included); ``connect_timeout`` covers TCP, the proxy tunnel and
    TLS. Connections idle for ``keepalive`` seconds are closed. ``proxy`` is an
    ``http://[user:password@]host:port`` URL, or None."""

    def __init__(self, headers: Mapping[str, str], *, read_timeout: float,
                 connect_timeout: float, keepalive: float = 30.0,
                 proxy: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 ) -> None:
        self._headers = b"".join(
            b"%s: %s\r\n" % (_header_bytes(name), _header_bytes(value))
            for name, value in headers.items()
            if name.lower() not in ("host", "content-length", "transfer-encoding"))
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._proxy = _parse_proxy(proxy) if proxy else None
        self._ssl = ssl_context
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._live: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def post(self, url: str, body: bytes) -> Response:
        """Send ``body`` to ``url`` and return once the response head has arrived."""
        if self._closed:
            raise RuntimeError("the HTTP client has been closed")
        target = self._targets.get(url) or self._target(url)
        request = b"%s%d\r\n\r\n%s" % (target.head, len(body), body)
        while True:
            conn = self._get(target) or await self._open(target)
            conn.start(request)
            try:
                while not conn.headers_done and conn.error is None:
                    await conn.wait()
            except BaseException:
                conn.done_exchange()
                self._drop(conn)
                raise
            if conn.error is None:
                return Response(self, conn)
            conn.done_exchange()
            self._drop(conn)
            if not (conn.reused and not conn.got_bytes
                    and isinstance(conn.error, ResponseError)):
                raise conn.error
            # a kept-alive connection the server had just closed: once more, anew

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._live):
            conn.close()
        self._live.clear()
        self._idle.clear()

    # -- the pool ----------------------------------------------------------------

    def _get(self, target: _Target) -> _Connection | None:
        idle = self._idle.get(target.key)
        if not idle:
            return None
        deadline = time.monotonic() - self._keepalive
        while idle:
            conn = idle.pop()  # the most recently used first
            if not conn.closed and conn.idle_since > deadline:
                conn.reused = True
                return conn
            self._drop(conn)
        return None

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            self._drop(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive, self._sweep)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._live.discard(conn)

    def _sweep(self) -> None:
        """Close the connections idle for longer than ``keepalive``."""
        self._sweeper = None
        deadline = time.monotonic() - self._keepalive
        for idle in self._idle.values():
            stale = [c for c in idle if c.closed or c.idle_since <= deadline]
            for conn in stale:
                idle.remove(conn)
                self._drop(conn)
        if any(self._idle.values()):
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive, self._sweep)

    async def _open(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self._read_timeout, target.key)
        where = f"{target.connect_host}:{target.connect_port}"
        context = (self._ssl or _default_ssl()) if target.tls else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if target.tunnel is not None:
                    await loop.create_connection(
                        lambda: conn, target.connect_host, target.connect_port)
                    await conn.tunnel(target.tunnel)
                    assert conn.transport is not None and context is not None
                    transport = await loop.start_tls(
                        conn.transport, conn, context, server_hostname=target.host)
                    assert transport is not None
                    conn.transport = transport
                else:
                    await loop.create_connection(
                        lambda: conn, target.connect_host, target.connect_port,
                        ssl=context, server_hostname=target.host if context else None)
        except TimeoutError:
            conn.close()
            raise ConnectTimeout(
                f"connecting to {where} took over {self._connect_timeout:g} s") from None
        except ConnectError:
            conn.close()
            raise
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            raise ConnectError(f"cannot connect to {where}: {exc}") from exc
        except BaseException:  # cancelled mid-way: no half-open connection left behind
            conn.close()
            raise
        self._live.add(conn)
        return conn

    def _target(self, url: str) -> _Target:
        try:
            parts = urllib.parse.urlsplit(url)
            port_given = parts.port
        except ValueError as exc:  # e.g. a port that is not a number
            raise ConnectError(f"invalid upstream URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectError(f"invalid upstream URL {url!r}: not http(s)://host/…")
        tls = parts.scheme == "https"
        host = parts.hostname
        port = port_given or (443 if tls else 80)
        authority = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            authority += f":{port}"
        path = _request_target((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        connect_host, connect_port, tunnel = host, port, None
        proxy_auth = b""
        if self._proxy is not None:
            connect_host, connect_port, authorization = self._proxy
            if authorization:
                proxy_auth = b"proxy-authorization: %s\r\n" % authorization.encode("latin-1")
            if tls:
                hostport = f"{authority}:{port}" if parts.port is None else authority
                tunnel = (b"CONNECT %s HTTP/1.1\r\nhost: %s\r\n%s\r\n"
                          % (hostport.encode("idna"), hostport.encode("idna"), proxy_auth))
                proxy_auth = b""
            else:
                path = f"http://{authority}{path}"  # absolute form, for the proxy
        head = (b"POST %s HTTP/1.1\r\nhost: %s\r\n%s%scontent-length: "
                % (path.encode("ascii"), authority.encode("idna"), proxy_auth,
                   self._headers))
        target = _Target((parts.scheme, host, port), host, tls, head,
                         connect_host, connect_port, tunnel)
        if len(self._targets) < 64:
            self._targets[url] = target
        return target


def _request_target(target: str) -> str:
    """Percent-encode what may not appear raw in a request target (non-ASCII,
    spaces); what is already encoded or reserved stays as it is."""
    return urllib.parse.quote(target, safe="/?#[]@!$&'()*+,;=:%~-._")


def _header_bytes(text: str) -> bytes:
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError(f"a header may not contain CR, LF or NUL: {text!r}")
    return text.strip().encode("latin-1")


def _parse_proxy(url: str) -> tuple[str, int, str | None]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"unsupported proxy {url!r}: only http:// proxies are")
    authorization = None
    if parts.username is not None:
        credentials = (f"{urllib.parse.unquote(parts.username)}:"
                       f"{urllib.parse.unquote(parts.password or '')}")
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return parts.hostname, parts.port or 80, authorization


@functools.cache
def _default_ssl() -> ssl.SSLContext:
    """The system's trust store, loaded once (it takes milliseconds)."""
    return ssl.create_default_context()
