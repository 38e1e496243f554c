"""Liveness probes to gateways whose answers can be awaited later.

A probe is an event published with a reply subject (through the worker's one
:class:`~bus.nats_adapter.Requester`); the gateway answers ``ok`` or ``gone``
and, if no gateway subscribes any more, NATS itself answers with a ``503``
status (no responders). A run's ``accepted`` probe must not wait for its answer:
the worker starts the provider call while the answer travels, and awaits it
only before anything durable happens (the turn stored, the run acked). So
:func:`send_probe` publishes at once — in order with the run's other events —
and returns a :class:`Probe` to await later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.msg import Msg

from bus.nats_adapter import NO_RESPONDERS as NO_RESPONDERS_STATUS
from bus.nats_adapter import Requester

NO_RESPONDERS = b"\x00no-responders"  # what a probe answers when nobody listens


def _answer(msg: Msg | None) -> bytes | None:
    if msg is None:
        return None
    status = msg.headers.get("Status") if msg.headers else None
    return NO_RESPONDERS if status == NO_RESPONDERS_STATUS else msg.data


class Probe:
    """One sent probe; :meth:`reply` waits for its answer."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[Msg | None]) -> None:
        self._future = future

    async def reply(self) -> bytes | None:
        """The gateway's answer, :data:`NO_RESPONDERS`, or None if none came in time
        (a busy gateway is not a dead one)."""
        return _answer(await asyncio.shield(self._future))

    def on_answer(self, callback: Callable[[bytes | None], None]) -> None:
        """Call ``callback`` with the answer as soon as it is known (not if the
        probe is given up)."""
        def answered(future: asyncio.Future[Msg | None]) -> None:
            if not future.cancelled():
                callback(_answer(future.result()))

        self._future.add_done_callback(answered)


async def send_probe(requests: Requester, subject: str, data: bytes,
                     answer_within: float) -> Probe:
    """Publish ``data`` on ``subject`` as a request; its answer is awaited later."""
    return Probe(await requests.send(subject, data, wait=answer_within))
