"""Shared helpers for the HTTP streaming providers (``openai-completions``,
``anthropic-messages``): SSE line parsing, draining, ``Retry-After`` parsing and the
translation of HTTP failures into :class:`ProviderError`."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import httpx
import orjson

from .base import ProviderError

# After the end-of-stream marker, how long to wait for the (normally already received)
# end of the body so that the connection can go back to the pool instead of being dropped.
DRAIN_SECONDS = 0.5
# Longest upstream error text quoted in a ProviderError message.
MAX_DETAIL = 500


# No cap on connections: the worker's maxConcurrent already bounds how many runs
# (hence upstream requests) are in flight, and httpx's default cap of 100 made the
# 101st concurrent stream wait for another run to finish.
POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256,
                           keepalive_expiry=30.0)


def make_client(headers: httpx.Headers, timeout_seconds: float,
                connect_timeout_seconds: float) -> httpx.AsyncClient:
    """The one pooled HTTP client a provider instance keeps for its upstream."""
    return httpx.AsyncClient(
        headers=headers, limits=POOL_LIMITS,
        timeout=httpx.Timeout(timeout_seconds, connect=connect_timeout_seconds))


def sse_data(line: str) -> str | None:
    """The payload of a ``data:`` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def decode_event(data: str) -> dict[str, Any]:
    """An SSE ``data:`` payload decoded as a JSON object."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderError(
            "bad_response", f"upstream sent a non-JSON SSE event: {data[:MAX_DETAIL]!r}"
        ) from None
    if not isinstance(event, dict):
        raise ProviderError("bad_response", f"upstream sent a non-object event: {data[:100]!r}")
    return event


async def drain(lines: AsyncIterator[str]) -> None:
    """Read what is left of the body for up to :data:`DRAIN_SECONDS`, ignoring errors."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in lines:
                pass


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (delta-seconds or an HTTP date)."""
    with contextlib.suppress(ValueError):
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def transport_error(exc: httpx.HTTPError, *, responded: bool, url: str) -> ProviderError:
    """A timeout, a stream that broke off after the response began, or no connection."""
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError("timeout", f"upstream timed out: {describe(exc)}")
    if responded:
        return ProviderError("bad_response", f"upstream stream broke off: {describe(exc)}")
    return ProviderError("unreachable", f"cannot reach {url}: {describe(exc)}")


def incomplete_stream(response: httpx.Response, what: str) -> ProviderError:
    """The body ended without ``what``; notes a content type that is not SSE."""
    content_type = response.headers.get("content-type", "")
    return ProviderError(
        "bad_response",
        f"upstream stream ended without {what}"
        + ("" if "event-stream" in content_type
           else f" (content-type {content_type or 'missing'}, not SSE)"),
    )


def status_error(response: httpx.Response, error_detail: Callable[[object], str | None],
                 *, rate_limit_statuses: Collection[int] = (429,)) -> ProviderError:
    """An HTTP error status (body already read); ``error_detail`` extracts the message
    from the decoded JSON body, else the raw body (or the reason phrase) is quoted."""
    status = response.status_code
    try:
        detail = error_detail(orjson.loads(response.content))
    except orjson.JSONDecodeError:
        detail = None
    if detail is None:
        detail = response.text.strip()[:MAX_DETAIL] or response.reason_phrase
    message = f"upstream returned HTTP {status}: {detail}"
    if status in (401, 403):
        return ProviderError("auth", message, status=status)
    if status in rate_limit_statuses:
        return ProviderError("rate_limit", message, status=status,
                             retry_after=retry_after(response.headers))
    return ProviderError("failed", message, status=status)
