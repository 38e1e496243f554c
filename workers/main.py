"""Running a worker process: ``clawbus worker`` / ``python -m workers``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping

from prometheus_client import start_http_server

from bus.connection import connect
from clawbus import telemetry
from clawbus.config import Settings

from .worker import Worker

log = logging.getLogger("clawbus.worker")


async def serve(settings: Settings, bus_url: str, *, grace_seconds: float = 30.0,
                env: Mapping[str, str] | None = None, metrics_port: int | None = None,
                metrics_host: str = "127.0.0.1") -> None:
    """Serve runs until SIGTERM/SIGINT, then drain for ``grace_seconds`` and exit.

    With ``metrics_port`` (0 = any free port), Prometheus metrics are served at
    ``http://<metrics_host>:<port>/metrics``.
    """
    nc = await connect(bus_url, "clawbus-worker")
    worker = Worker(settings, nc, env, grace_seconds=grace_seconds)
    traces = telemetry.setup(settings, os.environ if env is None else env, "worker",
                             worker.worker_id)
    if metrics_port is not None:
        server, _ = start_http_server(metrics_port, metrics_host, registry=worker.metrics.registry)
        host, port = server.server_address[:2]
        log.info("worker metrics on http://%s:%s/metrics", host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await nc.drain()
        with contextlib.suppress(Exception):
            await nc.close()
        if traces is not None:
            traces.shutdown()
