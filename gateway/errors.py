"""Client-facing errors of the gateway, and their one mapping to the OpenAI error envelope.

Every failure the HTTP and WebSocket front ends report to a client is an
:class:`ApiError`. It carries the HTTP status, the OpenAI ``type`` and optional
``code``, and any response headers (``Retry-After``); :meth:`ApiError.envelope`
renders the body. The constructor helpers below are the rows of SPEC §2, so the
exact strings live in one place.

Exceptions here::

    ApiError
      raised by: gateway.auth (401, 429), gateway.chat_request (400),
                 the HTTP layer (413, 503), run failures (from_run_failure)
"""

from __future__ import annotations

import math
from typing import Any

INVALID_REQUEST = "invalid_request_error"
API_ERROR = "api_error"

UNAUTHORIZED_MESSAGE = "Unauthorized"
RATE_LIMITED_MESSAGE = "Too many failed authentication attempts. Please try again later."
PAYLOAD_TOO_LARGE_MESSAGE = "Payload too large"
NO_WORKER_MESSAGE = "No agent worker available."
INTERNAL_ERROR_MESSAGE = "internal error"


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    status: int
    message: str
    type: str
    code: str | None
    headers: dict[str, str]

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = dict(headers) if headers else {}

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``.

        ``param`` and ``code`` are always present (``null`` when unset) because the
        strict OpenAI ``ErrorResponse`` schema requires them.
        """
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": None,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return (
            f"ApiError(status={self.status!r}, message={self.message!r}, "
            f"type={self.type!r}, code={self.code!r})"
        )


def _retry_after_header(seconds: float) -> str:
    value = seconds if math.isfinite(seconds) else 1.0
    return str(max(1, math.ceil(value)))


def unauthorized() -> ApiError:
    """401: missing or wrong bearer secret."""
    return ApiError(401, UNAUTHORIZED_MESSAGE, "unauthorized")


def rate_limited(retry_after_seconds: float) -> ApiError:
    """429 with ``Retry-After`` (whole seconds, rounded up, at least 1)."""
    return ApiError(
        429,
        RATE_LIMITED_MESSAGE,
        "rate_limited",
        headers={"Retry-After": _retry_after_header(retry_after_seconds)},
    )


def payload_too_large() -> ApiError:
    """413: the body is over ``maxBodyBytes``."""
    return ApiError(413, PAYLOAD_TOO_LARGE_MESSAGE, INVALID_REQUEST)


def invalid_request(message: str) -> ApiError:
    """400 ``invalid_request_error`` with the given message."""
    return ApiError(400, message, INVALID_REQUEST)


def model_not_found(model_id: str) -> ApiError:
    """404 for ``GET /v1/models/{id}`` with an unknown id (SPEC §3)."""
    return ApiError(404, f"Model '{model_id}' not found.", INVALID_REQUEST, "model_not_found")


def no_worker() -> ApiError:
    """503: no worker accepted the run within the queue timeout."""
    return ApiError(503, NO_WORKER_MESSAGE, API_ERROR)


def from_run_failure(
    status: int,
    error_type: str,
    message: str,
    code: str | None,
    *,
    retry_after: float | None = None,
) -> ApiError:
    """Map a worker's ``Failed`` event (status, type, message, code) to an :class:`ApiError`.

    The worker already chose the SPEC §2 "run" row (500 ``api_error``, 401-ish
    ``authentication_error``, 429 ``rate_limit_error``, 502/504 upstream errors);
    this only guards against values a client must never see: a status outside
    4xx/5xx becomes 500, and an empty type or message gets the generic one.
    ``retry_after`` (the upstream's, in seconds) becomes a ``Retry-After`` header.
    """
    if not 400 <= status <= 599:
        status = 500
    headers = {"Retry-After": _retry_after_header(retry_after)} if retry_after is not None else {}
    return ApiError(
        status,
        message or INTERNAL_ERROR_MESSAGE,
        error_type or API_ERROR,
        code or None,
        headers,
    )
