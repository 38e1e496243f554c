"""Everything clawbus does with nats-py beyond its public API, in one place.

nats-py (pinned to the minor series in ``pyproject.toml``) is the bus client of
every process. Where its public API costs too much on the hot path, or lacks a
JetStream feature, the workaround lives in this package and nowhere else. Each
one below names the nats-py internals it touches, why, and the test that fails
when an upgrade changes them.

Internals touched (all in :mod:`.client`):

- ``Subscription._pending_queue``, ``_pending_size``, ``_wait_for_msgs_task``:
  :func:`subscribe_direct` hands each message to a plain function from the
  connection's reader (no queue put, task wake-up and coroutine per message):
  the gateway's event subscription gets one message per streamed token, every
  reply inbox one per request. Guarded by ``tests/test_direct.py``.
- ``Client._flusher`` (and the ``_flush_queue`` / ``_pending`` state it
  drains): :class:`CoalescingClient` waits one more loop turn before each socket
  write, so the publishes of many concurrent runs share system calls. Guarded by
  ``tests/test_nats_adapter.py``.
- ``JetStreamContext.PushSubscription._consumer``: :func:`consumer_name`, to
  delete an ordered consumer right after a read (the server keeps it until it
  reaps it otherwise, and refuses new ones past its limit). Guarded by
  ``tests/test_nats_adapter.py``.

Hand-rolled protocol paths (public nats-py API plus :func:`subscribe_direct`):

- :mod:`.requests` — :class:`Requester`, the one request/reply inbox of a
  process (a wildcard subscription, a counter token per request, one timer per
  request): JetStream publish acks (:class:`AckedPublisher`), stream gets, and
  the workers' liveness probes whose answer is awaited later. nats-py's
  ``request`` costs a NUID, two futures, ``wait_for`` and a queue hop per call.
- :mod:`.gets` — :class:`LeaderGet` (``STREAM.MSG.GET`` from the stream leader,
  decoded with orjson and a header parser that gives nats-py's results,
  ``tests/test_connection.py``) and :class:`BatchGetter`
  (JetStream's batched direct get, which nats-py does not offer).

Figures for what each one buys are in ``docs/BENCHMARKS.md``.
"""

from .client import CoalescingClient, consumer_name, subscribe_direct
from .gets import BatchGetter, LeaderGet, StoredMsg, parse_header_block
from .requests import NO_RESPONDERS, AckedPublisher, Requester, api_answer

__all__ = [
    "NO_RESPONDERS",
    "AckedPublisher",
    "BatchGetter",
    "CoalescingClient",
    "LeaderGet",
    "Requester",
    "StoredMsg",
    "api_answer",
    "consumer_name",
    "parse_header_block",
    "subscribe_direct",
]
