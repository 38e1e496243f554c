"""JetStream publish + ack on one reply subscription, without nats-py's request path.

``JetStreamContext.publish`` is ``nc.request`` plus a JSON parse: per call a NUID
and random token, two futures and a done callback, ``asyncio.wait_for`` (another
future and a timer), the reply routed through the request mux subscription's
queue and task (a task wake-up and a coroutine), then ``json.loads`` and a
``PubAck`` dataclass. :class:`AckedPublisher` keeps the protocol and the errors
and drops the rest: the reply subject carries a counter, the reply goes straight
from nats-py's reader to the waiting future (:func:`~bus.direct.subscribe_direct`),
one timer bounds the wait, and the ack is parsed with orjson (issue #5: the run
publish is on every request's path in the gateway).

Errors are nats-py's, so callers keep treating them the same way: no stream bound
to the subject → :class:`nats.js.errors.NoStreamResponseError`, no answer in time
→ :class:`nats.errors.TimeoutError`, a JetStream error reply →
:class:`nats.js.errors.APIError` (its subclass for the code, e.g.
``ServiceUnavailableError`` for 503).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .direct import ReplyInbox

NO_RESPONDERS = "503"
JS_ACK_WAIT = 5.0  # as bus.connection.JS_TIMEOUT, nats-py's JetStream context timeout


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


class AckedPublisher:
    """Publishes to JetStream and waits for the stream's ack; see the module doc."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._inbox = ReplyInbox(nc, self._on_reply)

    async def start(self) -> None:
        await self._inbox.start()

    async def close(self) -> None:
        await self._inbox.close()

    def _on_reply(self, token: str, msg: Msg) -> None:
        future = self._waiting.pop(token, None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def publish(self, subject: str, payload: bytes, *, ack_wait: float,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Store ``payload`` on ``subject``; the ack (``stream``, ``seq``,
        ``duplicate``…) as JetStream sent it, waited for at most ``ack_wait`` s."""
        if not self._inbox.started:
            raise nats.errors.ConnectionClosedError
        token, reply = self._inbox.next_reply()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(ack_wait, _expire, future)
        try:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
            msg = await future
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            raise nats.js.errors.NoStreamResponseError
        try:
            ack = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            ack = None
        if not isinstance(ack, dict):
            raise nats.js.errors.APIError(description=f"unreadable JetStream ack: "
                                                      f"{msg.data[:200]!r}")
        error = ack.get("error")
        if error is not None:
            with contextlib.suppress(KeyError, TypeError):  # (not JetStream's shape)
                nats.js.errors.APIError.from_error(error)  # raises the code's subclass
            raise nats.js.errors.APIError(description=f"JetStream error: {error!r}"[:300])
        return ack


async def stored_seq(js: JetStreamContext, publisher: AckedPublisher | None, subject: str,
                     payload: bytes, headers: dict[str, str]) -> int:
    """Publish to JetStream and return the stored message's sequence: through
    ``publisher`` when there is one (a component that holds the connection), else
    through nats-py's ``js.publish`` with the context's timeout."""
    if publisher is not None:
        ack = await publisher.publish(subject, payload, ack_wait=JS_ACK_WAIT, headers=headers)
        return int(ack["seq"])
    return int((await js.publish(subject, payload, headers=headers)).seq)
