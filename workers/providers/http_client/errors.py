"""What the client raises: everything below HTTP status codes."""

from __future__ import annotations


class HTTPError(Exception):
    """A failure below HTTP status codes: no connection, a timeout, a broken or
    malformed response."""


class ConnectError(HTTPError):
    """No connection to the upstream (or its proxy) could be made."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Connecting (TCP, proxy tunnel and TLS) took longer than the connect timeout."""


class ReadTimeout(HTTPError, TimeoutError):
    """The upstream sent nothing for longer than the read timeout."""


class ResponseError(HTTPError):
    """The connection broke before the response ended, or the response is not HTTP."""


def cause(exc: BaseException | None) -> str:
    """`` (why)`` for a message, when ``exc`` says why."""
    return f" ({exc})" if exc is not None and str(exc) else ""
