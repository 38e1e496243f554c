"""Opening the one NATS connection a process owns, and creating the bus state on it.

Streams, the work-queue consumer and the KV buckets are created idempotently by
whichever process connects first (gateways and workers both call
:func:`ensure_bus`), with replicas = min(3, cluster size) unless configured.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError

from clawbus.config import BusConfig, SessionConfig

from . import subjects

log = logging.getLogger("clawbus.bus")

# Timeout of JetStream API calls (publish acks, gets, CAS): every await on the
# network has one.
JS_TIMEOUT = 5.0

# What a bus that is only briefly unavailable raises (a node died, a stream leader
# election, a reconnect in progress): worth retrying, not worth failing a run for.
BUS_UNAVAILABLE: tuple[type[Exception], ...] = (
    TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError)


# A write this soon after the previous one waits for one more event-loop pass.
WRITE_BATCH_SECONDS = 0.0005


# A header name holding whitespace is skipped (as nats-py does: str.isspace, which
# for ASCII also counts \x1c-\x1f).
_NAME_SPACE = re.compile(rb"[\s\x1c-\x1f]")


class BatchingClient(Client):
    """nats-py's client with a flusher that batches under load: when the previous
    socket write was less than :data:`WRITE_BATCH_SECONDS` ago, it lets the event
    loop run one more pass (the I/O that just arrived, the callbacks it wakes)
    before writing, so what they publish shares the write. A quiet connection
    writes at once and never sleeps. Fewer system calls and wake-ups here, in
    nats-server and in the receivers (issue #5, ``bench.profile --ab``: c=16
    non-streaming CPU/request 0.94 and req/s 1.07; 2,000 held streams: CPU 0.94,
    TTFT p99 0.48). The rest is nats-py's own flusher loop."""

    _last_write = 0.0

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        """nats-py's header-block parser, same results (tests/test_connection.py
        compares them), without its per-character generator over every name: a
        batched direct get answers ~10 headers a message, and a history read of
        ~40 turns spent most of a stateful run's worker CPU here (issue #5)."""
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip()
            if _NAME_SPACE.search(name) is not None or not name.isascii():
                continue
            out[name.decode("ascii")] = value.strip().decode("utf-8", "replace")
        return out

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


async def connect(url: str, name: str) -> Client:
    """Connect to NATS (a comma-separated list of cluster URLs is fine), reconnecting forever."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        log.warning("nats disconnected")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    servers = [u.strip() for u in url.split(",") if u.strip()]
    nc = BatchingClient()
    await nc.connect(
        servers=servers,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds: a float is fine
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        pending_size=64 * 1024 * 1024,
    )
    return nc


def _cluster_size(nc: Client) -> int:
    # The servers the client learned about through INFO gossip, itself included.
    return max(1, len({f"{s.hostname}:{s.port}" for s in nc.servers}))


async def ensure_bus(nc: Client, bus: BusConfig, session: SessionConfig) -> JetStreamContext:
    """Create (or update) the RUNS and TX streams, the worker consumer and the KV buckets."""
    js = nc.jetstream(timeout=JS_TIMEOUT)
    replicas = bus.replicas or min(3, _cluster_size(nc))
    runs = js_api.StreamConfig(
        name=subjects.RUNS_STREAM,
        subjects=[subjects.runs_all()],
        retention=js_api.RetentionPolicy.WORK_QUEUE,
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
        allow_direct=True,
    )
    tx = js_api.StreamConfig(
        name=subjects.TX_STREAM,
        subjects=[subjects.transcripts_all()],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
        max_age=session.max_age_days * 86400.0 if session.max_age_days else None,
        duplicate_window=120.0,
        allow_direct=True,
        allow_rollup_hdrs=True,
    )
    for cfg in (runs, tx):
        await _add_or_update_stream(js, cfg)
    await _ensure_consumer(js, bus)
    await js.create_key_value(js_api.KeyValueConfig(
        bucket=subjects.LEASES_BUCKET, history=1, storage=js_api.StorageType.FILE,
        replicas=replicas, direct=True,
    ))
    await js.create_key_value(js_api.KeyValueConfig(
        bucket=subjects.WORKERS_BUCKET, history=1, storage=js_api.StorageType.MEMORY,
        replicas=replicas, ttl=max(3.0, 3 * bus.heartbeat_seconds), direct=True,
    ))
    return js


async def _add_or_update_stream(js: JetStreamContext, cfg: js_api.StreamConfig) -> None:
    try:
        await js.add_stream(cfg)
    except BadRequestError:
        # Exists with another config (e.g. a changed max_age): update what may change.
        await js.update_stream(cfg)


async def _ensure_consumer(js: JetStreamContext, bus: BusConfig) -> None:
    cfg = js_api.ConsumerConfig(
        durable_name=subjects.RUNS_CONSUMER,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=bus.ack_wait_seconds,
        # Naks count as deliveries: a run must never be dropped for being naked.
        max_deliver=-1,
        max_ack_pending=100_000,
        max_waiting=4096,
        deliver_policy=js_api.DeliverPolicy.ALL,
    )
    try:
        await js.add_consumer(subjects.RUNS_STREAM, cfg)
    except BadRequestError:
        log.info("runs consumer exists with another config; keeping it")


def lease_ttl_seconds(bus: BusConfig) -> int:
    """Whole seconds (NATS per-message TTLs are integral). A second shorter than the
    ack wait: both are renewed together every ackWait/3, so a dead holder's lease
    is gone by the time JetStream redelivers its run to another worker."""
    return max(2, math.ceil(bus.ack_wait_seconds) - 1)
