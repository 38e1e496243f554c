"""Waking a worker's held runs when their session's lease is let go.

A run that is not yet its session's turn waits, held by the worker, for the
session's lease to come free. The lease is a key of the ``LEASES`` bucket, and a
key-value write is an ordinary NATS message on ``$KV.LEASES.<token>`` as well
as a stored one: a plain subscription to that subject sees every release (the
``free`` marker written), every free marker a gateway writes for a worker it
took for dead, and every delete, the moment the server takes it. So the release
itself is the signal to look again: no extra message per run, and only workers
that hold a run of *that* session are told.

The subscription lives while this worker holds a run of the session (counted
per session; a session's runs are mostly not held at all, and then nothing is
subscribed). A subscription is sent on the worker's connection before any look
made under it, and the server handles a connection's messages in order, so a
release that comes after such a look is always seen (a look made before the
watch may have missed one: look again). The worker's own release, once this
worker watches the session, comes back to it the same way; a let-go that writes
nothing (the lease was lost) wakes only this worker's waiters
(:meth:`LeaseWatch.signal`).

A lease that expires by its TTL (a holder that died) writes nothing; held runs
also look again periodically (``workers/session_turns.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import subjects
from bus.leases import FREE
from bus.nats_adapter import subscribe_direct


@dataclass(slots=True)
class Watched:
    """One session watched: how many held runs want it, and the event set at the
    next signal (a fresh one after each, so a waiter takes the current event
    *before* it looks, and a signal during the look still wakes it)."""

    sub: Subscription | None = None
    users: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def signal(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class LeaseWatch:
    __slots__ = ("_nc", "_watched")

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._watched: dict[str, Watched] = {}

    def __contains__(self, token: str) -> bool:
        return token in self._watched

    async def watch(self, token: str) -> Watched:
        """Watch the session's lease for one more held run (subscribed, if it is
        the first, before this returns control to anything else that writes)."""
        watched = self._watched.get(token)
        if watched is not None:
            watched.users += 1
            return watched
        watched = self._watched[token] = Watched(users=1)
        try:
            watched.sub = await subscribe_direct(
                self._nc, subjects.lease_key(token),
                lambda msg: self._on_write(token, msg))
        except BaseException:
            self._forget(token, watched)
            raise
        return watched

    async def unwatch(self, token: str, watched: Watched) -> None:
        """A held run no longer waits (it runs, or gave up)."""
        watched.users -= 1
        if watched.users > 0:
            return
        self._forget(token, watched)
        if watched.sub is not None:
            with contextlib.suppress(Exception):  # (a closed connection drops it anyway)
                await watched.sub.unsubscribe()

    def signal(self, token: str) -> None:
        """The session's waiters here look again."""
        watched = self._watched.get(token)
        if watched is not None:
            watched.signal()

    def _forget(self, token: str, watched: Watched) -> None:
        if self._watched.get(token) is watched:
            del self._watched[token]

    def _on_write(self, token: str, msg: Msg) -> None:
        # A holder's write (an acquire, a refresh) frees nothing: only a free
        # marker or a delete (an empty message) is worth a look.
        if msg.data == FREE or not msg.data:
            self.signal(token)
