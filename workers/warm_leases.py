"""Session leases a worker keeps between a session's runs while it is the only worker.

A session's run ends with its lease let go (a compare-and-set writing the
``free`` marker) and its next run starts by taking it again (another one). With
one worker (``clawbus up`` on a laptop, or a deployment scaled to one), both
writes buy nothing: no other worker can want the lease. So while the worker
knows of no other live worker (``bus/registry.py``), a finished run's lease is
kept *warm* instead: the session's next run takes it without a round trip (and,
published as its session's head, without a head check either), and its cached
history is current by construction, since the lease was never let go.

What keeps every guarantee:

- **Order.** A warm lease is still the session's lease: nobody else can start a
  run of the session. A run taking it is proven its session's head when it was
  published as the head (``bus/heads.py``) and comes after every run this worker
  knew was gone (runs leave the stream only under the lease, which was held here
  throughout); otherwise the head is read, as always.
- **Fencing.** A warm lease is kept only while at least half its TTL is left:
  a run taking it has time for the keep-alive's first refresh, and the fenced
  refresh before each append still proves it is ours. It is not taken after a
  lapse of the worker's own liveness (``workers/liveness.py``): a worker that
  stalled long enough to be taken for dead may have had its leases freed by
  then.
- **Other workers.** When another worker appears (its first heartbeat), every
  warm lease is let go at once, writing the usual ``free`` marker, which wakes
  any run of the session that worker holds (``workers/lease_watch.py``). A run
  it got before that lands waits on the lease's release, not on its expiry.
- **A session reset** (``gateway/sessions.py``) is announced on the bus; the
  worker drops the session's cached history and lets its warm lease go, before
  the reset returns to its client.
- **A worker lost with warm leases** (SIGKILL, power loss): its leases are freed
  by the worker whose run waits on one, once its registry view takes the lost
  worker for dead (within 3 heartbeats, as a gateway frees a lost worker's
  running sessions). Otherwise they would expire with their TTL.
- **A clean stop** lets every warm lease go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from bus.leases import SessionLease

from .liveness import Liveness

# A lease is kept warm while more than this share of its TTL is left.
WARM_SHARE = 0.5


@dataclass(slots=True)
class _Warm:
    lease: SessionLease
    gone: int  # the session's runs up to this RUNS sequence are gone
    timer: asyncio.TimerHandle
    epoch: int  # the worker's liveness epoch when it was kept


class WarmLeases:
    """Warm leases by session token; ``on_cold(token, lease, gone)`` is called (from
    a timer) for each one that was kept as long as it may be: the caller lets it
    go."""

    __slots__ = ("_on_cold", "_ttl", "_warm", "liveness")

    def __init__(self, ttl_seconds: float,
                 on_cold: Callable[[str, SessionLease, int], None]) -> None:
        self._ttl = ttl_seconds
        self._on_cold = on_cold
        self._warm: dict[str, _Warm] = {}
        self.liveness: Liveness | None = None  # (None: always sure of it)

    def __contains__(self, token: object) -> bool:
        return token in self._warm

    def keep(self, token: str, lease: SessionLease, gone: int) -> bool:
        """Keep the session's lease warm, knowing its runs up to ``gone`` are gone;
        False if too little of its TTL is left (let it go instead)."""
        left = self._left(lease)
        if left <= 0 or token in self._warm:
            return False
        timer = asyncio.get_running_loop().call_later(left, self._cold, token)
        epoch = 0 if self.liveness is None else self.liveness.epoch
        self._warm[token] = _Warm(lease, gone, timer, epoch)
        return True

    def take(self, token: str) -> tuple[SessionLease, int] | None:
        """The session's warm lease and its ``gone``, for a run of the session (None:
        none, or one no longer worth taking: it is let go)."""
        warm = self._warm.pop(token, None)
        if warm is None:
            return None
        warm.timer.cancel()
        if self._left(warm.lease) <= 0 or (
                self.liveness is not None and not self.liveness.sure(warm.epoch)):
            self._on_cold(token, warm.lease, warm.gone)
            return None
        return warm.lease, warm.gone

    def let_all_go(self) -> list[tuple[str, SessionLease, int]]:
        """Every warm lease, forgotten here: the caller lets them go."""
        warm, self._warm = self._warm, {}
        for entry in warm.values():
            entry.timer.cancel()
        return [(token, entry.lease, entry.gone) for token, entry in warm.items()]

    def let_go(self, token: str) -> tuple[SessionLease, int] | None:
        """The session's warm lease, forgotten here (None: none)."""
        warm = self._warm.pop(token, None)
        if warm is None:
            return None
        warm.timer.cancel()
        return warm.lease, warm.gone

    def _left(self, lease: SessionLease) -> float:
        """Seconds the lease may still be kept warm."""
        if not lease.held:
            return 0.0
        return lease.deadline - self._ttl * WARM_SHARE - time.monotonic()

    def _cold(self, token: str) -> None:
        warm = self._warm.pop(token, None)
        if warm is not None:
            self._on_cold(token, warm.lease, warm.gone)
