"""Session leases: at most one worker runs a session at a time.

A lease is the latest message on ``$KV.LEASES.<sessionToken>``, written with a
per-message TTL so that a dead holder's lease disappears by itself. Every write
is a compare-and-set on the subject's last sequence (the revision), so:

- acquire succeeds only if the key is absent or holds the ``free`` marker;
- refresh succeeds only if nobody wrote since our last write (fencing: a holder
  that stalled past the TTL finds out here and must stop emitting);
- release writes the ``free`` marker at our revision (with a 1 s TTL, so idle
  sessions leave nothing behind) and can never clobber a newer holder.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from . import subjects
from .publish import AckedPublisher, stored_seq

_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_TTL = "Nats-TTL"
_WRONG_LAST_SEQUENCE = (10071, 10164)
FREE = b"free"


class Leases:
    def __init__(self, js: JetStreamContext, ttl_seconds: int,
                 publisher: AckedPublisher | None = None) -> None:
        self._js = js
        self._publisher = publisher
        self._ttl = str(ttl_seconds)
        self._stream = f"KV_{subjects.LEASES_BUCKET}"

    def _subject(self, token: str) -> str:
        return f"$KV.{subjects.LEASES_BUCKET}.{token}"

    async def _cas(self, token: str, value: bytes, last: int, ttl: str) -> int | None:
        try:
            return await stored_seq(self._js, self._publisher, self._subject(token), value,
                                    {_EXPECTED_LAST_SUBJECT_SEQ: str(last), _TTL: ttl})
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise

    async def acquire(self, token: str, owner: bytes) -> int | None:
        """Take the session's lease; the revision to refresh/release with, or None if held."""
        rev = await self._cas(token, owner, 0, self._ttl)
        if rev is not None:
            return rev
        try:
            current = await self._js.get_msg(
                self._stream, subject=self._subject(token), direct=False)
        except NotFoundError:
            # Expired between our two calls: try once more from empty.
            return await self._cas(token, owner, 0, self._ttl)
        if current.data != FREE or current.seq is None:
            return None
        return await self._cas(token, owner, int(current.seq), self._ttl)

    async def refresh(self, token: str, owner: bytes, revision: int) -> int | None:
        """Extend our lease; None means it was lost (expired and maybe taken)."""
        return await self._cas(token, owner, revision, self._ttl)

    async def release(self, token: str, revision: int) -> None:
        await self._cas(token, FREE, revision, "1")
