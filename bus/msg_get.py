"""One stored message, read from the stream leader, without nats-py's request path.

``JetStreamManager.get_msg`` (the ``$JS.API.STREAM.MSG.GET`` API: answered by
the stream's leader, so never stale) costs a nats-py request, ``json.loads`` and
an ``email.parser`` pass over the message's headers (~75 µs on the benchmark
VM). A stateful run makes two such reads before it starts (is it the head of
its session's queue; the session's last turn), so :class:`LeaderGet` sends them
through a :class:`~bus.direct.Requester` and decodes the answer with orjson,
base64 and the connection's header parser. Not-found is ``None``; other errors
are nats-py's, as :func:`bus.publish.api_answer` raises them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import nats.js.errors
import orjson

from .connection import JS_TIMEOUT, BatchingClient
from .direct import Requester
from .publish import NO_RESPONDERS, api_answer

API_PREFIX = "$JS.API"
_HEADER_LINE = b"NATS/1.0"


@dataclass(frozen=True, slots=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


class LeaderGet:
    """Reads single messages of a stream from its leader through a
    :class:`~bus.direct.Requester` (started on first use); see the module doc."""

    def __init__(self, requester: Requester, *, wait: float = JS_TIMEOUT) -> None:
        self._requester = requester
        self._wait = wait

    async def last(self, stream: str, subject: str) -> StoredMsg | None:
        """The newest message on ``subject``, or None."""
        return await self._get(stream, {"last_by_subj": subject})

    async def next(self, stream: str, seq: int, subject: str) -> StoredMsg | None:
        """The first message on ``subject`` at or after sequence ``seq``, or None."""
        return await self._get(stream, {"seq": seq, "next_by_subj": subject})

    async def _get(self, stream: str, request: dict[str, Any]) -> StoredMsg | None:
        await self._requester.ensure_started()
        msg = await self._requester.request(f"{API_PREFIX}.STREAM.MSG.GET.{stream}",
                                            orjson.dumps(request), wait=self._wait)
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            raise nats.js.errors.ServiceUnavailableError  # as nats-py: no JetStream
        try:
            answer = api_answer(msg.data)
        except nats.js.errors.NotFoundError:
            return None
        return _stored(answer.get("message"))


def _stored(raw: object) -> StoredMsg:
    if not isinstance(raw, dict):
        raise nats.js.errors.APIError(description="JetStream answer without a message")
    try:
        seq = int(raw["seq"])
        subject = str(raw["subject"])
        data = base64.b64decode(raw.get("data") or b"", validate=True)
        hdrs = base64.b64decode(raw.get("hdrs") or b"", validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise nats.js.errors.APIError(
            description=f"unreadable JetStream message: {exc!r}"[:300]) from None
    headers: dict[str, str] = {}
    if hdrs.startswith(_HEADER_LINE):
        _, _, block = hdrs.partition(b"\r\n")
        headers = BatchingClient._parse_header_lines(block)
    return StoredMsg(seq, subject, data, headers)
