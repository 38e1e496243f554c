"""Session leases: at most one worker runs a session at a time.

A lease is the latest message on ``$KV.LEASES.<sessionToken>``, written with a
per-message TTL so that a dead holder's lease disappears by itself. Every write
is a compare-and-set on the subject's last sequence (the revision), so:

- acquire succeeds only if the key is absent or holds the ``free`` marker;
- refresh succeeds only if nobody wrote since our last write (fencing: a holder
  that stalled past the TTL finds out here and must stop emitting);
- release writes the ``free`` marker at our revision and can never clobber a
  newer holder. The marker lives :data:`FREE_TTL_SECONDS` (idle sessions leave nothing
  behind after that): a worker that released a lease remembers the marker's
  revision, and its next acquire of the session is a compare-and-set at that
  revision — one round trip that also proves nobody held the lease since, so the
  history it cached is still the transcript's (``workers/session_cache.py``);
- :meth:`Leases.touch` rewrites a free marker (a session reset), so such proofs
  made against the old one fail.

:class:`Leases` is the store; :class:`SessionLease` is one worker's hold on one
session's lease while it runs a turn.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from . import subjects
from .connection import EXPECTED_LAST_SUBJECT_SEQ, WRONG_LAST_SEQUENCE, stored_seq
from .nats_adapter import AckedPublisher


def lease_owner(worker_id: str) -> bytes:
    """What a worker writes into the leases it holds."""
    return orjson.dumps({"worker": worker_id})


_TTL = "Nats-TTL"
FREE = b"free"
FREE_TTL_SECONDS = 300  # how long a free marker (and the proof it carries) is kept


class Leases:
    def __init__(self, js: JetStreamContext, ttl_seconds: int,
                 publisher: AckedPublisher | None = None, *,
                 free_ttl_seconds: int = FREE_TTL_SECONDS) -> None:
        self._js = js
        self._publisher = publisher
        self.ttl_seconds = ttl_seconds
        self._ttl = str(ttl_seconds)
        self._free_ttl = str(free_ttl_seconds)
        self._stream = f"KV_{subjects.LEASES_BUCKET}"

    async def _cas(self, token: str, value: bytes, last: int, ttl: str) -> int | None:
        try:
            return await stored_seq(self._js, self._publisher, subjects.lease_key(token), value,
                                    {EXPECTED_LAST_SUBJECT_SEQ: str(last), _TTL: ttl})
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                return None
            raise

    async def acquire(self, token: str, owner: bytes) -> int | None:
        """Take the session's lease; the revision to refresh/release with, or None if held."""
        rev = await self._cas(token, owner, 0, self._ttl)
        if rev is not None:
            return rev
        return await self._acquire_free(token, owner)

    async def acquire_at(self, token: str, owner: bytes, expected: int) -> tuple[int, bool] | None:
        """Take the session's lease, trying first at ``expected`` (the revision of a
        free marker this worker wrote: never a holder's revision, which this would
        take over); the revision, and whether it was taken there (nobody held the
        lease in between); None if held."""
        rev = await self._cas(token, owner, expected, self._ttl)
        if rev is not None:
            return rev, True
        rev = await self._acquire_free(token, owner)
        return None if rev is None else (rev, False)

    async def _current(self, token: str) -> tuple[bytes, int] | None:
        """The lease's value and revision as stored now (None: no lease)."""
        try:
            msg = await self._js.get_msg(self._stream, subject=subjects.lease_key(token),
                                         direct=False)
        except NotFoundError:
            return None
        return None if msg.seq is None else (msg.data or b"", int(msg.seq))

    async def _acquire_free(self, token: str, owner: bytes) -> int | None:
        """Take the lease if it is free (or gone), reading it first."""
        current = await self._current(token)
        if current is None:
            # Expired between our two calls: try once more from empty.
            return await self._cas(token, owner, 0, self._ttl)
        value, revision = current
        return await self._cas(token, owner, revision, self._ttl) if value == FREE else None

    async def refresh(self, token: str, owner: bytes, revision: int) -> int | None:
        """Extend our lease; None means it was lost (expired and maybe taken)."""
        return await self._cas(token, owner, revision, self._ttl)

    async def release(self, token: str, revision: int) -> int | None:
        """Mark the lease free, unless someone wrote since ``revision``; the free
        marker's revision (None: someone did)."""
        return await self._cas(token, FREE, revision, self._free_ttl)

    async def touch(self, token: str) -> None:
        """Rewrite the session's free marker, if the lease is free: anything proven
        against the old marker (a cached history) no longer is. A held lease is left
        alone (its holder's next append finds the transcript changed)."""
        await self.free_if_held_by(token, FREE)

    async def free_if_held_by(self, token: str, owner: bytes) -> bool:
        """Write a free marker over the session's lease if ``owner`` holds it (a
        worker taken for dead; :data:`FREE` itself for :meth:`touch`): a
        compare-and-set on what was read, so a live holder is never clobbered."""
        current = await self._current(token)
        if current is None or current[0] != owner:
            return False
        return await self._cas(token, FREE, current[1], self._free_ttl) is not None


class SessionLease:
    """A session's lease, held by this worker: its revision, the time until which
    it is certainly still ours, and the compare-and-set refresh.

    Refreshes are serialised: two concurrent refreshes at one revision (the
    keep-alive's and the one before storing a turn) would fence one of them for
    nothing. A refresh that finds someone else wrote means the lease was lost:
    :attr:`held` turns False for good, and :meth:`release` does nothing.
    """

    __slots__ = ("_leases", "_lock", "_owner", "deadline", "revision", "token", "unbroken")

    def __init__(self, leases: Leases, token: str, owner: bytes, revision: int,
                 written_after: float, *, unbroken: bool = False) -> None:
        self._leases = leases
        self._owner = owner
        self._lock = asyncio.Lock()
        self.token = token
        self.revision: int | None = revision
        # Monotonic: the lease was last written no earlier than this minus the TTL.
        self.deadline = written_after + leases.ttl_seconds
        # Taken at the free marker this worker wrote: nobody held it in between.
        self.unbroken = unbroken

    @classmethod
    async def acquire(cls, leases: Leases, token: str, owner: bytes,
                      expected: int = 0) -> SessionLease | None:
        """Take the session's lease, or None if another worker holds it.
        ``expected``: the revision of the free marker this worker last wrote for
        the session (0: none); :attr:`unbroken` says whether it was taken there."""
        asked = time.monotonic()
        if not expected:
            revision = await leases.acquire(token, owner)
            return None if revision is None else cls(leases, token, owner, revision, asked)
        taken = await leases.acquire_at(token, owner, expected)
        if taken is None:
            return None
        return cls(leases, token, owner, taken[0], asked, unbroken=taken[1])

    @property
    def held(self) -> bool:
        """False once a refresh found the lease lost, or after :meth:`release`."""
        return self.revision is not None

    async def refresh(self) -> bool:
        """Extend the lease; False if it was lost. Bus errors propagate (the lease
        may still be ours: try again while :attr:`deadline` allows)."""
        async with self._lock:
            if self.revision is None:
                return False
            asked = time.monotonic()
            revision = await self._leases.refresh(self.token, self._owner, self.revision)
            self.revision = revision
            if revision is None:
                return False
            self.deadline = asked + self._leases.ttl_seconds
            return True

    async def confirm(self) -> bool:
        """Refresh now: is the lease still ours? False also when the bus cannot say."""
        try:
            return await self.refresh()
        except Exception:
            return False

    async def release(self) -> int | None:
        """Give the lease up (a no-op once lost or released); the free marker's
        revision, or None if none was written."""
        revision, self.revision = self.revision, None
        if revision is None:
            return None
        return await self._leases.release(self.token, revision)
