"""One keep-alive connection: its transport, the response in flight on it and the
waits for that response."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

from clawbus.deadline import DeadlineWaiter

from .errors import ConnectError, ConnectTimeout, HTTPError, ReadTimeout, ResponseError, cause
from .flow import HIGH_WATER, ReadFlow
from .parser import ResponseParser
from .tunnel import TunnelReply


class Connection(asyncio.Protocol):
    """One exchange at a time: :meth:`start` sends a request, :meth:`wait_head`,
    :meth:`take` and :meth:`wait` read its response, :meth:`end_exchange` ends it.
    ``key`` names the pool it belongs to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float,
                 key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0  # for the pool
        self.reused = False  # it has carried an exchange before this one
        self._loop = loop
        self._read_timeout = read_timeout
        self._response = ResponseParser()
        self._flow = ReadFlow()
        self._waiter = DeadlineWaiter(loop)
        self._tunnel: TunnelReply | None = None  # the proxy's CONNECT reply, until it ends

    # -- what the client and the response read ------------------------------------

    @property
    def head(self) -> tuple[int, str, dict[str, str]]:
        """The response's status, reason phrase and headers."""
        response = self._response
        return response.status, response.reason, response.headers

    @property
    def retryable(self) -> bool:
        """The request failed in a way that sending it again anew may cure: a reused
        connection closed (by the server, while idle) before a byte of the response."""
        response = self._response
        return (self.reused and not response.got_bytes
                and isinstance(response.error, ResponseError))

    def at_eof(self) -> bool:
        """The whole body has been taken."""
        response = self._response
        return response.complete and not response.chunks

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        waiter.postpone(self._loop.time() + self._read_timeout)
        if self._tunnel is not None:
            self._tunnel_data(data)
            return
        response = self._response
        if not response.expecting or response.complete:  # bytes nobody asked for
            self.close()  # not reusable
            return
        response.feed(data)
        if response.error is not None:
            self.close()
        elif response.buffered > HIGH_WATER:  # the reader is behind
            assert self.transport is not None
            self._flow.pause(self.transport)
        waiter.wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        tunnel = self._tunnel
        if tunnel is not None and tunnel.error is None:
            tunnel.error = ConnectError(f"the proxy closed the connection{cause(exc)}")
        self._response.connection_lost(exc)
        self._waiter.wake()
        self._waiter.close()

    # -- the exchange ------------------------------------------------------------

    def start(self, request: bytes) -> None:
        """Send ``request`` and expect its response."""
        assert self.transport is not None
        self._response.begin()
        self.transport.write(request)

    async def wait_head(self) -> HTTPError | None:
        """Until the response's head has arrived; the exchange's error, if it failed."""
        response = self._response
        while not response.headers_done and response.error is None:
            if not await self.wait():
                self.timed_out()
        return response.error

    def wait(self) -> Coroutine[Any, Any, bool]:
        """Until something happens on the exchange (True), or until the read timeout
        of silence (False: then :meth:`timed_out`). The waiter's own coroutine: no
        frame of this one per read."""
        return self._waiter.wait(self._loop.time() + self._read_timeout)

    def timed_out(self) -> None:
        """The upstream was silent for the read timeout: the exchange fails."""
        self._fail(ReadTimeout(f"no data from upstream for {self._read_timeout:g} s"))

    def take(self) -> bytes | None:
        """The body bytes buffered so far; b"" at the end; None if none yet.
        Raises the exchange's error."""
        response = self._response
        chunks = response.chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()  # the same list: no new one per read kept while waiting
            response.buffered = 0
            if self._flow.paused and self.transport is not None:
                self._flow.resume(self.transport)
            return data
        if response.error is not None:
            raise response.error
        return b"" if response.complete else None

    def end_exchange(self) -> bool:
        """The exchange is over (read or abandoned); True if the connection may carry
        another (the body was read to its end and the server keeps it open)."""
        response = self._response
        response.end()
        self._waiter.close()
        return (response.complete and response.keep_alive and response.error is None
                and not self.closed)

    def close(self) -> None:
        self.closed = True
        self._waiter.close()
        if self.transport is not None:
            self.transport.close()

    # -- the proxy tunnel ------------------------------------------------------------

    async def tunnel(self, request: bytes) -> None:
        """Send the proxy ``request`` (a CONNECT) and wait for its 2xx reply; raises
        :class:`ConnectError` (:class:`ConnectTimeout` after the read timeout of
        silence)."""
        assert self.transport is not None
        tunnel = self._tunnel = TunnelReply()
        self.transport.write(request)
        try:
            while not tunnel.done and tunnel.error is None:
                if not await self._waiter.wait(self._loop.time() + self._read_timeout):
                    tunnel.error = ConnectTimeout(
                        f"no reply from the proxy for {self._read_timeout:g} s")
        finally:
            self._tunnel = None
            self._waiter.close()
        if tunnel.error is not None:
            self.close()
            raise tunnel.error

    def _tunnel_data(self, data: bytes) -> None:
        tunnel = self._tunnel
        assert tunnel is not None
        if tunnel.done or tunnel.error is not None:  # past the reply: not a tunnel
            self.close()
            return
        tunnel.feed(data)
        self._waiter.wake()

    # -- helpers -----------------------------------------------------------------

    def _fail(self, error: HTTPError) -> None:
        self._response.fail(error)
        self.close()
