"""Shared-secret authentication with a per-IP lockout after repeated wrong secrets.

One :class:`Authenticator` per gateway process, built from the settings at
start-up; HTTP calls :meth:`Authenticator.check` with the ``Authorization``
header, the WebSocket ``connect`` calls :meth:`Authenticator.verify_secret` with
the token or password it was given. Both raise :class:`~gateway.errors.ApiError`
(401 ``unauthorized`` / 429 ``rate_limited`` with ``Retry-After``).

Rate limiting (``gateway.auth.rateLimit``): wrong secrets are counted per client
IP in a sliding window of ``windowSeconds``; the ``maxAttempts``-th one locks the
IP out for ``lockoutSeconds``, during which every request from it gets 429, even
with the right secret. A request that presents no secret at all gets 401 but is
not counted (it guesses nothing). Loopback clients are never counted or locked
out, so a local CLI cannot be locked out by a misbehaving local script. A success
clears the IP's count. State is in memory and bounded to ``max_tracked`` IPs.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from clawbus.config import Settings
from gateway.errors import rate_limited, unauthorized

DEFAULT_MAX_TRACKED = 10_000
_UNKNOWN_CLIENT = "unknown"


@dataclass(slots=True)
class _Record:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float | None = None


def parse_bearer(authorization: str | None) -> str | None:
    """The secret of ``Authorization: Bearer <secret>`` (scheme case-insensitive), or None."""
    if authorization is None:
        return None
    parts = authorization.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


@functools.lru_cache(maxsize=4096)
def normalize_client_ip(client_ip: str | None) -> tuple[str, bool]:
    """(key to count failures under, whether the client is loopback).

    IPv4-mapped IPv6 addresses count as their IPv4 address, so ``::ffff:127.0.0.1``
    is loopback and ``::ffff:10.0.0.1`` shares a counter with ``10.0.0.1``.
    Anything unparseable (a Unix socket, a test client's name) is not loopback.
    """
    if not client_ip:
        return _UNKNOWN_CLIENT, False
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            text.split("%", 1)[0]
        )
    except ValueError:
        return text.lower() or _UNKNOWN_CLIENT, False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), address.is_loopback


def secrets_equal(presented: str, expected: str) -> bool:
    """Constant-time comparison: hash both to equal length, then ``hmac.compare_digest``."""
    a = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(a, b)


class Authenticator:
    """Checks the gateway secret and enforces the per-IP lockout (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_tracked: int = DEFAULT_MAX_TRACKED,
    ) -> None:
        limits = settings.gateway.auth.rate_limit
        self._mode = settings.auth_mode
        self._secret = settings.secret
        self._max_attempts = limits.max_attempts
        self._window = limits.window_seconds
        self._lockout = limits.lockout_seconds
        self._clock = clock
        self._max_tracked = max(1, max_tracked)
        # Insertion/refresh order: the front holds the IP that failed least recently.
        self._records: OrderedDict[str, _Record] = OrderedDict()

    @property
    def tracked_clients(self) -> int:
        """How many client IPs currently have failure state (for metrics and tests)."""
        return len(self._records)

    def check(self, authorization_header: str | None, client_ip: str | None) -> None:
        """Authenticate an HTTP request by its ``Authorization`` header."""
        if self._mode == "none":
            return
        self.verify_secret(parse_bearer(authorization_header), client_ip)

    def verify_secret(self, presented: str | None, client_ip: str | None) -> None:
        """Authenticate a presented secret (WebSocket ``auth.token`` / ``auth.password``).

        Raises 429 while the IP is locked out, 401 when the secret is missing or wrong.
        """
        if self._mode == "none":
            return
        key, loopback = normalize_client_ip(client_ip)
        now = self._clock()
        if not loopback:
            remaining = self._lockout_remaining(key, now)
            if remaining is not None:
                raise rate_limited(remaining)
        if not presented:
            raise unauthorized()
        if self._secret is None or not secrets_equal(presented, self._secret):
            # A gateway without a secret in token/password mode refuses to start;
            # should one get here anyway, nothing matches (fail closed).
            if not loopback:
                self._record_failure(key, now)
            raise unauthorized()
        self._records.pop(key, None)

    def _lockout_remaining(self, key: str, now: float) -> float | None:
        record = self._records.get(key)
        if record is None or record.locked_until is None:
            return None
        if now < record.locked_until:
            return record.locked_until - now
        # The lockout is over: start counting afresh.
        del self._records[key]
        return None

    def _record_failure(self, key: str, now: float) -> None:
        record = self._records.get(key)
        if record is None:
            self._make_room(now)
            record = self._records[key] = _Record()
        else:
            self._records.move_to_end(key)
        cutoff = now - self._window
        while record.failures and record.failures[0] <= cutoff:
            record.failures.popleft()
        record.failures.append(now)
        if len(record.failures) >= self._max_attempts:
            record.locked_until = now + self._lockout
            record.failures.clear()

    def _make_room(self, now: float) -> None:
        """Keep at most ``max_tracked`` records: drop stale ones, else the oldest unlocked one.

        Active lockouts are evicted only when every record is locked, so that a flood
        of new addresses cannot cheaply erase an attacker's own lockout.
        """
        if len(self._records) < self._max_tracked:
            return
        cutoff = now - self._window
        for key in [k for k, r in self._records.items() if self._is_stale(r, now, cutoff)]:
            del self._records[key]
        if len(self._records) < self._max_tracked:
            return
        victim = next(
            (k for k, r in self._records.items() if r.locked_until is None),
            next(iter(self._records)),
        )
        del self._records[victim]

    @staticmethod
    def _is_stale(record: _Record, now: float, cutoff: float) -> bool:
        if record.locked_until is not None:
            return now >= record.locked_until
        return not record.failures or record.failures[-1] <= cutoff
