"""Mapping run failures to the client-facing error rows of SPEC §2, in one place.

The worker sends these fields in a ``Failed`` event; the gateway turns them into
the OpenAI error envelope (HTTP status, or an SSE/WS error frame).
"""

from __future__ import annotations

from bus.messages import UNMATCHED_TOOL_RESULT

from .providers.base import ProviderError

_BY_KIND: dict[str, tuple[int, str, str]] = {
    "auth": (500, "authentication_error", "upstream provider rejected the credentials"),
    "rate_limit": (429, "rate_limit_error", "upstream provider rate limit exceeded"),
    "unreachable": (502, "api_error", "upstream provider error"),
    "timeout": (504, "api_error", "upstream provider timeout"),
    "bad_response": (502, "api_error", "upstream provider error"),
    "failed": (500, "api_error", "upstream provider failed"),
}


def provider_failure(exc: ProviderError) -> dict[str, object]:
    status, error_type, message = _BY_KIND.get(exc.kind, _BY_KIND["failed"])
    detail = exc.message.strip()
    if detail and exc.kind in ("failed", "bad_response", "auth"):
        message = f"{message}: {detail}"
    return {"status": status, "error_type": error_type, "message": message,
            "code": exc.kind, "retry_after": exc.retry_after}


def run_timeout(seconds: float) -> dict[str, object]:
    return {"status": 504, "error_type": "api_error",
            "message": f"agent run timed out after {seconds:g} s", "code": "run_timeout"}


def internal(message: str) -> dict[str, object]:
    return {"status": 500, "error_type": "api_error", "message": message, "code": "internal"}


def interrupted(reason: str) -> dict[str, object]:
    return {"status": 503, "error_type": "api_error",
            "message": f"agent run interrupted: {reason}", "code": "interrupted"}


def unmatched_tool_result(call_id: str) -> dict[str, object]:
    """A session run's tool result answers none of the session's pending calls (SPEC §7)."""
    return {"status": 400, "error_type": "invalid_request_error",
            "message": UNMATCHED_TOOL_RESULT.format(call_id),
            "code": None}


def missed_tool_choice() -> dict[str, object]:
    """``tool_choice`` required or pinned, and the reply made no matching call (SPEC §7)."""
    return {"status": 502, "error_type": "api_error",
            "message": "Agent did not call the required tool.", "code": None}


def loop_exceeded(message: str) -> dict[str, object]:
    """The agent kept calling its tools past ``maxRounds`` (SPEC §9)."""
    return {"status": 500, "error_type": "api_error", "message": message,
            "code": "max_rounds"}
