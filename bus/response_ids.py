"""Which session each ``/v1/responses`` response belongs to, kept on the bus.

``previous_response_id`` (SPEC §10) continues the session of an earlier
response, whichever gateway created it: every response id is recorded in the
``clawbus_responses`` KV bucket with its session key and agent, and kept as
long as transcripts are (``session.maxAgeDays``; 0 keeps them forever).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import nats.errors
import orjson
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

RESPONSES_BUCKET = "clawbus_responses"

# Ids this gateway hands out are `resp_<hex>`; a client's id outside this alphabet
# (which is also safe as a KV key) cannot be one of them.
_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")


async def ensure_bucket(js: JetStreamContext, replicas: int, max_age: float | None) -> None:
    """Create the bucket (idempotent; one that exists with another config is kept)."""
    config = js_api.KeyValueConfig(bucket=RESPONSES_BUCKET, history=1, ttl=max_age or None,
                                   storage=js_api.StorageType.FILE, replicas=replicas,
                                   direct=True)
    with contextlib.suppress(BadRequestError):
        await js.create_key_value(config)


class ResponseIdsError(Exception):
    """The bucket could not be read or written (the bus is unavailable)."""


@dataclass(frozen=True, slots=True)
class ResponseSession:
    """The session a response continues, and the agent that answered it."""

    session_key: str
    agent_id: str


class ResponseIds:
    """The bucket of one gateway process (opened on first use)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(RESPONSES_BUCKET)
        return self._kv

    async def record(self, response_id: str, session: ResponseSession) -> None:
        """Remember ``response_id`` (a put acknowledged by the store); raises
        :class:`ResponseIdsError`."""
        value = orjson.dumps({"sessionKey": session.session_key, "agentId": session.agent_id})
        try:
            await (await self._bucket()).put(response_id, value)
        except (nats.errors.Error, TimeoutError) as exc:
            raise ResponseIdsError(f"could not record response {response_id}: {exc!r}") from exc

    async def lookup(self, response_id: str) -> ResponseSession | None:
        """The session of ``response_id``; None when it is unknown, expired or malformed.
        Raises :class:`ResponseIdsError`."""
        if not _RESPONSE_ID.fullmatch(response_id):
            return None
        try:
            entry = await (await self._bucket()).get(response_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise ResponseIdsError(f"could not look up response {response_id}: {exc!r}") \
                from exc
        try:
            data = orjson.loads(entry.value or b"")
            return ResponseSession(str(data["sessionKey"]), str(data["agentId"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
