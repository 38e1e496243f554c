"""Liveness probes to gateways whose replies can be awaited later.

A probe is an event published with a reply subject; the gateway answers ``ok``
or ``gone`` and, if no gateway subscribes any more, NATS itself answers with a
``503`` status (no responders). nats-py's ``request()`` sends and waits in one
call; a run's ``accepted`` probe must not wait there: the worker starts the
provider call while the answer travels (one bus round trip, ~0.5 ms on one core,
off the critical path), and awaits it only before anything durable happens (the
turn stored, the run acked). So :meth:`Probes.send` publishes at once — in order
with the run's other events — and returns a :class:`Probe` to await later.

One wildcard inbox subscription per worker process receives every reply (no
subscription per run).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

NO_RESPONDERS_STATUS = "503"
NO_RESPONDERS = b"\x00no-responders"  # what a probe answers when nobody listens


@dataclass(slots=True)
class Probe:
    """One sent probe; :meth:`reply` waits for its answer."""

    future: asyncio.Future[bytes]
    deadline: float  # monotonic

    async def reply(self) -> bytes | None:
        """The gateway's answer, :data:`NO_RESPONDERS`, or None if none came in time
        (a busy gateway is not a dead one)."""
        if self.future.done():
            return self.future.result()
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                return await asyncio.shield(self.future)
        except TimeoutError:
            self.future.cancel()  # drops it from the waiting map
            return None


class Probes:
    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._answer,
                                             pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def send(self, subject: str, data: bytes, answer_within: float) -> Probe:
        if self._sub is None:
            raise RuntimeError("Probes.start() was not called")
        token = str(next(self._tokens))
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        future.add_done_callback(lambda _: self._waiting.pop(token, None))
        try:
            await self._nc.publish(subject, data, reply=f"{self._prefix}.{token}")
        except BaseException:
            future.cancel()
            raise
        return Probe(future, time.monotonic() + answer_within)

    async def _answer(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject.rpartition(".")[2])
        if future is None or future.done():
            return
        status = msg.headers.get("Status") if msg.headers else None
        future.set_result(NO_RESPONDERS if status == NO_RESPONDERS_STATUS else msg.data)
