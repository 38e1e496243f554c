"""A session's turn, from the worker's side: wait for it, see the history, pass it on.

A run of a session starts only when it is the oldest stored run of its session
(the *head*: read from the ``RUNS`` stream leader, unless the run was published
as the head, ``bus/heads.py``) and the worker holds the session's lease.
Otherwise the worker holds the run (up to its share of slots),
telling the gateway it is queued, until the session's lease is let go (the
release itself is the signal: ``workers/lease_watch.py``), the lease is handed
over (below), or a periodic re-check.

What a worker keeps between a session's runs, to make the next one cheap (each
keeps the ordering, fencing and no-half-turn guarantees):

- **The history window** (``workers/session_cache.py``): served without reading
  the transcript when the lease is taken at the free marker this worker wrote
  (one compare-and-set proves nobody held it since), or handed over.
- **The lease, handed over** (``workers/handover.py``): when the finished run's
  session has its next run held by this worker, and that run is now the head,
  the lease goes straight to it: no release, no wake-up, no acquire.
- **The lease, kept warm** (``workers/warm_leases.py``): while this worker is the
  only one, a finished run's lease is kept for the session's next run: no
  release, no acquire, and for a run published as its head no head check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Container, Coroutine
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from bus import subjects
from bus.leases import Leases, SessionLease, lease_owner
from bus.messages import RunRequest
from bus.nats_adapter import LeaderGet
from bus.transcripts import Transcripts, Window
from clawbus.config import BusConfig

from .events import Emitter, RunAbandoned
from .handover import HeldRuns
from .lease_watch import LeaseWatch, Watched
from .session_cache import SessionCache
from .warm_leases import WarmLeases

if TYPE_CHECKING:
    from .metrics import WorkerMetrics

log = logging.getLogger("clawbus.worker")

NAK_DELAY = 0.25
QUEUED_NOTICE_DELAY = 0.05  # a held run tells its gateway once held this long
# How a run ended, for whether its lease may go straight to the session's next
# run: its message is gone for good (acked or terminated) and the lease is intact.
# (Not "requeued" — it runs again, it is still the head — nor "superseded" or
# "fenced": the lease is no longer this worker's to give.)
PASSABLE = frozenset({"completed", "failed", "abandoned", "cancelled"})


class SessionTurns:
    def __init__(self, nc: Client, leases: Leases, leader: LeaderGet, transcripts: Transcripts,
                 *, owner: bytes, worker_id: str, bus: BusConfig, budget: int,
                 max_holds: int, metrics: WorkerMetrics, stopping: asyncio.Event,
                 cancelled: Container[str]) -> None:
        self._nc = nc
        self._leases = leases
        self._leader = leader
        self._transcripts = transcripts
        self._owner = owner
        self._worker_id = worker_id
        self._bus = bus
        self._budget = budget
        self.max_holds = max_holds
        self._metrics = metrics
        self._stopping = stopping
        self._cancelled = cancelled
        self.holds = 0
        self.cache = SessionCache()
        self._held: HeldRuns[SessionLease] = HeldRuns()
        self._watch = LeaseWatch(nc)
        self._leased: set[str] = set()  # sessions whose lease this worker holds
        # (given the worker's liveness by the worker)
        self.warm = WarmLeases(leases.ttl_seconds, self._cold)
        # Whether this worker is the only live one (set by the worker from its
        # registry view; until then, never: no lease is kept warm).
        self.alone: Callable[[], bool] = _never
        self._background: set[asyncio.Task[None]] = set()

    # -- waiting for the turn ------------------------------------------------

    async def head(self, token: str, after: int = 0) -> int | None:
        """The sequence of the session's oldest stored run past ``after`` (from the
        stream leader); None if there is none."""
        found = await self._leader.next(subjects.RUNS_STREAM, after + 1, subjects.run(token))
        return None if found is None else found.seq

    async def wait(self, msg: Msg, run: RunRequest, token: str, seq: int,
                   emitter: Emitter, *, head: bool = False) -> SessionLease | None:
        """Wait until this run heads its session and we hold the lease; the lease,
        or None if the run was handed back (naked) or dropped. ``head``: the run
        was published as its session's head (bus/heads.py): it is, as long as it
        is stored, so only the lease is asked for."""
        # (a run cancelled before it started is dropped below, the lease kept warm)
        warm = None if run.run_id in self._cancelled else self.warm.take(token)
        if warm is not None:
            lease = await self._from_warm(token, seq, head, *warm)
            if lease is not None:
                emitter.lease = lease
                return lease
        handed: asyncio.Future[SessionLease] | None = None
        watched: Watched | None = None
        # A run held only briefly (handed the lease within the notice delay, as
        # in a busy session) costs its gateway no `queued` notice.
        next_probe = time.monotonic() + QUEUED_NOTICE_DELAY
        try:
            while True:
                if handed is not None and handed.done():
                    lease = self._held.leave(token, seq)
                    if lease is not None:
                        emitter.lease = lease
                        return lease
                if run.run_id in self._cancelled:
                    await msg.term()
                    return None
                if watched is None and (handed is not None or token in self._leased
                                        or token in self._watch):
                    # Likely held: watched before the look, so a release after it
                    # wakes us (and the running run of ours lets go after this).
                    watched = await self._watch.watch(token)
                changed = None if watched is None else watched.changed
                if handed is not None or token not in self._leased:
                    # (else one of our runs has the session: this one is not its
                    # head — the running one is — and the lease comes here by
                    # hand-over when it is due, or a release says to look again.)
                    # The first look takes the lease in the same round trip as the
                    # head check (a session's run is mostly its head); later ones
                    # only once the head check says so.
                    first, lease = await self._look(token, seq, together=handed is None,
                                                    marked=head)
                    if first is None or first > seq:
                        # Deleted (its client gave up) or already completed elsewhere.
                        await msg.term()
                        return None
                    if lease is not None:
                        self._leased.add(token)
                        emitter.lease = lease
                        return lease
                if self._stopping.is_set():
                    await msg.nak()
                    return None
                if handed is None:
                    if self.holds >= self.max_holds:
                        self._metrics.naks.inc()
                        await msg.nak(delay=NAK_DELAY)
                        return None
                    self.holds += 1
                    handed = self._held.hold(token, seq)
                    if watched is None:  # the look above was not watched: look again
                        continue
                now = time.monotonic()
                if now >= next_probe:
                    try:
                        await emitter.queued(self._worker_id, msg.reply)
                    except RunAbandoned as exc:
                        if not exc.superseded:  # (else the message is another's now)
                            await msg.term()
                        return None
                    await msg.in_progress()
                    next_probe = now + min(self._bus.heartbeat_seconds,
                                           self._bus.ack_wait_seconds / 3)
                assert changed is not None
                await self._wait_any(changed, handed, max(0.05, next_probe - time.monotonic()))
        finally:
            if watched is not None:
                await self._watch.unwatch(token, watched)
            if handed is not None:
                self.holds -= 1
                # (after a hand-over taken above this finds nothing: leave is idempotent)
                unused = self._held.leave(token, seq)
                if unused is not None:  # handed to us as we gave up: pass it on
                    await self.let_go(token, unused, gone=seq - 1)

    async def _look(self, token: str, seq: int, *, together: bool,
                    marked: bool = False) -> tuple[int | None, SessionLease | None]:
        """The session's head, and its lease if the run at ``seq`` is the head and
        the lease was free. ``together``: ask for both at once (if the run turns out
        not to be the head, a lease taken is let go again). ``marked``: the run was
        published as its session's head (see :meth:`_proven_head`)."""
        if marked and together and self.cache.released_at(token):
            return await self._look_marked(token, seq)
        if not together:
            head = await self.head(token)
            return head, (await self._acquire(token) if head == seq else None)
        found, taken = await asyncio.gather(self.head(token), self._acquire(token),
                                            return_exceptions=True)
        if isinstance(taken, BaseException):
            if found == seq:
                raise taken
            taken = None
        if isinstance(found, BaseException) or found != seq:
            if taken is not None:  # not this run's turn after all
                await self.let_go(token, taken, gone=_gone_below(found, seq))
            if isinstance(found, BaseException):
                raise found
            return found, None
        return found, taken

    async def _look_marked(self, token: str,
                           seq: int) -> tuple[int | None, SessionLease | None]:
        """:meth:`_look` for a run published as its session's head, by a worker that
        let the session's lease go before: the lease first, and the head asked
        only if the lease does not prove the run is still stored."""
        gone = self.cache.gone_through(token)
        taken = await self._acquire(token)
        if taken is not None and self._proven_head(taken, seq, gone):
            return seq, taken
        found = await self.head(token)
        if found != seq and taken is not None:
            await self.let_go(token, taken, gone=_gone_below(found, seq))
            taken = None
        return found, taken

    @staticmethod
    def _proven_head(lease: SessionLease, seq: int, gone: int) -> bool:
        """Is the run at ``seq``, published as its session's head (bus/heads.py),
        proven to be still stored — so still the head — without asking?

        Published as the head, it stays the head for as long as it is stored. What
        the mark cannot tell is whether it is still stored: this delivery may be an
        old one (the worker stalled past the ack wait, and another worker served
        the run meanwhile). The lease tells: taken at this worker's own free
        marker (``unbroken``), nobody held it since this worker let it go; and a
        run leaves the stream served or failed only under the lease (its ack or
        term comes from the lease holder). When this worker let go, every run of
        the session up to ``gone`` was gone; so a run past ``gone`` was served by
        nobody since, and is still stored. (A run dropped without the lease —
        cancelled before it started — is not stored either, but its gateway no
        longer wants it: the run stores nothing, ``workers/acceptance.py``.)"""
        return lease.unbroken and seq > gone

    async def _from_warm(self, token: str, seq: int, marked: bool, lease: SessionLease,
                         gone: int) -> SessionLease | None:
        """The warm lease for the run at ``seq`` if that run is the session's head;
        else the lease is let go (None: the run waits or ends as any other)."""
        try:
            # Held here since the session's runs up to ``gone`` were gone: a run
            # published as the head and past them is still stored (see
            # _proven_head), so still the head.
            found = seq if marked and seq > gone else await self.head(token)
        except BaseException:
            await self.let_go(token, lease, gone=gone)
            raise
        if found != seq:
            await self.let_go(token, lease, gone=max(gone, _gone_below(found, seq)))
            return None
        self._leased.add(token)
        self._metrics.warm_leases.inc()
        return lease

    def _acquire(self, token: str) -> Awaitable[SessionLease | None]:
        """Take the session's lease, at this worker's own free marker if it has one
        (workers/session_cache.py)."""
        return SessionLease.acquire(self._leases, token, self._owner,
                                    self.cache.released_at(token))

    async def _wait_any(self, done: asyncio.Event, handed: asyncio.Future[SessionLease],
                        seconds: float) -> None:
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(done.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait([*waiters, handed], timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    # -- the history ---------------------------------------------------------

    async def window(self, token: str, lease: SessionLease) -> Window:
        """The history window the run sees: the cached one when the lease proves it
        current, else read from the transcript (and cached)."""
        if lease.unbroken:
            cached = self.cache.window(token, self._budget)
            if cached is not None:
                self._metrics.history_from_cache.inc()
                return cached
        self.cache.drop(token)
        window = await self._transcripts.load_window(token, self._budget)
        self._metrics.history_from_stream.inc()
        self.cache.put(token, window)
        return window

    def stored(self, token: str, window: Window) -> None:
        """The run stored its turn: ``window`` is what the session's next run sees."""
        self.cache.put(token, window)

    def unknown(self, token: str) -> None:
        """The session's transcript may have changed in ways we did not see."""
        self.cache.drop(token)

    # -- after the run -------------------------------------------------------

    async def pass_on(self, token: str, seq: int, lease: SessionLease, outcome: str) -> None:
        """The run at ``seq`` ended with ``outcome``: hand the lease to the
        session's next run if this worker holds it, else let the lease go."""
        if outcome in PASSABLE and lease.held and not self._stopping.is_set():
            waiting = self._held.oldest(token)
            if waiting is not None:
                try:
                    head = await self.head(token, after=seq)
                except Exception:
                    head = None
                if head == waiting:
                    lease.unbroken = True  # never let go: the cached history stays current
                    if self._held.hand(token, waiting, lease):
                        self._metrics.handovers.inc()
                        return
            elif self.alone() and self.warm.keep(token, lease, seq):
                self._leased.discard(token)
                # Never let go from here on: the cached history, if it was read or
                # extended under this hold, stays current; one from before is not.
                if not self.cache.current(token):
                    self.cache.drop(token)
                lease.unbroken = True
                return
        # The run was its session's head: every run before it is gone, and so is
        # the run itself if it ended for good.
        await self.let_go(token, lease, gone=seq if outcome in PASSABLE else seq - 1)

    async def let_go(self, token: str, lease: SessionLease, *, gone: int = 0) -> None:
        """Release the lease (unless it was lost), knowing the session's runs up to
        ``gone`` are gone. The release wakes the session's waiters on every worker
        (workers/lease_watch.py); when none was written, this worker's own waiters
        are woken here."""
        self._leased.discard(token)
        rev = None
        if lease.held:
            with contextlib.suppress(Exception):
                rev = await lease.release()
        if rev is None:
            self.cache.drop(token)
            self._watch.signal(token)
        else:
            self.cache.released(token, rev, unbroken=lease.unbroken, gone=gone)


    # -- warm leases: let go when worth no more, or wanted elsewhere -----------

    def _cold(self, token: str, lease: SessionLease, gone: int) -> None:
        self._spawn(self.let_go(token, lease, gone=gone))

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work, name="session-lease")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def other_worker_found(self) -> None:
        """Another worker is alive: no lease stays warm (its runs may want one)."""
        for token, lease, gone in self.warm.let_all_go():
            self._spawn(self.let_go(token, lease, gone=gone))

    def reset_seen(self, token: str) -> None:
        """The session was reset: what this worker keeps of it is stale."""
        self.cache.drop(token)
        warm = self.warm.let_go(token)
        if warm is not None:
            self._spawn(self.let_go(token, warm[0], gone=warm[1]))

    def worker_lost(self, worker_id: str) -> None:
        """A worker was taken for dead: free the leases it holds of the sessions whose
        runs wait here (a gateway frees those of its running runs; nobody else
        knows of a lease it kept warm)."""
        owner = lease_owner(worker_id)
        for token in self._held.sessions():
            self._spawn(self._leases.free_if_held_by(token, owner))

    async def close(self) -> None:
        """Stopping: every warm lease is let go."""
        for token, lease, gone in self.warm.let_all_go():
            await self.let_go(token, lease, gone=gone)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _never() -> bool:
    return False


def _gone_below(head: int | BaseException | None, seq: int) -> int:
    """What a head check says is gone: every run before the head; with no head,
    every run up to ``seq``. (0 when the check failed.)"""
    if isinstance(head, BaseException):
        return 0
    return seq if head is None else head - 1
