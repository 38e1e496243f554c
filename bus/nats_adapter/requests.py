"""Requests answered on one reply subscription per process.

A :class:`Requester` subscribes once to a wildcard inbox ``_INBOX.<unique>.*``
(with :func:`~.client.subscribe_direct`: answers go from nats-py's reader
straight to the waiting request). Each request's reply subject carries a counter
token, and one timer bounds its wait. nats-py's ``request`` costs, per call, a
NUID and random token, two futures and a done callback, ``asyncio.wait_for``
(another future and a timer) and the reply's trip through the request mux
subscription's queue and task.

Three ways to use it:

- :meth:`Requester.request`: send and wait for the first answer;
- :meth:`Requester.exchange`: send and feed every answer to a :class:`Waiter`
  until it is satisfied (JetStream's batched direct get answers with many
  messages);
- :meth:`Requester.send`: send now, await the answer later or never (the
  workers' liveness probes, whose answer travels while the run goes on).

:class:`AckedPublisher` adds the JetStream publish + ack on top. Errors are
nats-py's, so callers treat them the same way whichever path they took: no
stream bound to the subject → :class:`nats.js.errors.NoStreamResponseError`, no
answer in time → :class:`nats.errors.TimeoutError`, a JetStream error reply →
:class:`nats.js.errors.APIError` (its subclass for the code, e.g.
``ServiceUnavailableError`` for 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any, Protocol

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from .client import subscribe_direct

# The status NATS answers a request with when nobody subscribes to its subject.
NO_RESPONDERS = "503"


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def _unanswered(future: asyncio.Future[Msg | None]) -> None:
    if not future.done():
        future.set_result(None)


class Waiter(Protocol):
    """What a request waits on: ``take`` is given each answer (from the reader) and
    resolves ``done`` once the request is answered in full."""

    done: asyncio.Future[Any]

    def take(self, msg: Msg) -> None: ...


class _One:
    """A request answered by its first message."""

    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future[Any]) -> None:
        self.done = done

    def take(self, msg: Msg) -> None:
        self.done.set_result(msg)


class Requester:
    """The one request/reply inbox of a component; see the module doc. Start it
    with :meth:`start` (or let :meth:`ensure_started` do it on first use)."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._waiting: dict[str, Waiter] = {}
        self._prefix = f"_INBOX.{NUID().next().decode()}."
        self._tokens = itertools.count()
        self._sub: Subscription | None = None
        self._starting: asyncio.Lock | None = None

    @property
    def started(self) -> bool:
        return self._sub is not None

    @property
    def waiting(self) -> int:
        """Requests sent and not yet answered, timed out or given up."""
        return len(self._waiting)

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await subscribe_direct(self._nc, self._prefix + "*", self._on_reply,
                                               pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def ensure_started(self) -> None:
        """Start on first use (concurrent first uses subscribe once)."""
        if self._sub is not None:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            await self.start()

    async def close(self) -> None:
        """Unsubscribe; requests still waiting fail with nats-py's ConnectionClosedError
        (answers awaited later, from :meth:`send`, are cancelled)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            if not waiter.done.done():
                if isinstance(waiter, _Later):
                    waiter.done.cancel()
                else:
                    waiter.done.set_exception(nats.errors.ConnectionClosedError())

    def _next_reply(self) -> tuple[str, str]:
        token = str(next(self._tokens))
        return token, self._prefix + token

    def _on_reply(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.subject[len(self._prefix):])
        if waiter is not None and not waiter.done.done():
            waiter.take(msg)

    async def exchange(self, subject: str, payload: bytes, waiter: Waiter, *, wait: float,
                       headers: dict[str, str] | None = None) -> None:
        """Send, then wait at most ``wait`` s for ``waiter.done`` (nats-py's
        TimeoutError when it is not)."""
        if self._sub is None:
            raise nats.errors.ConnectionClosedError
        token, reply = self._next_reply()
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

    async def send(self, subject: str, payload: bytes, *,
                   wait: float) -> asyncio.Future[Msg | None]:
        """Send now; the answer's future, resolved with the answer, or with None
        when none came within ``wait`` s. Cancel it to stop waiting."""
        if self._sub is None:
            raise nats.errors.ConnectionClosedError
        loop = asyncio.get_running_loop()
        token, reply = self._next_reply()
        later = _Later(loop.create_future())
        self._waiting[token] = later
        timer = loop.call_later(wait, _unanswered, later.done)

        def forget(_: asyncio.Future[Msg | None]) -> None:
            timer.cancel()
            self._waiting.pop(token, None)

        later.done.add_done_callback(forget)
        try:
            await self._nc.publish(subject, payload, reply=reply)
        except BaseException:
            later.done.cancel()
            raise
        return later.done


class _Later(_One):
    """An answer awaited later (:meth:`Requester.send`)."""

    __slots__ = ()


class AckedPublisher(Requester):
    """A :class:`Requester` that also publishes to JetStream and waits for the
    stream's ack."""

    async def publish(self, subject: str, payload: bytes, *, ack_wait: float,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Store ``payload`` on ``subject``; the ack (``stream``, ``seq``,
        ``duplicate``…) as JetStream sent it, waited for at most ``ack_wait`` s."""
        msg = await self.request(subject, payload, wait=ack_wait, headers=headers)
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            raise nats.js.errors.NoStreamResponseError
        return api_answer(msg.data)


def api_answer(data: bytes) -> dict[str, Any]:
    """A JetStream API answer as a dict; its ``error`` raised as nats-py's
    :class:`~nats.js.errors.APIError` subclass for the code (404 → NotFoundError…)."""
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise nats.js.errors.APIError(description=f"unreadable JetStream answer: "
                                                  f"{data[:200]!r}")
    error = answer.get("error")
    if error is not None:
        with contextlib.suppress(KeyError, TypeError):  # (not JetStream's shape)
            nats.js.errors.APIError.from_error(error)  # raises the code's subclass
        raise nats.js.errors.APIError(description=f"JetStream error: {error!r}"[:300])
    return answer
