"""Flow control: a reader that falls behind makes its connection stop reading."""

from __future__ import annotations

import asyncio

# Above this many buffered body bytes reading stops, until the reader takes them.
HIGH_WATER = 1 << 20


class ReadFlow:
    """Pauses and resumes reading on one connection's transport."""

    __slots__ = ("paused",)

    def __init__(self) -> None:
        self.paused = False

    def received(self, transport: asyncio.Transport, buffered: int) -> None:
        """After a read: pause if the reader is over :data:`HIGH_WATER` bytes behind."""
        if buffered > HIGH_WATER and not self.paused:
            self.paused = True
            transport.pause_reading()

    def taken(self, transport: asyncio.Transport) -> None:
        """The reader took everything buffered: read again."""
        if self.paused:
            self.paused = False
            if not transport.is_closing():
                transport.resume_reading()
