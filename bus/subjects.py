"""Every NATS subject, stream and bucket name clawbus uses, and the session-key encoding.

No other module spells a subject as a literal: they call these functions.

Session keys are free text (they may hold ``.``, ``*``, ``>``, spaces, NUL, any
Unicode), so they never go on a subject as they are. :func:`session_token`
encodes them injectively into the subject-token alphabet: unpadded URL-safe
base64 of the UTF-8 bytes (``A-Z a-z 0-9 - _``). Distinct keys give distinct
tokens and no token can contain a subject separator or wildcard.
"""

from __future__ import annotations

import base64

RUNS_STREAM = "RUNS"
TX_STREAM = "TX"
LEASES_BUCKET = "LEASES"
WORKERS_BUCKET = "WORKERS"
RUNS_CONSUMER = "workers"


def session_token(session_key: str) -> str:
    """Subject-safe, collision-free encoding of a session key."""
    raw = session_key.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") or "_"


def session_key_from_token(token: str) -> str:
    """Inverse of :func:`session_token`."""
    if token == "_":
        return ""
    padded = token + "=" * (-len(token) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8", "surrogatepass")


def workers_registry_all() -> str:
    """Every worker's heartbeat entry in the ``WORKERS`` KV bucket (puts and deletes)."""
    return f"$KV.{WORKERS_BUCKET}.>"


def runs_all() -> str:
    return "runs.>"


def run(token: str) -> str:
    """Where runs of one session are queued (one subject per session)."""
    return f"runs.{token}"


def transcripts_all() -> str:
    return "tx.>"


def transcript(token: str) -> str:
    """The transcript of one session: one message per completed turn."""
    return f"tx.{token}"


def events(gateway_id: str, run_id: str) -> str:
    """Where a worker sends the events of one run (read by the gateway that owns it)."""
    return f"evt.{gateway_id}.{run_id}"


def events_all(gateway_id: str) -> str:
    """The one wildcard subscription a gateway process holds for all of its runs."""
    return f"evt.{gateway_id}.*"


def cancel(run_id: str) -> str:
    return f"cancel.{run_id}"


def cancel_all() -> str:
    return "cancel.*"


def session_reset(token: str) -> str:
    """Announces that a session was reset (workers drop what they kept of it)."""
    return f"sess.reset.{token}"


def session_resets() -> str:
    return "sess.reset.*"


def lease_key(token: str) -> str:
    """The subject of a session's lease in the ``LEASES`` bucket: its writes, and
    (subscribed to) the signal that it was let go (workers/lease_watch.py)."""
    return f"$KV.{LEASES_BUCKET}.{token}"


def leases_all() -> str:
    return f"$KV.{LEASES_BUCKET}.*"


def last_token(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]
