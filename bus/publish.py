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

import contextlib
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.js import JetStreamContext

from .connection import JS_TIMEOUT
from .direct import Requester

NO_RESPONDERS = "503"


class AckedPublisher(Requester):
    """Publishes to JetStream and waits for the stream's ack; see the module doc."""

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


async def stored_seq(js: JetStreamContext, publisher: AckedPublisher | None, subject: str,
                     payload: bytes, headers: dict[str, str]) -> int:
    """Publish to JetStream and return the stored message's sequence: through
    ``publisher`` when there is one (a component that holds the connection), else
    through nats-py's ``js.publish`` with the context's timeout."""
    if publisher is not None:
        ack = await publisher.publish(subject, payload, ack_wait=JS_TIMEOUT, headers=headers)
        return int(ack["seq"])
    return int((await js.publish(subject, payload, headers=headers)).seq)
