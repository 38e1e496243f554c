"""The client: requests on pooled connections, and opening new ones."""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
from collections.abc import Mapping

from clawbus import tracing

from .connection import Connection
from .errors import ConnectError, ConnectTimeout
from .inner_tls import InnerTLS
from .pool import Pool
from .response import Response
from .target import Target, build_target, parse_proxy

# URLs whose Target is kept (a provider posts to one or two).
_MAX_TARGETS = 64


class HTTPClient:
    """A pool of keep-alive connections to any number of origins. ``headers`` go on
    every request; ``read_timeout`` is the longest silence allowed between bytes of a
    response (its head included); ``connect_timeout`` covers TCP, the proxy tunnel and
    TLS. Connections idle for ``keepalive`` seconds are closed. ``proxy`` is an
    ``http(s)://[user:password@]host:port`` URL, or None; ``ssl_context`` verifies
    the origins and an https:// proxy (default: the system's trust store)."""

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
        self._proxy = parse_proxy(proxy) if proxy else None
        self._ssl = ssl_context
        self._targets: dict[str, Target] = {}
        self._pool = Pool(keepalive)

    @property
    def connections(self) -> int:
        """Open connections, idle or in use."""
        return len(self._pool.live)

    async def post(self, url: str, body: bytes) -> Response:
        """Send ``body`` to ``url`` and return once the response head has arrived."""
        pool = self._pool
        if pool.closed:
            raise RuntimeError("the HTTP client has been closed")
        target = self._targets.get(url) or self._target(url)
        if tracing.ENABLED:  # the model call's span continues upstream
            request = b"%s%d\r\n%s\r\n%s" % (target.head, len(body),
                                             tracing.spans().header_lines(), body)
        else:
            request = b"%s%d\r\n\r\n%s" % (target.head, len(body), body)
        while True:
            conn = pool.get(target.key) or await self._open(target)
            conn.start(request)
            try:
                error = await conn.wait_head()
            except BaseException:
                conn.end_exchange()
                pool.drop(conn)
                raise
            if error is None:
                return Response(pool, conn)
            conn.end_exchange()
            pool.drop(conn)
            if not conn.retryable:
                raise error
            # a kept-alive connection the server had just closed: once more, anew

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        self._pool.close()

    async def _open(self, target: Target) -> Connection:
        loop = asyncio.get_running_loop()
        conn = Connection(loop, self._read_timeout, target.key)
        where = f"{target.connect_host}:{target.connect_port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: conn, target.connect_host, target.connect_port,
                    ssl=self._context() if target.connect_tls else None,
                    server_hostname=target.connect_tls)
                if target.tunnel is not None:
                    await conn.tunnel(target.tunnel)
                    await self._tls_in_tunnel(loop, conn, target)
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
        self._pool.add(conn)
        return conn

    async def _tls_in_tunnel(self, loop: asyncio.AbstractEventLoop, conn: Connection,
                             target: Target) -> None:
        """TLS with the origin through the proxy's tunnel."""
        outer = conn.transport
        assert outer is not None
        if target.connect_tls is None:
            inner = await loop.start_tls(outer, conn, self._context(),
                                         server_hostname=target.host)
            assert inner is not None
            conn.transport = inner
        else:  # TLS inside the TLS to the proxy, which start_tls cannot do
            tls = InnerTLS(outer, conn, self._context(), target.host)
            await tls.handshake()
            conn.transport = tls

    def _context(self) -> ssl.SSLContext:
        if self._ssl is not None:
            return self._ssl
        return _default_ssl(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))

    def _target(self, url: str) -> Target:
        target = build_target(url, self._proxy, self._headers)
        if len(self._targets) < _MAX_TARGETS:
            self._targets[url] = target
        return target


def _header_bytes(text: str) -> bytes:
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError(f"a header may not contain CR, LF or NUL: {text!r}")
    return text.strip().encode("latin-1")


@functools.cache
def _default_ssl(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """The system's trust store, loaded once (it takes milliseconds) for each value of
    the variables OpenSSL reads it from (``SSL_CERT_FILE``, ``SSL_CERT_DIR``)."""
    return ssl.create_default_context()
