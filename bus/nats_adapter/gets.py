"""Reading stored messages: single messages from the stream leader, and runs of
one subject's messages with JetStream's batched direct get.

:class:`LeaderGet` reads one message from the stream leader (never stale).

:class:`BatchGetter`: ``$JS.API.DIRECT.GET.<stream>`` with ``{"seq": S, "next_by_subj": subject,
"batch": N}`` (nats-server 2.11+, streams with ``allow_direct``) answers with up
to N messages of that subject from sequence S on, then an end-of-batch status
(``204 EOB``, with ``Nats-Num-Pending``: how many are left), or ``404`` when
there is none. No consumer is created: reading a session's transcript with an
ordered consumer left one ephemeral consumer behind per read until the server
reaped it, and past 1,000 of them JetStream refused new ones ("maximum
consumers limit reached"), failing every stateful run.

A direct get may be answered by any replica of the stream, which may lag. The
caller says which sequence it knows exists (read from the leader), and
:meth:`BatchGetter.read` returns None unless the answer reached it, so the caller
can fall back to a leader read. A server that ignores ``batch`` (before 2.11)
answers one plain message: the reader notices (no ``Nats-Num-Pending``) and asks
again from the next sequence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg

from .requests import NO_RESPONDERS, Requester, api_answer

API_PREFIX = "$JS.API"

# A header name holding whitespace is skipped (as nats-py does: str.isspace, which
# for ASCII also counts \x1c-\x1f).
_NAME_SPACE = re.compile(rb"[\s\x1c-\x1f]")
_HEADER_LINE = b"NATS/1.0"


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """Header lines (after the ``NATS/1.0`` line) as nats-py parses a delivered
    message's (tests/test_connection.py compares the two)."""
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


def parse_header_block(raw: bytes) -> dict[str, str]:
    """The headers of a ``NATS/1.0`` header block (as JetStream returns them in a
    stored message's ``hdrs``), parsed as nats-py parses delivered messages'."""
    if not raw.startswith(_HEADER_LINE):
        return {}
    return parse_header_lines(raw.partition(b"\r\n")[2])


@dataclass(frozen=True, slots=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


class LeaderGet:
    """Reads single messages of a stream from its leader through a
    :class:`Requester` (started on first use).

    ``STREAM.MSG.GET`` is answered by the stream's leader, so never stale.
    nats-py's ``JetStreamManager.get_msg`` costs a nats-py request, ``json.loads``
    and an ``email.parser`` pass over the headers; this decodes the answer with
    orjson, base64 and :func:`parse_header_block`. Not-found is ``None``; other
    errors are nats-py's, as :func:`api_answer` raises them."""

    def __init__(self, requester: Requester, *, wait: float) -> None:
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
    return StoredMsg(seq, subject, data, parse_header_block(hdrs))


BATCH = 256


@dataclass(slots=True)
class _Answer:
    """The messages of one batch request, as they arrive (a :class:`Waiter`)."""

    done: asyncio.Future[None]
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    pending: int = 0  # messages of the subject after this batch (EOB's count)
    batched: bool = True  # False: the server answered one plain message

    def take(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None:
            if status == "204":
                try:
                    self.pending = int(headers.get("Nats-Num-Pending", "0"))
                except ValueError:
                    self.pending = 0
            self.done.set_result(None)  # end of batch, 404 (none), or an error
            return
        try:
            seq = int(headers["Nats-Sequence"])
        except (KeyError, ValueError):
            self.done.set_exception(nats.errors.Error(
                f"direct get answered without a sequence: {headers!r}"[:300]))
            return
        self.messages.append((seq, msg.data))
        if "Nats-Num-Pending" not in headers:  # a server without batches: one message
            self.batched = False
            self.done.set_result(None)


class BatchGetter:
    """Batched direct gets through a :class:`Requester` (started on first use);
    see the module doc."""

    def __init__(self, requester: Requester, *, batch: int = BATCH) -> None:
        self._requester = requester
        self._batch = batch

    async def _ask(self, stream: str, subject: str, start: int, wait: float) -> _Answer:
        await self._requester.ensure_started()
        answer = _Answer(asyncio.get_running_loop().create_future())
        request = {"seq": start, "next_by_subj": subject, "batch": self._batch}
        await self._requester.exchange(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(request),
                                       answer, wait=wait)
        return answer

    async def read(self, stream: str, subject: str, start: int, last: int, *,
                   wait: float) -> list[tuple[int, bytes]] | None:
        """``subject``'s messages with sequences in ``start..last`` (``last`` known
        to exist), in order: (sequence, data) pairs, or None if the replica that
        answered did not have them all (it lags)."""
        out: list[tuple[int, bytes]] = []
        seq = max(1, start)
        while True:
            answer = await self._ask(stream, subject, seq, wait)
            for found, data in answer.messages:
                if found >= last:
                    if found > last:
                        return None  # ``last`` is not there (deleted meanwhile)
                    out.append((found, data))
                    return out
                out.append((found, data))
            if not answer.messages or (answer.batched and answer.pending == 0):
                return None  # the answer ended before ``last``: a lagging replica
            seq = answer.messages[-1][0] + 1
