"""The keep-alive pool: idle connections per origin, and every open one."""

from __future__ import annotations

import asyncio
import time

from .connection import Connection


class Pool:
    """Connections idle for longer than ``keepalive`` seconds are closed."""

    def __init__(self, keepalive: float) -> None:
        self._keepalive = keepalive
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self.live: set[Connection] = set()  # every open connection, idle or in use
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def get(self, key: tuple[str, str, int]) -> Connection | None:
        """An idle connection to the origin ``key``, the most recently used first."""
        idle = self._idle.get(key)
        if not idle:
            return None
        deadline = time.monotonic() - self._keepalive
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                conn.reused = True
                return conn
            self.drop(conn)
        return None

    def add(self, conn: Connection) -> None:
        """A new connection, in use."""
        self.live.add(conn)

    def put(self, conn: Connection) -> None:
        """Back from an exchange, to be reused."""
        if self.closed:
            self.drop(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive, self._sweep)

    def drop(self, conn: Connection) -> None:
        """Close ``conn`` and forget it."""
        conn.close()
        self.live.discard(conn)

    def close(self) -> None:
        """Close every connection, idle or in use; nothing goes back to the pool after."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.live):
            conn.close()
        self.live.clear()
        self._idle.clear()

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self._keepalive
        for idle in self._idle.values():
            stale = [c for c in idle if c.closed or c.idle_since <= deadline]
            for conn in stale:
                idle.remove(conn)
                self.drop(conn)
        if any(self._idle.values()):
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive, self._sweep)
