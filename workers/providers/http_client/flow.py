"""Flow control: a reader that falls behind makes its connection stop reading."""

from __future__ import annotations

import asyncio

# Above this many buffered body bytes reading stops, until the reader takes them.
HIGH_WATER = 1 << 20


class ReadFlow:
    """Whether reading is paused on one connection's transport: paused once over
    :data:`HIGH_WATER` bytes are buffered (the connection checks after each read),
    resumed once the reader has taken them."""

    __slots__ = ("paused",)

    def __init__(self) -> None:
        self.paused = False

    def pause(self, transport: asyncio.Transport) -> None:
        if not self.paused:
            self.paused = True
            transport.pause_reading()

    def resume(self, transport: asyncio.Transport) -> None:
        if self.paused:
            self.paused = False
            if not transport.is_closing():
                transport.resume_reading()
