"""A response: its head at once, its body as it arrives."""

from __future__ import annotations

from .connection import Connection
from .pool import Pool

# Longest body read(), e.g. an upstream error page.
MAX_READ = 1 << 20


class Response:
    """The head of a response; its body is read with :meth:`readany` or :meth:`read`.
    Must be ended with :meth:`release` (the connection goes back to the pool if the
    body was read to its end) or :meth:`close`."""

    __slots__ = ("_conn", "_pool", "headers", "reason", "status")

    def __init__(self, pool: Pool, conn: Connection) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        # lower-case header names; repeated fields joined by ", "
        self.status, self.reason, self.headers = conn.head

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
            if not await conn.wait():
                conn.timed_out()
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
        return conn is None or conn.at_eof()

    def release(self) -> None:
        """Back to the pool if the body was read to its end and the server keeps the
        connection alive; otherwise the connection is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.end_exchange():
            self._pool.put(conn)
        else:
            self._pool.drop(conn)

    def close(self) -> None:
        """Close the connection at once (the upstream sees the disconnect)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.end_exchange()
            self._pool.drop(conn)
