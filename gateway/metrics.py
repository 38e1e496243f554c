"""Prometheus metrics of one gateway process (``GET /metrics``).

One registry per app (tests run several apps in one process), built with the
``prometheus-client`` library: the standard, well-kept implementation of the
exposition format, histograms and process metrics.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from clawbus.gcstats import GCPauses
from clawbus.prom import Children

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.gc_pauses = GCPauses(r)
        self.requests = Counter("clawbus_http_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.runs = Counter("clawbus_runs", "Runs submitted to the bus, by outcome",
                            ["door", "outcome"], registry=r)
        self.run_latency = Histogram("clawbus_run_duration_seconds",
                                     "From submission to the run's last event",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("clawbus_time_to_first_token_seconds",
                              "From submission to the first text the client can get "
                              "(the whole reply for non-streaming calls)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("clawbus_queue_wait_seconds",
                                    "From submission until a worker accepted the run",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.active_streams = Gauge("clawbus_active_streams", "Open SSE streams", registry=r)
        self.active_runs = Gauge("clawbus_active_runs", "Runs this gateway is following",
                                 registry=r)
        self.ws_connections = Gauge("clawbus_ws_connections", "Open WebSocket connections",
                                    registry=r)
        self.bus_requests = Counter("clawbus_bus_round_trips",
                                    "JetStream/NATS round trips made by the gateway", ["op"],
                                    registry=r)
        self.bus_errors = Counter("clawbus_bus_errors", "Bus-side failures seen by the gateway",
                                  ["kind"], registry=r)
        self.workers = Gauge("clawbus_workers_alive", "Workers with a fresh heartbeat",
                             registry=r)
        # the labelled ones, by label values (bus/prom.py)
        self.requests_by = Children(self.requests)
        self.runs_by = Children(self.runs)
        self.bus_requests_by = Children(self.bus_requests)
        self.bus_errors_by = Children(self.bus_errors)
