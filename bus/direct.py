"""A NATS subscription whose messages go straight to a plain function.

nats-py delivers a callback subscription's messages through an ``asyncio.Queue``
and a task that awaits the callback for each: per message a queue put, a task
wake-up, a queue get and a coroutine. For the gateway's event subscription — one
message per streamed token — the handler only files the message into its run's
buffer, so :func:`subscribe_direct` hands each message to it synchronously from
nats-py's reader instead (issue #5: fewer calls per token, no task switch).

It relies on two nats-py 2.x internals, both checked by ``tests/test_direct.py``:
the reader calls ``sub._pending_queue.put_nowait(msg)`` after adding the message's
size to ``sub._pending_size``, and the callback task is ``sub._wait_for_msgs_task``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

log = logging.getLogger("clawbus.bus")

Handler = Callable[[Msg], None]


class _Direct:
    """Stands in for a subscription's pending queue: every message put is handled
    at once. The queue methods nats-py calls (drain, unsubscribe) see it empty."""

    __slots__ = ("_handler", "_sub")

    def __init__(self, sub: Subscription, handler: Handler) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)
        try:
            self._handler(msg)
        except Exception:  # never let a bug stop the connection's reader
            log.exception("message handler failed on %s", msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def full(self) -> bool:
        return False

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        return None


async def subscribe_direct(nc: Client, subject: str, handler: Handler,
                           **options: Any) -> Subscription:
    """Subscribe ``handler`` (a plain function, called in message order from the
    connection's reader) to ``subject``; ``options`` go to ``nc.subscribe``."""
    async def relay(msg: Msg) -> None:  # only for what arrives before the switch
        handler(msg)

    sub = await nc.subscribe(subject, cb=relay, **options)
    direct = _Direct(sub, handler)
    queue = sub._pending_queue
    while not queue.empty():  # delivered before the switch: handled first, in order
        direct.put_nowait(queue.get_nowait())
    sub._pending_queue = direct  # type: ignore[assignment]
    task = sub._wait_for_msgs_task
    if task is not None:
        task.cancel()
    return sub


class ReplyInbox:
    """A wildcard inbox, ``_INBOX.<unique>.*``, for answers to requests sent with
    ``reply=``: each answer goes, from nats-py's reader, to ``on_reply(token, msg)``
    where ``token`` is what :meth:`next_reply` put after the prefix. One
    subscription for all of a component's requests (``bus/publish.py``,
    ``bus/batch_get.py``), none of nats-py's per-request machinery."""

    def __init__(self, nc: Client, on_reply: Callable[[str, Msg], None]) -> None:
        self._nc = nc
        self._on_reply = on_reply
        self._prefix = f"_INBOX.{NUID().next().decode()}."
        self._tokens = itertools.count()
        self._sub: Subscription | None = None

    @property
    def started(self) -> bool:
        return self._sub is not None

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await subscribe_direct(self._nc, self._prefix + "*", self._handle,
                                               pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    def next_reply(self) -> tuple[str, str]:
        """A fresh token and the reply subject that carries it."""
        token = str(next(self._tokens))
        return token, self._prefix + token

    def _handle(self, msg: Msg) -> None:
        self._on_reply(msg.subject[len(self._prefix):], msg)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


class Waiter(Protocol):
    """What a request waits on: ``take`` is given each answer (from the reader) and
    resolves ``done`` once the request is answered in full."""

    done: asyncio.Future[Any]

    def take(self, msg: Msg) -> None: ...


class _One:
    """A request answered by its first message."""

    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future[Msg]) -> None:
        self.done = done

    def take(self, msg: Msg) -> None:
        self.done.set_result(msg)


class Requester:
    """Requests answered on one :class:`ReplyInbox`: per request a token, a waiter
    and a timer; answers go from nats-py's reader to the waiter. (nats-py's
    ``request`` adds a NUID token, two futures, ``wait_for`` and the reply's trip
    through a queue and a task.)"""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._waiting: dict[str, Waiter] = {}
        self._inbox = ReplyInbox(nc, self._on_reply)
        self._starting: asyncio.Lock | None = None

    @property
    def started(self) -> bool:
        return self._inbox.started

    async def start(self) -> None:
        await self._inbox.start()

    async def ensure_started(self) -> None:
        """Start on first use (concurrent first uses subscribe once)."""
        if self._inbox.started:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            await self._inbox.start()

    async def close(self) -> None:
        await self._inbox.close()

    def _on_reply(self, token: str, msg: Msg) -> None:
        waiter = self._waiting.get(token)
        if waiter is not None and not waiter.done.done():
            waiter.take(msg)

    async def exchange(self, subject: str, payload: bytes, waiter: Waiter, *, wait: float,
                       headers: dict[str, str] | None = None) -> None:
        """Send, then wait at most ``wait`` s for ``waiter.done`` (nats-py's
        TimeoutError when it is not)."""
        if not self._inbox.started:
            raise nats.errors.ConnectionClosedError
        token, reply = self._inbox.next_reply()
        self._waiting[token] = waiter
        timer = asyncio.get_running_loop().call_later(wait, _expire, waiter.done)
        try:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
            await waiter.done
        finally:
            timer.cancel()
            self._waiting.pop(token, None)

    async def request(self, subject: str, payload: bytes, *, wait: float,
                      headers: dict[str, str] | None = None) -> Msg:
        """Send and wait at most ``wait`` s for the answer (nats-py's TimeoutError)."""
        waiter = _One(asyncio.get_running_loop().create_future())
        await self.exchange(subject, payload, waiter, wait=wait, headers=headers)
        result: Msg = waiter.done.result()
        return result
