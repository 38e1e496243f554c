"""Logging set-up shared by every clawbus process, with the run context
(run id, session key) attached to every line logged while a run is handled.

``--log-format json`` writes one JSON object per line (for log shippers);
the default is a human-readable line. The run context lives in contextvars, so
it follows the asyncio task that handles the run and nothing else. With tracing
on (clawbus/telemetry.py), JSON lines logged under a span also carry its
``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator

import orjson

from . import tracing

RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)
SESSION_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_key",
                                                                         default=None)


@contextlib.contextmanager
def run_context(run_id: str, session_key: str) -> Iterator[None]:
    """Attach ``run_id`` and ``session_key`` to every log line inside the block."""
    run_token = RUN_ID.set(run_id)
    session_token = SESSION_KEY.set(session_key)
    try:
        yield
    finally:
        RUN_ID.reset(run_token)
        SESSION_KEY.reset(session_token)


class _RunContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = RUN_ID.get()
        record.session_key = SESSION_KEY.get()
        if tracing.ENABLED:
            ids = tracing.spans().log_ids()
            record.trace_id, record.span_id = ids if ids is not None else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key in ("run_id", "session_key", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        run_id = getattr(record, "run_id", None)
        if run_id is not None:
            line += f" [run={run_id} session={getattr(record, 'session_key', '')!r}]"
        return line


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RunContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every upstream request at INFO: keep that for debug.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
