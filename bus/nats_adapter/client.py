"""The nats-py internals clawbus relies on (see the package doc for the list and
the tests that guard each one)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

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
    connection's reader) to ``subject``; ``options`` go to ``nc.subscribe``.

    nats-py's reader puts each message into the subscription's pending queue
    (after adding its size to the pending size) and a task awaits the callback
    for each; here the queue is replaced by one that calls ``handler`` at once,
    and the task is cancelled."""
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


def consumer_name(sub: JetStreamContext.PushSubscription) -> str | None:
    """The server-side consumer of a JetStream push subscription (nats-py keeps it
    private), so that an ordered consumer can be deleted after use."""
    name = getattr(sub, "_consumer", None)
    return name if isinstance(name, str) else None


class CoalescingClient(Client):
    """nats-py's client, with its flusher waiting one more turn of the event loop
    before it writes.

    nats-py writes everything published so far each time its flusher task wakes,
    and it wakes on the loop turn after the first publish: a process running many
    runs at once makes one ``write`` system call for nearly every step of every
    run (on loopback TCP the sender's call also pays for the receiver's side).
    One more turn lets the publishes that other runs make meanwhile join the same
    write, and one write answers every flush asked for until then (nats-py's
    spends a loop turn on each); it costs no timer and a few microseconds of
    latency. (Measured in ``docs/BENCHMARKS.md``.)

    Overrides ``Client._flusher`` (nats-py's body, with those two changes) and so
    relies on ``_flush_queue``, ``_pending``, ``_pending_data_size``,
    ``_transport``, ``_error_cb`` and ``_process_op_err``; guarded by
    ``tests/test_nats_adapter.py``."""

    async def _flusher(self) -> None:
        assert self._transport, "Client.connect must be called first"
        assert self._flush_queue, "Client.connect must be called first"
        while True:
            if not self.is_connected or self.is_connecting:
                break
            future: asyncio.Future[None] = await self._flush_queue.get()
            try:
                await asyncio.sleep(0)  # the one change: let this turn's publishes join
                if self._pending_data_size > 0:
                    self._transport.writelines(self._pending[:])
                    self._pending = []
                    self._pending_data_size = 0
                    await self._transport.drain()  # type: ignore[no-untyped-call]
            except OSError as e:
                await self._error_cb(e)
                await self._process_op_err(e)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break  # (the loop is closing)
            finally:
                _resolve(future)
                # Every flush asked for so far was served by this write: without
                # this, each queued request would cost a loop turn of its own.
                while not self._flush_queue.empty():
                    _resolve(self._flush_queue.get_nowait())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # (it may have been cancelled: nats-py issue #624)
        future.set_result(None)
