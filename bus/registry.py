"""Which workers are alive: their heartbeats in the ``WORKERS`` KV bucket.

Every worker writes its entry (key: its id's token, value: a small JSON status)
every :func:`beat_period`; the bucket's TTL removes the entry of a worker that
stopped writing. A worker silent for :func:`dead_after` is taken for dead — by
the gateways that own its runs (:class:`WorkerWatch`), which then hand those
runs to live workers at once instead of waiting for JetStream's ack wait.

The numbers keep detection within 3 heartbeat periods of a death: heartbeats
every half period, death declared after 2 periods of silence, checked every
quarter period. A worker that was only stalled (SIGSTOP, a long pause) and
comes back finds out through the same numbers: once its own last successful
heartbeat is older than :func:`dead_after` minus a margin, it may have been
declared dead, and it does nothing visible or durable until its gateway
confirms the run is still its own (see workers/events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from . import subjects

log = logging.getLogger("clawbus.bus")

# A worker's own view of "I may have been declared dead" starts this much earlier
# than anyone else's (clock rates, delivery delays).
SELF_MARGIN = 0.25


def beat_period(heartbeat_seconds: float) -> float:
    """How often a worker writes its registry entry."""
    return heartbeat_seconds / 2


def dead_after(heartbeat_seconds: float) -> float:
    """Silence after which a worker is taken for dead."""
    return 2 * heartbeat_seconds


def self_alive_until(written_at: float, heartbeat_seconds: float) -> float:
    """Until when (monotonic) a worker whose registry write was asked at
    ``written_at`` cannot have been declared dead by anyone."""
    return written_at + dead_after(heartbeat_seconds) * (1 - SELF_MARGIN)


class WorkerWatch:
    """Follows every worker's heartbeats (a core subscription to the bucket's
    subjects: every put, delete and purge) and calls ``on_lost(worker_id)`` once
    for each worker that falls silent for :func:`dead_after`. A worker that
    deregisters (a clean stop) is forgotten without being reported: it hands
    back its own runs."""

    def __init__(self, nc: Client, js: JetStreamContext, heartbeat_seconds: float,
                 on_lost: Callable[[str], None],
                 on_found: Callable[[str], None] | None = None) -> None:
        self._nc = nc
        self._js = js
        self._heartbeat = heartbeat_seconds
        self._on_lost = on_lost
        self._on_found = on_found  # a worker not known before (or again after loss)
        self._last_seen: dict[str, float] = {}  # worker id -> monotonic time
        self._draining: set[str] = set()  # alive, finishing its runs, taking no new ones
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._prefix = subjects.workers_registry_all()[:-1]

    @property
    def alive(self) -> int:
        """Workers heard from within :func:`dead_after` that take new runs."""
        horizon = time.monotonic() - dead_after(self._heartbeat)
        return sum(1 for worker, seen in self._last_seen.items()
                   if seen > horizon and worker not in self._draining)

    def alone(self, worker_id: str) -> bool:
        """Is ``worker_id`` the only worker heard from within :func:`dead_after`
        (draining ones count: they still run runs)?"""
        horizon = time.monotonic() - dead_after(self._heartbeat)
        return all(worker == worker_id for worker, seen in self._last_seen.items()
                   if seen > horizon)

    def is_alive(self, worker_id: str) -> bool:
        seen = self._last_seen.get(worker_id)
        return seen is not None and seen > time.monotonic() - dead_after(self._heartbeat)

    def seen(self, worker_id: str) -> None:
        """A sign of life from elsewhere (an event the worker sent)."""
        if worker_id:
            self._last_seen[worker_id] = time.monotonic()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(subjects.workers_registry_all(), cb=self._on_entry,
                                             pending_msgs_limit=-1, pending_bytes_limit=-1)
        try:  # the workers alive now (their next heartbeat would tell us too)
            kv = await self._js.key_value(subjects.WORKERS_BUCKET)
            for key in await kv.keys():
                entry = await kv.get(key)
                self._seen_key(key, entry.value or b"")
        except Exception as exc:  # only a head start: the next heartbeats tell us too
            log.debug("worker registry not read at start: %r", exc)
        self._task = asyncio.create_task(self._check_loop(), name="worker-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def _seen_key(self, key: str, value: bytes) -> None:
        try:
            worker = subjects.session_key_from_token(key)
        except ValueError:
            return
        known = worker in self._last_seen
        self._last_seen[worker] = time.monotonic()
        if not known and self._on_found is not None:
            self._on_found(worker)
        try:
            draining = orjson.loads(value).get("draining") is True
        except (orjson.JSONDecodeError, AttributeError):
            draining = False
        if draining:
            self._draining.add(worker)
        else:
            self._draining.discard(worker)

    async def _on_entry(self, msg: Msg) -> None:
        key = msg.subject[len(self._prefix):]
        operation = msg.headers.get("KV-Operation") if msg.headers else None
        if operation in ("DEL", "PURGE"):
            with contextlib.suppress(ValueError):
                worker = subjects.session_key_from_token(key)
                self._last_seen.pop(worker, None)
                self._draining.discard(worker)
            return
        self._seen_key(key, msg.data)

    async def _check_loop(self) -> None:
        period = self._heartbeat / 4
        while True:
            await asyncio.sleep(period)
            horizon = time.monotonic() - dead_after(self._heartbeat)
            lost = [worker for worker, seen in self._last_seen.items() if seen <= horizon]
            for worker in lost:
                del self._last_seen[worker]
                self._draining.discard(worker)
                log.warning("worker %s went silent: taken for dead", worker)
                try:
                    self._on_lost(worker)
                except Exception:
                    log.exception("handling the loss of worker %s failed", worker)
