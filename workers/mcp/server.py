"""One MCP server as a worker process sees it: a session kept open and shared by
every agent (and run) that uses the server, started again when it ends.

Each connection lives in a task of its own, the *owner*, which enters and leaves
the SDK's async context managers (transport, then :class:`ClientSession`): anyio
wants a task group left by the task that entered it. Each call is a request task
of its own on that session, so a caller's cancellation or timeout cancels its own
request (the SDK then sends ``notifications/cancelled``) and nothing else, and
the caller waits at most :data:`CANCEL_GRACE` for that.

A connection that ends (a stdio child that exits, an HTTP server that goes away)
is noticed by the request that fails on it; the owner then closes it, which for a
stdio server waits for the child to exit and reaps it (the SDK closes its stdin,
then after a grace sends SIGTERM, then SIGKILL, to its process group). The next
use starts a new connection. A server that fails to start offers no tools; on a
later use, once a back-off allows, it is started again in the background.

Timeouts: starting (connect, handshake, first listing) :data:`START_TIMEOUT`,
listing :data:`LIST_TIMEOUT`, closing :data:`CLOSE_TIMEOUT`; a call is bounded by
its caller (the agent's ``callTimeoutSeconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx2
import mcp.types as mcp
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from clawbus.config import McpServerConfig, proxy_for

from ..metrics import WorkerMetrics
from .errors import ServerUnavailable, describe

log = logging.getLogger("clawbus.mcp")

# Connecting, the initialize handshake and the first tools/list.
START_TIMEOUT = 30.0
LIST_TIMEOUT = 30.0
# Pages of one tools/list (a server whose cursor never ends cannot hang a start).
MAX_LIST_PAGES = 100
# Waiting for a connection's owner to close it; the SDK's stdio shutdown takes at
# most ~6 s (stdin closed, 2 s, SIGTERM, 2 s, SIGKILL, 2 s).
CLOSE_TIMEOUT = 10.0
# How long a cancelled call waits for its request to wind down (the SDK telling the
# server with notifications/cancelled) before it lets the cancellation through.
CANCEL_GRACE = 0.5
# After the n-th start failure in a row, no new start before this many seconds.
RETRY_AFTER = (1.0, 5.0, 15.0, 30.0, 60.0)
CLIENT_INFO = mcp.Implementation(name="clawbus", version="0.1.0")
# Errors of a request that say the connection itself is gone (not that the tool failed).
_CONNECTION_ERRORS = (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError,
                      httpx2.TransportError)


class McpServer:
    """A configured MCP server (``name``, ``config``) and its current connection."""

    def __init__(self, name: str, config: McpServerConfig, *, env: Mapping[str, str],
                 config_dir: Path, metrics: WorkerMetrics | None = None) -> None:
        self.name = name
        self.config = config
        self._env = env
        self._config_dir = config_dir
        self._metrics = metrics
        self.tools: tuple[mcp.Tool, ...] | None = None  # None: never listed
        self.problem: str | None = None  # why the last start failed, until one succeeds
        self.version = 0  # bumped whenever `offered` changes
        self._session: ClientSession | None = None
        self._owner: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[ClientSession] | None = None
        self._stop = asyncio.Event()
        self._requests: set[asyncio.Task[mcp.CallToolResult]] = set()
        self._retry: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._stale = False  # the server said its tool list changed
        self._connections = 0
        self._failures = 0
        self._retry_at = 0.0
        self._closed = False

    @property
    def transport(self) -> str:
        return "stdio" if self.config.command is not None else "http"

    @property
    def offered(self) -> tuple[mcp.Tool, ...]:
        """The tools agents are offered: the last listed, unless the server is down
        and failed to start again (then none: calls to them could only fail)."""
        return () if self.problem is not None or self.tools is None else self.tools

    def needs_refresh(self) -> bool:
        """No live connection, or a tool list announced as changed."""
        return self._session is None or self._stale

    async def refresh(self) -> None:
        """Start the server if it is not running (or re-list its tools if they
        changed). Never raises: a failure is logged, counted and kept in
        :attr:`problem`, and the server keeps its last tool list.

        A server whose last start failed is not waited for: another start is
        begun in the background when the back-off allows, and the caller goes on
        without it (an unreachable server must not hold up every run)."""
        if self.problem is not None and self._session is None:
            self._retry_in_background()
            return
        try:
            session = await self.session()
        except ServerUnavailable:
            return
        if not self._stale:
            return
        self._stale = False
        try:
            self._set_tools(await self._list(session), problem=None)
        except TimeoutError:
            log.warning("MCP server %r: tools/list timed out after %g s", self.name,
                        LIST_TIMEOUT)
        except MCPError as exc:
            if exc.code == mcp.CONNECTION_CLOSED:
                self._lost(session, exc)
            else:
                log.warning("MCP server %r: tools/list failed: %s", self.name, describe(exc))
        except _CONNECTION_ERRORS as exc:
            self._lost(session, exc)

    async def session(self) -> ClientSession:
        """The live session, started first if there is none.

        Raises :class:`ServerUnavailable` if it cannot be started (or another
        start is not due yet after a failure)."""
        session = self._session
        if session is not None:
            return session
        async with self._lock:
            if self._session is not None:
                return self._session
            if self._closed:
                raise ServerUnavailable(self.name, "the worker is shutting down")
            if time.monotonic() < self._retry_at:
                raise ServerUnavailable(self.name, self.problem or "start failed")
            return await self._start()

    async def call(self, tool: str, arguments: dict[str, Any],
                   meta: mcp.RequestParamsMeta) -> mcp.CallToolResult:
        """``tools/call`` on the live session (started first if needed).

        Raises :class:`ServerUnavailable` when the server cannot be reached or its
        connection ends during the call, :class:`MCPError` for an error answer."""
        session = await self.session()
        # The request runs in a task of its own so that a cancelled caller need not
        # wait for the SDK to send notifications/cancelled (bounded by the SDK, but
        # by seconds when a server is slow to take it): it waits CANCEL_GRACE at most.
        request = asyncio.create_task(session.call_tool(tool, arguments, meta=meta),
                                      name=f"mcp call {self.name}/{tool}")
        self._requests.add(request)
        request.add_done_callback(self._request_done)
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            request.cancel()
            await asyncio.wait({request}, timeout=CANCEL_GRACE)
            raise
        except MCPError as exc:
            if exc.code != mcp.CONNECTION_CLOSED:
                raise
            self._lost(session, exc)
            raise ServerUnavailable(self.name, "the connection ended during the call") from None
        except _CONNECTION_ERRORS as exc:
            self._lost(session, exc)
            raise ServerUnavailable(self.name, describe(exc)) from None

    async def aclose(self) -> None:
        """Close the connection (a stdio child is stopped and reaped); idempotent."""
        self._closed = True
        self._session = None
        pending = {*self._requests, *([self._retry] if self._retry is not None else [])}
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
        await self._end_owner()

    def _retry_in_background(self) -> None:
        if self._closed or time.monotonic() < self._retry_at or (
                self._retry is not None and not self._retry.done()):
            return
        self._retry = asyncio.create_task(self._start_quietly(),
                                          name=f"mcp server {self.name} retry")

    async def _start_quietly(self) -> None:
        with contextlib.suppress(ServerUnavailable):
            await self.session()

    def _request_done(self, request: asyncio.Task[mcp.CallToolResult]) -> None:
        self._requests.discard(request)
        if not request.cancelled():
            request.exception()  # (retrieved: its caller may have stopped waiting)

    # ------------------------------------------------------------------ internals

    async def _start(self) -> ClientSession:
        await self._end_owner()  # the previous connection's child is reaped first
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[ClientSession] = loop.create_future()
        self._ready = ready
        self._stop = asyncio.Event()
        self._owner = asyncio.create_task(self._own(ready, self._stop),
                                          name=f"mcp server {self.name}")
        try:
            async with asyncio.timeout(START_TIMEOUT):
                session = await ready
                tools = await self._list(session)
        except Exception as exc:
            await self._end_owner()
            reason = self._start_failure(exc)
            self._failed(reason)
            raise ServerUnavailable(self.name, reason) from None
        except BaseException:
            # Cancelled: let it through at once; the owner is cancelled now and
            # waited for by the next start or by aclose.
            self._stop.set()
            self._owner.cancel()
            raise
        if self._connections:
            log.info("MCP server %r started again", self.name)
            if self._metrics is not None:
                self._metrics.mcp_server_restarts_by(self.name).inc()
        self._connections += 1
        self._failures = 0
        self._retry_at = 0.0
        self._stale = False
        self._set_tools(tools, problem=None)
        self._session = session
        return session

    def _start_failure(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {START_TIMEOUT:g} s"
        if isinstance(exc, OSError) and self.config.command is not None:
            # (uvloop's spawn errors do not name the file)
            return f"cannot run {self.config.command[0]!r}: {exc.strerror or describe(exc)}"
        return describe(exc)

    def _failed(self, reason: str) -> None:
        self._failures += 1
        delay = RETRY_AFTER[min(self._failures, len(RETRY_AFTER)) - 1]
        self._retry_at = time.monotonic() + delay
        self._set_tools(self.tools, problem=reason)
        log.warning("MCP server %r (%s) failed to start: %s; its tools are left out, "
                    "another start is tried on use after %g s", self.name, self.transport,
                    reason, delay)
        if self._metrics is not None:
            self._metrics.mcp_server_failures_by(self.name).inc()

    def _lost(self, session: ClientSession, exc: BaseException) -> None:
        """The connection of ``session`` is gone: its owner closes it; the next use
        starts a new one."""
        if self._session is session:
            self._session = None
            self._stop.set()
            log.warning("MCP server %r: connection lost (%s); it is started again on next "
                        "use", self.name, describe(exc))

    async def _own(self, ready: asyncio.Future[ClientSession], stop: asyncio.Event) -> None:
        """The owner task of one connection: open it, hand the session over, hold it
        until ``stop`` or until it breaks, then close it."""
        session: ClientSession | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(ClientSession(
                    _EndWatch(read, stop), write, message_handler=self._on_message,
                    client_info=CLIENT_INFO))
                await session.initialize()
                if ready.done():  # the starter gave up meanwhile
                    return
                ready.set_result(session)
                await stop.wait()
                if self._session is session:  # not asked to stop: the server hung up
                    self._session = None
                    log.warning("MCP server %r closed the connection; it is started again "
                                "on next use", self.name)
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            elif self._session is session:
                log.warning("MCP server %r: connection ended: %s", self.name, describe(exc))
        finally:
            if session is not None and self._session is session:
                self._session = None
            if not ready.done():  # cancelled while starting: the starter must not wait on
                ready.set_exception(ServerUnavailable(self.name, "closed while starting"))

    def _transport(self) -> contextlib.AbstractAsyncContextManager[Any]:
        config = self.config
        if config.command is not None:
            cwd = None
            if config.cwd is not None:
                cwd = self._config_dir / Path(config.cwd).expanduser()
            # The SDK adds its few safe variables (PATH, HOME, USER, ...) and nothing
            # else of this process's environment: no gateway token, no provider key.
            params = StdioServerParameters(command=config.command[0],
                                           args=list(config.command[1:]),
                                           env=dict(config.env), cwd=cwd)
            return stdio_client(params)
        assert config.url is not None
        return self._http(config.url)

    @contextlib.asynccontextmanager
    async def _http(self, url: str) -> AsyncIterator[Any]:
        # No read timeout: a tool call may stream nothing for as long as its own
        # callTimeoutSeconds, which bounds it; the server's event stream may idle.
        client = httpx2.AsyncClient(headers=self.config.headers,
                                    timeout=httpx2.Timeout(START_TIMEOUT, read=None),
                                    proxy=proxy_for(url, self._env), trust_env=False)
        async with client, streamable_http_client(url, http_client=client) as streams:
            yield streams

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, mcp.ToolListChangedNotification):
            self._stale = True
        elif isinstance(message, Exception):
            log.debug("MCP server %r: transport error: %s", self.name, describe(message))

    async def _list(self, session: ClientSession) -> tuple[mcp.Tool, ...]:
        tools: list[mcp.Tool] = []
        cursor: str | None = None
        async with asyncio.timeout(LIST_TIMEOUT):
            for _ in range(MAX_LIST_PAGES):
                params = mcp.PaginatedRequestParams(cursor=cursor) if cursor else None
                page = await session.list_tools(params=params)
                tools += page.tools
                cursor = page.next_cursor
                if not cursor:
                    break
        return tuple(tools)

    def _set_tools(self, tools: tuple[mcp.Tool, ...] | None, *, problem: str | None) -> None:
        offered = self.offered
        self.tools = tools
        self.problem = problem
        if self.offered != offered:
            self.version += 1

    async def _end_owner(self) -> None:
        """Close the current connection and wait for its owner task to end."""
        task, ready = self._owner, self._ready
        self._owner = self._ready = None
        if task is None:
            return
        self._stop.set()
        # A connection still being opened does not look at `stop`: cancel it.
        if ready is not None and not ready.done():
            task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        if not done:
            log.warning("MCP server %r: not closed within %g s, cancelling", self.name,
                        CLOSE_TIMEOUT)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        if done and not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("MCP server %r: closing failed: %s", self.name, describe(exc))


class _Receiving(Protocol):
    async def receive(self) -> SessionMessage | Exception: ...
    async def aclose(self) -> None: ...


class _EndWatch:
    """A transport's read stream that sets ``ended`` when it ends: a stdio child
    that exited, for one, is noticed (and reaped) at once, not by the next call
    that would fail on it. The rest (``last_context``, ...) is the stream's own."""

    def __init__(self, stream: _Receiving, ended: asyncio.Event) -> None:
        self._stream = stream
        self._ended = ended

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._ended.set()
            raise

    def __aiter__(self) -> _EndWatch:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> _EndWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
