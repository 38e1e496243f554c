"""Payloads too large for one bus message, in JetStream Object Store buckets.

A NATS message carries at most the server's ``max_payload`` (1 MiB by default),
but a chat request may be up to ``maxBodyBytes`` (20 MB: images, long texts).
Such a run request travels as an object of the ``clawbus_payloads`` bucket
(TTL :data:`PAYLOAD_TTL_SECONDS`: whatever a crashed gateway leaves behind
expires), and the run message carries only its name (``RunRequest.payload``);
the gateway deletes it when the run ends. A session turn too large to store as
one message goes to the ``clawbus_turns`` bucket (kept as long as transcripts
are), the transcript holding a stub that names it (``Turn.body``).

nats-py's object store reads chunk by chunk; objects are read into one buffer
(``writeinto``), not by concatenating bytes per chunk.
"""

from __future__ import annotations

import contextlib
import io

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

PAYLOADS_BUCKET = "clawbus_payloads"
TURNS_BUCKET = "clawbus_turns"
# How long a run's payload is kept at most: longer than any run may wait and run.
PAYLOAD_TTL_SECONDS = 6 * 3600.0
# Room left in a bus message for headers and the protocol line.
HEADROOM = 4096


def fits(size: int, max_payload: int) -> bool:
    """Whether ``size`` bytes travel as one bus message."""
    return size <= max_payload - HEADROOM


async def ensure_buckets(js: JetStreamContext, replicas: int,
                         turns_max_age: float | None) -> None:
    """Create both buckets (idempotent)."""
    for bucket, ttl in ((PAYLOADS_BUCKET, PAYLOAD_TTL_SECONDS), (TURNS_BUCKET, turns_max_age)):
        config = js_api.ObjectStoreConfig(ttl=ttl, storage=js_api.StorageType.FILE,
                                          replicas=replicas)
        with contextlib.suppress(BadRequestError):  # exists with another config: kept
            await js.create_object_store(bucket, config=config)


class PayloadMissingError(Exception):
    """The object is gone (expired, or its run ended)."""


class Objects:
    """One bucket of large payloads."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self._js = js
        self._bucket = bucket
        self._store: ObjectStore | None = None

    async def _opened(self) -> ObjectStore:
        if self._store is None:
            self._store = await self._js.object_store(self._bucket)
        return self._store

    async def put(self, name: str, data: bytes) -> None:
        await (await self._opened()).put(name, data)

    async def get(self, name: str) -> bytes:
        store = await self._opened()
        buffer = io.BytesIO()
        try:
            await store.get(name, writeinto=buffer)
        except (ObjectNotFoundError, NotFoundError):
            raise PayloadMissingError(name) from None
        return buffer.getvalue()

    async def delete(self, name: str) -> None:
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await (await self._opened()).delete(name)
