"""A lean HTTP/1.1 client for the providers' upstream calls: keep-alive pooling,
TLS, HTTP(S) proxies (``CONNECT`` for https origins), an idle read timeout and flow
control, over a plain :class:`asyncio.Protocol` and httptools' C parser (llhttp,
already installed with ``uvicorn[standard]``).

Why not aiohttp or httpx: their per-request machinery (request and response
objects, tracing hooks, cookie jars, timer contexts) and per-read path (a stream
reader's wake-up plus a rescheduled timeout for every network read) cost a
worker several times this client's CPU per streamed reply (``python -m
bench.http_client`` measures both). Here a read is one parser call and, at most,
one future; the read timeout is one timer per request, re-armed only when it
fires (:class:`clawbus.deadline.DeadlineWaiter`).

What it does not do (no provider needs it): redirects, cookies, request bodies
other than bytes, HTTP/2, ``Expect: 100-continue``.

A pooled connection that the server closed while idle is noticed by the event
loop (the connection is always read) and dropped. A request sent on a reused
connection that closes before a single response byte arrives is sent once more on
a new connection; any other failure is raised as an :class:`HTTPError`.

The modules: :mod:`.client` (requests, opening connections), :mod:`.pool`,
:mod:`.connection` (one connection's exchange and its waits), :mod:`.parser`
(httptools' callbacks), :mod:`.flow` (pausing a connection whose reader is behind),
:mod:`.tunnel` (``CONNECT``), :mod:`.inner_tls` (TLS through an https proxy),
:mod:`.target` (URLs and proxies), :mod:`.response`, :mod:`.errors`.
"""

from __future__ import annotations

from .client import HTTPClient
from .errors import ConnectError, ConnectTimeout, HTTPError, ReadTimeout, ResponseError
from .flow import HIGH_WATER
from .response import MAX_READ, Response

__all__ = [
    "HIGH_WATER",
    "MAX_READ",
    "ConnectError",
    "ConnectTimeout",
    "HTTPClient",
    "HTTPError",
    "ReadTimeout",
    "Response",
    "ResponseError",
]
