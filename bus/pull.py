"""A continuous pull consumer: JetStream messages handed over one by one as they
arrive, as many in flight as the caller has room for.

Why not nats-py's ``PullSubscription.fetch``: ``fetch(batch=n)`` returns a batch,
and when its first probe finds nothing it waits for the *whole* batch (or its
timeout) before returning what it already holds. With several workers sharing
the consumer, a run can sit in a worker's hands for the full fetch timeout.
Here every message goes to the
callback the moment it arrives (like nats.go's ``Consume``):

- pull requests (``$JS.API.CONSUMER.MSG.NEXT``) ask for exactly the free room,
  with an expiry and idle heartbeats, and are topped up as room frees — once
  at least ``min_batch`` is missing, or when nothing is outstanding (not one
  request per handled message: each request is a message to the server, and a
  batch-1 request that outlives its use ends in a 408 later, another one);
- the outstanding credit is one total: each message takes one, and a
  ``408``/``409`` status ends a request with its ``Nats-Pending-Messages`` left
  unused. (The server spreads messages over a client's waiting requests and
  ends them in any order, so per-request bookkeeping cannot tell which request
  a message or a status belongs to; a FIFO of remainders drifted above the
  server's count and, once requests were batched, starved the worker.)
- no message, status or heartbeat for two heartbeat periods (a reconnect to
  another cluster node loses the requests) → forget the credit and ask again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("clawbus.bus")

EXPIRES_SECONDS = 10.0
HEARTBEAT_SECONDS = 2.0
_STATUS = "Status"
_PENDING = "Nats-Pending-Messages"


class PullConsumer:
    def __init__(self, nc: Client, stream: str, consumer: str,
                 on_message: Callable[[Msg], Awaitable[None]], room: Callable[[], int], *,
                 expires: float = EXPIRES_SECONDS, heartbeat: float = HEARTBEAT_SECONDS,
                 min_batch: int = 1) -> None:
        """``on_message`` must not block (it should start a task); ``room()`` says how
        many more messages the caller can take now."""
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._on_message = on_message
        self._room = room
        self._requests = 0  # pull requests still alive on the server, as far as we know
        self._outstanding = 0
        self._inbox = ""
        self._sub: Subscription | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_seen = time.monotonic()
        self._stopping = False
        self._expires = expires
        self._heartbeat = heartbeat
        self._min_batch = max(1, min_batch)

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._received,
                                             pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._task = asyncio.create_task(self._top_up_loop(), name="pull-top-up")

    def room_changed(self) -> None:
        """Call when the caller's room grew (a message was handled)."""
        self._wake.set()

    async def stop(self) -> None:
        """Ask for nothing more; messages still arriving go to the callback, which
        should hand them back (nak) once its owner is stopping."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _received(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self._consume_credit(1)
            if not self._outstanding:
                self._wake.set()  # out of credit: ask again whatever min_batch says
            await self._on_message(msg)
            return
        if status == "100":  # idle heartbeat: the requests are alive
            return
        # 404/408/409: a request ended with what it still had pending.
        self._requests = max(0, self._requests - 1)
        pending = msg.headers.get(_PENDING) if msg.headers else None
        if pending and pending.isdigit():
            self._outstanding = max(0, self._outstanding - int(pending))
        if not self._requests:
            self._outstanding = 0  # nothing left on the server to deliver
        if status not in ("404", "408"):
            log.warning("pull request ended: %s %s", status,
                        msg.headers.get("Description", "") if msg.headers else "")
        self._wake.set()

    def _consume_credit(self, n: int) -> None:
        self._outstanding = max(0, self._outstanding - n)
        if not self._outstanding:
            self._requests = 0  # all fulfilled: the server ends them without a status

    async def _top_up_loop(self) -> None:
        while not self._stopping:
            if (self._outstanding and
                    time.monotonic() - self._last_seen > 2 * self._heartbeat + 1):
                log.warning("pull requests went silent (reconnected?): asking again")
                self._requests = 0
                self._outstanding = 0
            want = self._room() - self._outstanding
            if want > 0 and (want >= self._min_batch or not self._outstanding):
                try:
                    await self._request(want)
                except Exception as exc:  # reconnecting: try again shortly
                    log.warning("pull request failed: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat):
                    await self._wake.wait()

    async def _request(self, batch: int) -> None:
        body = orjson.dumps({"batch": batch, "expires": int(self._expires * 1e9),
                             "idle_heartbeat": int(self._heartbeat * 1e9)})
        await self._nc.publish(self._next_subject, body, reply=self._inbox)
        if not self._outstanding:
            self._last_seen = time.monotonic()
        # (Counted once sent: the answers arrive through callbacks, after this.)
        self._requests += 1
        self._outstanding += batch
