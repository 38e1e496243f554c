"""TLS to the origin inside a TLS connection to an ``https://`` proxy.

asyncio's ``start_tls`` cannot wrap a transport that is itself TLS, so the inner
session runs on memory BIOs: :class:`InnerTLS` becomes the protocol of the
connection to the proxy and, for the connection above it, the transport.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

# Largest read from the TLS object at a time (one TLS record is at most 16 KiB).
_READ_SIZE = 64 * 1024


class InnerTLS(asyncio.Transport, asyncio.Protocol):
    """A TLS session carried by ``outer``; plaintext goes to and from ``app``."""

    def __init__(self, outer: asyncio.Transport, app: asyncio.Protocol,
                 context: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__()
        self._outer = outer
        self._app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing,
                                     server_hostname=server_hostname)
        self._handshake: asyncio.Future[None] | None = None
        self._error: Exception | None = None  # why the session ended, for connection_lost

    async def handshake(self) -> None:
        """Take over the outer connection and complete the handshake; raises
        :class:`ssl.SSLError` or :class:`ConnectionError`."""
        self._handshake = asyncio.get_running_loop().create_future()
        self._outer.set_protocol(self)
        self._step_handshake()
        await self._handshake

    # -- the outer connection's protocol ------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._handshake is not None and not self._handshake.done():
            self._step_handshake()
            if not self._handshake.done() or self._handshake.exception() is not None:
                return
        tls, app = self._tls, self._app
        while not self._outer.is_closing():
            try:
                plain = tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the origin's close_notify
                self._outer.close()
                break
            except ssl.SSLError as exc:
                self._error = exc
                self._outer.close()
                break
            app.data_received(plain)
        self._flush()  # e.g. a key update

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(ConnectionResetError(
                "the proxy closed the connection during the origin's TLS handshake"))
        self._app.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    # -- the transport of the connection above --------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._outer.is_closing():
            return
        self._tls.write(data)
        self._flush()

    def close(self) -> None:
        self._outer.close()

    def abort(self) -> None:
        self._outer.abort()

    def is_closing(self) -> bool:
        return self._outer.is_closing()

    def pause_reading(self) -> None:
        self._outer.pause_reading()

    def resume_reading(self) -> None:
        self._outer.resume_reading()

    def is_reading(self) -> bool:
        return self._outer.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls
        return self._outer.get_extra_info(name, default)

    # -- helpers ---------------------------------------------------------------------

    def _step_handshake(self) -> None:
        assert self._handshake is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert, for the origin's log
            self._handshake.set_exception(exc)
            return
        self._flush()
        self._handshake.set_result(None)

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._outer.write(data)
