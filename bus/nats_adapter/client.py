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

# A write this soon after the previous one waits for one more event-loop pass.
WRITE_BATCH_SECONDS = 0.0005

class BatchingClient(Client):
    """nats-py's client whose flusher batches under load: when the previous socket
    write was less than :data:`WRITE_BATCH_SECONDS` ago, it lets the event loop
    run one more pass (the I/O that just arrived, the callbacks it wakes) before
    writing, so what they publish shares the write. A quiet connection writes at
    once and never sleeps. The rest is nats-py's own flusher loop."""

    _last_write = 0.0

    async def _flusher(self) -> None:
        assert self._transport, "Client.connect must be called first"
        assert self._flush_queue, "Client.connect must be called first"
        loop = asyncio.get_running_loop()
        while True:
            if not self.is_connected or self.is_connecting:
                break
            future: asyncio.Future[None] = await self._flush_queue.get()
            try:
                if loop.time() - self._last_write < WRITE_BATCH_SECONDS:
                    # Busy: let this loop pass's I/O callbacks publish first.
                    await asyncio.sleep(0)
                if self._pending_data_size > 0:
                    self._transport.writelines(self._pending[:])
                    self._pending = []
                    self._pending_data_size = 0
                    self._last_write = loop.time()
                    await self._transport.drain()  # type: ignore[no-untyped-call]
            except OSError as e:
                await self._error_cb(e)
                await self._process_op_err(e)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break
            finally:
                if not future.done():
                    future.set_result(None)


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
