"""Shared helpers for the HTTP streaming providers (``openai-completions``,
``anthropic-messages``): the pooled HTTP client, SSE line splitting, draining,
``Retry-After`` parsing, the translation of HTTP failures into :class:`ProviderError`,
and the pieces of the normalized tool-call stream (:func:`new_call_id`,
:func:`add_text`, :func:`add_arguments`).

The client is :mod:`.http_client` (asyncio + httptools), not aiohttp or httpx:
their per-request and per-read machinery costs a worker several times its CPU
(see that package).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib.metadata
import os
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import orjson

from bus.messages import ToolCallChunk
from clawbus.config import proxy_for

from .base import ProviderError, StreamItem, TextDelta
from .http_client import HTTPClient, HTTPError, Response


def _version() -> str:
    try:
        return importlib.metadata.version("clawbus")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "dev"


# After the end-of-stream marker, how long to wait for the (normally already received)
# end of the body so that the connection can go back to the pool instead of being dropped.
DRAIN_SECONDS = 0.5
# Longest upstream error text quoted in a ProviderError message.
MAX_DETAIL = 500
# Idle pooled connections are closed after this many seconds.
KEEPALIVE_SECONDS = 30.0
# Sent unless the configured headers say otherwise.
USER_AGENT = f"clawbus/{_version()}"


def request_headers(defaults: Mapping[str, str],
                    configured: Mapping[str, str]) -> dict[str, str]:
    """``defaults`` (plus a user agent and ``accept-encoding: identity``: SSE streams
    are not worth compressing) overridden by the configured headers,
    case-insensitively; names come out lower-case."""
    headers = {"user-agent": USER_AGENT, "accept-encoding": "identity"}
    headers.update((name.lower(), value) for name, value in defaults.items())
    headers.update((name.lower(), value) for name, value in configured.items())
    return headers


def env_proxy(url: str) -> str | None:
    """The proxy for ``url`` from ``HTTP(S)_PROXY`` / ``ALL_PROXY`` minus ``NO_PROXY``,
    read once rather than per request (loading the settings checked it is usable)."""
    return proxy_for(url, os.environ)


def upstream_client(headers: Mapping[str, str], timeout_seconds: float,
                    connect_timeout_seconds: float, proxy: str | None) -> HTTPClient:
    """A provider's pooled client (it needs no running loop until its first request).
    ``timeout_seconds`` is the longest silence allowed between bytes of a response
    (head included). No cap on connections: the worker's maxConcurrent already bounds
    how many runs (hence upstream requests) are in flight."""
    return HTTPClient(headers, read_timeout=timeout_seconds,
                      connect_timeout=connect_timeout_seconds, keepalive=KEEPALIVE_SECONDS,
                      proxy=proxy)


class SSELines:
    """The lines of a response body (CRLF, LF or CR endings), as raw bytes, one network
    read at a time; lines are split before decoding, so multi-byte UTF-8 characters cut
    by a read boundary stay whole."""

    __slots__ = ("_content", "_partial")

    def __init__(self, content: Response) -> None:
        self._content = content
        self._partial: list[bytes] = []  # the unfinished last line, in pieces

    async def read(self) -> list[bytes] | None:
        """The lines completed by the next read (at least one); None at the end of the
        body. A CRLF cut between two reads yields an extra blank line (harmless in SSE)."""
        content, partial = self._content, self._partial
        while True:
            chunk = await content.readany()
            if not chunk:
                if partial:
                    last = b"".join(partial)
                    partial.clear()
                    return [last]
                return None
            if b"\n" not in chunk and b"\r" not in chunk:
                partial.append(chunk)
                continue
            if partial:
                partial.append(chunk)
                chunk = b"".join(partial)
                partial.clear()
            lines = chunk.splitlines()
            if chunk[-1] not in b"\r\n":
                partial.append(lines.pop())
            if lines:
                return lines


def sse_field(line: bytes, name: bytes) -> str | None:
    """The value of an SSE ``name:`` line (e.g. ``b"data:"``), stripped; None for
    blank lines, comments and other fields."""
    if not line.startswith(name):
        return None
    return line[len(name):].decode("utf-8", "replace").strip()


def sse_payload(line: bytes) -> bytes | None:
    """The raw payload of a ``data:`` line, stripped (None for blank lines, comments
    and other fields); its UTF-8 is left to the JSON parser."""
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip()


def decode_event(data: str | bytes) -> dict[str, Any]:
    """An SSE ``data:`` payload decoded as a JSON object."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        if isinstance(data, bytes):  # e.g. invalid UTF-8: replaced, as a text decode does
            return decode_event(data.decode("utf-8", "replace"))
        raise ProviderError(
            "bad_response", f"upstream sent a non-JSON SSE event: {data[:MAX_DETAIL]!r}"
        ) from None
    if not isinstance(event, dict):
        raise ProviderError("bad_response", f"upstream sent a non-object event: {data[:100]!r}")
    return event


async def drain(lines: SSELines) -> None:
    """Read what is left of the body for up to :data:`DRAIN_SECONDS`, ignoring errors."""
    with contextlib.suppress(TimeoutError, HTTPError):
        async with asyncio.timeout(DRAIN_SECONDS):
            while await lines.read() is not None:
                pass


def finish_response(response: Response) -> None:
    """Return the connection to the pool if the body was read to its end; otherwise
    close it at once (the upstream sees the disconnect and stops generating)."""
    if response.at_eof():
        response.release()
    else:
        response.close()


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (delta-seconds or an HTTP date);
    ``headers`` must be case-insensitive."""
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


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def transport_error(exc: HTTPError, *, responded: bool, url: str) -> ProviderError:
    """A timeout, a stream that broke off after the response began, or no connection."""
    if isinstance(exc, TimeoutError):
        return ProviderError("timeout", f"upstream timed out: {describe(exc)}")
    if responded:
        return ProviderError("bad_response", f"upstream stream broke off: {describe(exc)}")
    return ProviderError("unreachable", f"cannot reach {url}: {describe(exc)}")


def incomplete_stream(response: Response, what: str) -> ProviderError:
    """The body ended without ``what``; notes a content type that is not SSE."""
    content_type = response.headers.get("content-type", "")
    return ProviderError(
        "bad_response",
        f"upstream stream ended without {what}"
        + ("" if "event-stream" in content_type
           else f" (content-type {content_type or 'missing'}, not SSE)"),
    )


def status_error(response: Response, body: bytes,
                 error_detail: Callable[[object], str | None],
                 *, rate_limit_statuses: Collection[int] = (429,)) -> ProviderError:
    """An HTTP error status with its (fully read) ``body``: ``error_detail`` extracts the
    message from the decoded JSON body, else the raw body (or the reason phrase) is
    quoted."""
    status = response.status
    try:
        detail = error_detail(orjson.loads(body))
    except orjson.JSONDecodeError:
        detail = None
    if detail is None:
        detail = (_body_text(body, response.charset).strip()[:MAX_DETAIL]
                  or response.reason or "")
    message = f"upstream returned HTTP {status}: {detail}"
    if status in (401, 403):
        return ProviderError("auth", message, status=status)
    if status in rate_limit_statuses:
        return ProviderError("rate_limit", message, status=status,
                             retry_after=retry_after(response.headers))
    return ProviderError("failed", message, status=status)


def _body_text(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", "replace")
    except LookupError:  # an unknown charset
        return body.decode("utf-8", "replace")


def new_call_id() -> str:
    """An id for a tool call the upstream gave none: ``call_`` and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


def add_text(out: list[StreamItem], pieces: list[str]) -> None:
    """Move the text gathered so far in ``pieces`` to ``out`` (before a tool-call piece
    that followed it), so a read's items keep the upstream's order."""
    if pieces:
        out.append(TextDelta("".join(pieces)))
        pieces.clear()


def add_arguments(out: list[StreamItem], index: int, fragment: str) -> None:
    """Append the next ``arguments`` fragment of call ``index`` to ``out``, joined to
    the last item when that is a piece of the same call: what arrived together
    travels together."""
    last = out[-1] if out else None
    if isinstance(last, ToolCallChunk) and last.index == index:
        out[-1] = ToolCallChunk(index=index, id=last.id, name=last.name,
                                arguments=last.arguments + fragment)
    else:
        out.append(ToolCallChunk(index=index, arguments=fragment))
