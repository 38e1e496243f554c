"""The providers' HTTP/1.1 client (workers/providers/http_client.py) against scripted
servers on loopback sockets: framing, keep-alive, timeouts, broken and malformed
replies, compression, TLS and proxies."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from clawbus.config import ProviderConfig
from tests.fakes.connect_proxy import ConnectProxy
from workers.providers.http_client import (
    HIGH_WATER,
    ConnectError,
    ConnectTimeout,
    HTTPClient,
    ReadTimeout,
    ResponseError,
)

# Each test runs on both event loops (tests/conftest.py): workers run uvloop, whose
# transports differ from asyncio's.
BOTH_LOOPS = True


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One request: its request line, headers (lower-case names) and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head[:-4].split(b"\r\n")
    headers = {}
    for field in fields:
        name, _, value = field.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line, headers, body


def reply(body: bytes = b"ok", *, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{headers}\r\n"
            .encode() + body)


class Server:
    """A loopback server running ``handler`` once per connection; counts them."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl_context
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def url(self, path: str = "/v1/chat", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


def client(**kwargs: object) -> HTTPClient:
    options: dict[str, object] = {"read_timeout": 10.0, "connect_timeout": 5.0}
    options.update(kwargs)
    headers = options.pop("headers", {"x-api-key": "k1", "accept": "text/event-stream"})
    return HTTPClient(headers, **options)  # type: ignore[arg-type]


@pytest.fixture
async def http() -> AsyncIterator[HTTPClient]:
    c = client()
    yield c
    await c.aclose()


async def keep_alive_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             seen: list[tuple[bytes, dict[str, str], bytes]] | None = None,
                             ) -> None:
    seen = [] if seen is None else seen
    while True:
        request = await read_request(reader)
        seen.append(request)
        writer.write(reply(b"reply %d" % len(seen),
                           headers="x-multi: a\r\nX-Multi: b\r\ncontent-type: text/plain; "
                                   "charset=iso-8859-1\r\n"))
        await writer.drain()


async def test_content_length_reply_and_keep_alive(http: HTTPClient) -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    async with Server(lambda r, w: keep_alive_replies(r, w, seen)) as server:
        for n in (1, 2):
            response = await http.post(server.url("/v1/chat?x=1"), b'{"n": %d}' % n)
            assert (response.status, response.reason) == (200, "OK")
            assert response.headers["x-multi"] == "a, b"
            assert response.charset == "iso-8859-1"
            assert await response.read() == b"reply %d" % n
            assert response.at_eof()
            response.release()
        assert server.connections == 1, "the second request reuses the connection"
    line, headers, body = seen[1]
    assert line == b"POST /v1/chat?x=1 HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["x-api-key"] == "k1"
    assert headers["content-length"] == "8"
    assert body == b'{"n": 2}'


async def test_chunked_body_arrives_as_it_is_sent(http: HTTPClient) -> None:
    second = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await second.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        assert await response.readany() == b"first"
        assert not response.at_eof()
        second.set()
        assert await response.read() == b"second"
        assert response.at_eof()
        response.release()


def answer_then_close(raw: bytes) -> Handler:
    """A server that answers one request with ``raw`` and hangs up."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()
        writer.close()

    return handler


async def test_body_until_close_is_complete_and_not_pooled(http: HTTPClient) -> None:
    sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n"
    async with Server(answer_then_close(sse)) as server:
        for _ in range(2):
            response = await http.post(server.url(), b"{}")
            assert await response.read() == b"data: 1\n\n"
            assert response.at_eof()
            response.release()
        assert server.connections == 2


async def test_connection_lost_mid_body_is_an_error(http: HTTPClient) -> None:
    short = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b"
    async with Server(answer_then_close(short)) as server:
        response = await http.post(server.url(), b"{}")
        with pytest.raises(ResponseError, match="mid-response"):
            await response.read()
        response.close()


@pytest.mark.parametrize("garbage", [b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n"])
async def test_malformed_reply_is_an_error(http: HTTPClient, garbage: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(garbage)
        await reader.read()

    async with Server(handler) as server:
        with pytest.raises(ResponseError, match="malformed"):
            await http.post(server.url(), b"{}")


async def test_an_endless_head_is_an_error(http: HTTPClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(10_000):  # 80 bytes a header, far past the cap
            writer.write(b"x-filler-%05d: %s\r\n" % (i, b"y" * 60))
            await writer.drain()

    async with Server(handler) as server:
        with pytest.raises(ResponseError, match="response head over"):
            await http.post(server.url(), b"{}")


async def test_cancelling_a_connect_leaves_no_connection(http: HTTPClient) -> None:
    accepted = asyncio.Event()
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # never speaks TLS; EOF once the client gives up
        closed.set()

    async with Server(handler) as server:
        attempt = asyncio.ensure_future(http.post(server.url(scheme="https"), b"{}"))
        await accepted.wait()  # TCP is up, the TLS handshake is pending
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        await asyncio.wait_for(closed.wait(), 5)
        assert http.connections == 0


async def test_silence_before_or_after_the_head_is_a_read_timeout() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request(reader)
        if headers.get("x-phase") == "body":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab")
        await release.wait()

    async with Server(handler) as server:
        for phase in ("head", "body"):
            http = client(read_timeout=0.2, headers={"x-phase": phase})
            try:
                with pytest.raises(ReadTimeout) as info:
                    response = await http.post(server.url(), b"{}")
                    assert await response.readany() == b"ab"
                    await response.readany()
                assert isinstance(info.value, TimeoutError)
            finally:
                await http.aclose()
        release.set()


async def test_a_slow_but_steady_stream_never_times_out() -> None:
    """The read timeout is silence between bytes, not the length of the response."""
    more = asyncio.Queue[bytes]()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while chunk := await more.get():
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        writer.write(b"0\r\n\r\n")

    http = client(read_timeout=0.3)
    try:
        async with Server(handler) as server:
            response = await http.post(server.url(), b"{}")
            loop = asyncio.get_running_loop()
            started = loop.time()
            received = []
            while loop.time() - started < 0.9:  # three timeouts' worth, in 0.1 s steps
                await more.put(b"x")
                received.append(await response.readany())
                await asyncio.sleep(0.1)  # the upstream's pacing, not synchronisation
            await more.put(b"")
            assert await response.read() == b""
            assert received and set(received) == {b"x"}
            response.release()
    finally:
        await http.aclose()


async def test_connect_timeout_covers_the_tls_handshake() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # a TCP server that never speaks TLS

    http = client(connect_timeout=0.2)
    try:
        async with Server(handler) as server:
            with pytest.raises(ConnectTimeout, match=r"took over 0\.2 s"):
                await http.post(server.url(scheme="https"), b"{}")
    finally:
        await http.aclose()


async def test_refused_connection_is_a_connect_error(http: HTTPClient) -> None:
    async with Server(keep_alive_replies) as server:
        url = server.url()
    with pytest.raises(ConnectError, match="cannot connect"):
        await http.post(url, b"{}")


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once(
        http: HTTPClient) -> None:
    """The race every keep-alive client meets: the server closes an idle connection
    just as a request goes out on it. Nothing was answered, so it is sent again."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"first"))
        await read_request(reader)  # the second request: closed unanswered

    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        assert await response.read() == b"first"
        response.release()
        response = await http.post(server.url(), b"{}")
        assert await response.read() == b"first"
        response.release()
        assert server.connections == 2


async def test_a_new_connection_closed_unanswered_is_not_retried(http: HTTPClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with Server(handler) as server:
        with pytest.raises(ResponseError, match="before the response"):
            await http.post(server.url(), b"{}")
        assert server.connections == 1


async def test_an_idle_connection_the_server_closed_is_dropped(http: HTTPClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(headers="connection: keep-alive\r\n"))
        await writer.drain()

    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        conn = response._conn
        await response.read()
        response.release()
        assert conn is not None
        lost = asyncio.Event()
        seen_lost = conn.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            seen_lost(exc)
            lost.set()

        conn.connection_lost = connection_lost  # type: ignore[method-assign]
        await lost.wait()  # the server's close reaches the pooled connection
        assert conn.closed
        response = await http.post(server.url(), b"{}")
        assert await response.read() == b"ok"
        response.release()
        assert server.connections == 2


async def test_closing_mid_body_drops_the_connection(http: HTTPClient) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await reader.read()  # until the client hangs up
        closed.set()

    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        assert await response.readany() == b"a"
        response.release()  # not read to its end: closed, not pooled
        await closed.wait()


async def test_informational_head_is_skipped(http: HTTPClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + reply(b"real"))

    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        assert response.status == 200
        assert "link" not in response.headers
        assert await response.read() == b"real"
        response.release()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_body_is_decoded(http: HTTPClient, encoding: str) -> None:
    import zlib

    text = b"data: compressed\n\n" * 50
    packed = gzip.compress(text) if encoding == "gzip" else zlib.compress(text)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(packed, headers=f"content-encoding: {encoding}\r\n"))

    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        assert await response.read() == text
        response.release()


async def test_unknown_content_encoding_is_an_error(http: HTTPClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"??", headers="content-encoding: br\r\n"))
        await reader.read()

    async with Server(handler) as server:
        with pytest.raises(ResponseError, match="content-encoding 'br'"):
            await http.post(server.url(), b"{}")


async def test_a_large_body_is_read_whole_under_flow_control(http: HTTPClient) -> None:
    body = bytes(range(256)) * (3 * HIGH_WATER // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(reply(body))
            await writer.drain()

    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        assert await response.read(limit=len(body)) == body
        response.release()
        response = await http.post(server.url(), b"{}")
        assert len(await response.read(limit=10)) == 10, "read() caps what it keeps"
        response.release()
        assert server.connections == 1


async def test_aclose_closes_connections_in_use() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await reader.read()
        closed.set()

    http = client()
    async with Server(handler) as server:
        response = await http.post(server.url(), b"{}")
        await http.aclose()
        await closed.wait()
        with pytest.raises(ResponseError):
            await response.readany()
        with pytest.raises(RuntimeError, match="closed"):
            await http.post(server.url(), b"{}")


async def test_request_targets_are_percent_encoded_and_bad_urls_refused() -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    http = client()
    try:
        async with Server(lambda r, w: keep_alive_replies(r, w, seen)) as server:
            response = await http.post(server.url("/v1/ü space?q=a%20b"), b"{}")
            await response.read()
            response.release()
        for url in ("http://h:port/x", "ftp://h/x", "http:///x"):
            with pytest.raises(ConnectError, match="invalid upstream URL"):
                await http.post(url, b"{}")
    finally:
        await http.aclose()
    assert seen[0][0] == b"POST /v1/%C3%BC%20space?q=a%20b HTTP/1.1"
    for base_url in ("http://h:port/v1", "ftp://h/v1", "localhost:8000/v1"):
        with pytest.raises(ValueError, match="baseUrl"):
            ProviderConfig(api="openai-completions", base_url=base_url)


def test_header_injection_is_refused() -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        HTTPClient({"x-evil": "a\r\nx-injected: 1"}, read_timeout=1, connect_timeout=1)
    for headers in ({"x-evil": "a\nb"}, {"bad name": "v"}, {"x-pound": "£" + "\u20ac"}):
        with pytest.raises(ValueError, match="header"):
            ProviderConfig(api="openai-completions", headers=headers)


# -- TLS and proxies -------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for 127.0.0.1, client context trusting it)."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return server, trusting


async def test_https(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    http = client(ssl_context=client_ctx)
    try:
        async with Server(lambda r, w: keep_alive_replies(r, w, seen), server_ctx) as server:
            for _ in range(2):
                response = await http.post(server.url(scheme="https"), b"{}")
                assert await response.read() == b"reply %d" % len(seen)
                response.release()
            assert server.connections == 1
    finally:
        await http.aclose()


async def test_https_with_an_untrusted_certificate_is_a_connect_error(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls
    http = client()  # the system's trust store: no test CA
    try:
        async with Server(keep_alive_replies, server_ctx) as server:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.post(server.url(scheme="https"), b"{}")
    finally:
        await http.aclose()


async def test_http_through_a_proxy_uses_the_absolute_form() -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    async with Server(lambda r, w: keep_alive_replies(r, w, seen)) as proxy:
        http = client(proxy=f"http://user:p%40ss@127.0.0.1:{proxy.port}")
        try:
            response = await http.post("http://upstream.invalid:8080/v1/chat", b"{}")
            assert await response.read() == b"reply 1"
            response.release()
        finally:
            await http.aclose()
    line, headers, _ = seen[0]
    assert line == b"POST http://upstream.invalid:8080/v1/chat HTTP/1.1"
    assert headers["host"] == "upstream.invalid:8080"
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_https_through_a_proxy_tunnels(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    tunnels: list[tuple[bytes, dict[str, str]]] = []
    seen: list[tuple[bytes, dict[str, str], bytes]] = []

    async with Server(lambda r, w: keep_alive_replies(r, w, seen), server_ctx) as origin:
        async def proxy_handler(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
            line, headers, _ = await read_request(reader)
            tunnels.append((line, headers))
            if "proxy-authorization" not in headers:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"content-length: 0\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", origin.port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            finally:
                up_writer.close()

        async with Server(proxy_handler) as proxy:
            refused = client(ssl_context=client_ctx, proxy=f"127.0.0.1:{proxy.port}")
            try:
                with pytest.raises(ConnectError, match="407"):
                    await refused.post(origin.url(scheme="https"), b"{}")
            finally:
                await refused.aclose()
            http = client(ssl_context=client_ctx, proxy=f"http://u:p@127.0.0.1:{proxy.port}")
            try:
                response = await http.post(origin.url("/v1/x", scheme="https"), b"{}")
                assert await response.read() == b"reply 1"
                response.release()
            finally:
                await http.aclose()
    line, headers = tunnels[-1]
    assert line == f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1".encode()
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    assert seen[0][0] == b"POST /v1/x HTTP/1.1", "the origin sees the origin form"
    assert "proxy-authorization" not in seen[0][1], "credentials stay with the proxy"


async def test_https_through_an_https_proxy_is_tls_inside_tls(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """TLS to the proxy, CONNECT, then TLS to the origin inside it; keep-alive holds."""
    server_ctx, client_ctx = tls
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    async with Server(lambda r, w: keep_alive_replies(r, w, seen), server_ctx) as origin, \
            ConnectProxy(server_ctx, credentials=("u", "p")) as proxy:
        http = client(ssl_context=client_ctx, proxy=proxy.url)
        try:
            for n in (1, 2):
                response = await http.post(origin.url("/v1/x", scheme="https"), b"{}")
                assert await response.read() == b"reply %d" % n
                response.release()
        finally:
            await http.aclose()
        assert (proxy.connections, origin.connections) == (1, 1)
    assert proxy.tunnels[0].target == f"127.0.0.1:{origin.port}"
    assert seen[0][0] == b"POST /v1/x HTTP/1.1"


async def test_an_https_proxy_with_an_untrusted_certificate_is_a_connect_error(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls
    async with Server(keep_alive_replies, server_ctx) as origin, \
            ConnectProxy(server_ctx) as proxy:
        http = client(proxy=proxy.url)  # the system's trust store: no test CA
        try:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.post(origin.url(scheme="https"), b"{}")
        finally:
            await http.aclose()
        assert proxy.tunnels == [], "refused before CONNECT"


async def test_http_through_an_https_proxy(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    async with Server(lambda r, w: keep_alive_replies(r, w, seen), server_ctx) as proxy:
        http = client(ssl_context=client_ctx, proxy=f"https://127.0.0.1:{proxy.port}")
        try:
            response = await http.post("http://upstream.invalid/v1/chat", b"{}")
            assert await response.read() == b"reply 1"
            response.release()
        finally:
            await http.aclose()
    assert seen[0][0] == b"POST http://upstream.invalid/v1/chat HTTP/1.1"


def test_unsupported_proxies_are_refused() -> None:
    for proxy in ("socks5://127.0.0.1:1080", "http://127.0.0.1:port", "http://"):
        with pytest.raises(ValueError, match="proxy"):
            HTTPClient({}, read_timeout=1, connect_timeout=1, proxy=proxy)
