"""Opening the one NATS connection a process owns, and creating the bus state on it.

Streams, the work-queue consumer and the KV buckets are created idempotently by
whichever process connects first (gateways and workers both call
:func:`ensure_bus`), with replicas = min(3, cluster size) unless configured.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError

from clawbus.config import BusConfig, SessionConfig

from . import subjects
from .nats_adapter import AckedPublisher, CoalescingClient
from .payloads import ensure_buckets
from .response_ids import ensure_bucket as ensure_response_ids

log = logging.getLogger("clawbus.bus")

# Timeout of JetStream API calls (publish acks, gets, CAS): every await on the
# network has one.
JS_TIMEOUT = 5.0
# A JetStream publish stored only if the subject's last stored message is this
# sequence (0: none stored), and the error codes of one refused for that.
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = (10071, 10164)

# What a bus that is only briefly unavailable raises (a node died, a stream leader
# election, a reconnect in progress): worth retrying, not worth failing a run for.
BUS_UNAVAILABLE: tuple[type[Exception], ...] = (
    TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError)


async def connect(url: str, name: str) -> Client:
    """Connect to NATS (a comma-separated list of cluster URLs is fine), reconnecting forever."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        log.warning("nats disconnected")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    servers = [u.strip() for u in url.split(",") if u.strip()]
    nc = CoalescingClient()
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


async def stored_seq(js: JetStreamContext, publisher: AckedPublisher | None, subject: str,
                     payload: bytes, headers: dict[str, str]) -> int:
    """Publish to JetStream and return the stored message's sequence: through
    ``publisher`` when there is one (a component that holds the connection), else
    through nats-py's ``js.publish`` with the context's timeout."""
    if publisher is not None:
        ack: dict[str, Any] = await publisher.publish(subject, payload, ack_wait=JS_TIMEOUT,
                                                      headers=headers)
        return int(ack["seq"])
    return int((await js.publish(subject, payload, headers=headers)).seq)


def _cluster_size(nc: Client) -> int:
    # The servers the client learned about through INFO gossip, itself included.
    return max(1, len({f"{s.hostname}:{s.port}" for s in nc.servers}))


async def ensure_bus(nc: Client, bus: BusConfig, session: SessionConfig) -> JetStreamContext:
    """Create (or update) the RUNS and TX streams, the worker consumer, the KV buckets
    and the object buckets of large payloads."""
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
    await ensure_buckets(js, replicas, tx.max_age)
    await ensure_response_ids(js, replicas, tx.max_age)
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
